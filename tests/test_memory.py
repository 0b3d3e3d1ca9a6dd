"""The up-front memory check: sizes add up, and an impossible run fails before allocating."""

from __future__ import annotations

import numpy as np
import pytest

import focus_jax
from focus_jax import memory, pipeline, presets


def test_estimate_counts_params_cache_and_activations():
  cfg = presets.preset("llada_8b")
  est = memory.estimate(cfg, 1, 32768 + 256, "focus")
  assert abs(est.params - 2 * cfg.num_params()) < 1e6
  assert est.kv_cache == 2 * 32 * 33024 * 32 * 128 * 2  # K and V, every layer, bf16
  assert memory.estimate(cfg, 1, 33024, "vanilla").kv_cache == 0
  assert memory.estimate(cfg, 2, 33024, "focus", devices=2).kv_cache == est.kv_cache
  # Measured peak on an H100 at this size: 34.3 GiB.
  assert 34 * memory.GIB < est.total < 38 * memory.GIB
  # The refresh's e4m3 weights: one byte for each of the blocks' projection weights.
  fp8 = memory.estimate(cfg, 1, 32768 + 256, "focus", fp8_weights=True)
  assert fp8.fp8_weights == 32 * 4096 * (4 * 4096 + 3 * 12288) and "fp8 weights" in fp8.describe()
  assert fp8.total == est.total + fp8.fp8_weights


def test_check_fits_names_sizes_and_fixes():
  cfg = presets.preset("llada_8b")
  with pytest.raises(MemoryError, match=r"needs about .* GiB .*KV cache .*--config.mesh.model"):
    memory.check_fits(cfg, 1, 131328, "focus", limit=80 * memory.GIB)
  memory.check_fits(cfg, 1, 131328, "focus", limit=141 * memory.GIB)  # an H200 holds it


def test_generate_refuses_before_allocating(monkeypatch):
  model = focus_jax.load("tiny")
  monkeypatch.setattr(memory, "device_limit", lambda device=None: 1024)
  with pytest.raises(MemoryError, match="tokens needs about"):
    pipeline.generate_ids(model, np.ones((1, 64), np.int32), np.ones((1, 64), bool),
                          mode="dual_cache", gen_length=32, steps=32, block_length=16)
