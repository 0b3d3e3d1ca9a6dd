"""The up-front memory check: sizes add up, and an impossible run fails before allocating."""

from __future__ import annotations

import numpy as np
import pytest

import focus_jax
import jax.numpy as jnp

from focus_jax import memory, pipeline, presets
from focus_jax.decoding import make_denoiser
from focus_jax.kernels import selected_attention


def test_estimate_counts_params_cache_and_activations():
  cfg = presets.preset("llada_8b")
  est = memory.estimate(cfg, 1, 32768 + 256, "focus")
  assert abs(est.params - 2 * cfg.num_params()) < 1e6
  assert est.kv_cache == 2 * 32 * 33024 * 32 * 128 * 2  # K and V, every layer, bf16
  assert memory.estimate(cfg, 1, 33024, "vanilla").kv_cache == 0
  # A mesh: the weights split over "model" only; rows over "data", kv heads over "model".
  assert memory.estimate(cfg, 2, 33024, "focus", data=2).kv_cache == est.kv_cache
  assert memory.estimate(cfg, 2, 33024, "focus", model=2).kv_cache == est.kv_cache
  assert memory.estimate(cfg, 1, 33024, "focus", data=8).params == est.params
  assert memory.estimate(cfg, 1, 33024, "focus", data=2).kv_cache == est.kv_cache  # 1 row
  assert memory.estimate(cfg, 1, 33024, "focus", model=4).params == est.params // 4
  # Measured peak on an H100 at this size: 34.3 GiB.
  assert 34 * memory.GIB < est.total < 38 * memory.GIB
  # The refresh's e4m3 weights: one byte for each of the blocks' projection weights.
  fp8 = memory.estimate(cfg, 1, 32768 + 256, "focus",
                        denoiser=make_denoiser(cfg, "focus", refresh_fp8_matmul=True))
  assert fp8.fp8_weights == 32 * 4096 * (4 * 4096 + 3 * 12288) and "fp8 weights" in fp8.describe()
  assert fp8.total == est.total + fp8.fp8_weights


def test_padded_refresh_counts_its_reordered_keys():
  """A padded batch's refresh gives cuDNN its keys and values reordered valid first (one
  layer's K and V more than unpadded; measured 0.50 GiB for LLaDA-8B at 32K on an H100)."""
  cfg = presets.preset("llada_8b")
  plain = memory.estimate(cfg, 2, 33024, "focus")
  padded = memory.estimate(cfg, 2, 33024, "focus", padded=True)
  assert padded.activations - plain.activations == 2 * 33024 * 2 * 32 * 128 * 2


def test_estimate_counts_selected_prompt_blocks():
  """Selected prompt blocks hold head-major K/V and one group of chunks: counted as the kernel
  plans them (`selected_attention.extra_bytes`), for the prompt's length and padding."""
  cfg = presets.preset("llada_8b")
  selected = make_denoiser(cfg, "focus", refresh_prompt_keep=0.25)
  dense = memory.estimate(cfg, 1, 32768 + 256, "focus")
  est = memory.estimate(cfg, 1, 32768 + 256, "focus", denoiser=selected, prompt_length=32768)
  expected = selected_attention.extra_bytes(1, 33024, 32, 32, 128, jnp.bfloat16, prefix=32768,
                                            chunk=1024, block=128, keep=0.25, n_global=64,
                                            padded=False)
  assert est.selected_prompt == expected > 1 * memory.GIB
  assert est.total == dense.total + expected and "selected prompt blocks" in est.describe()
  padded = memory.estimate(cfg, 1, 33024, "focus", denoiser=selected, prompt_length=32768,
                           padded=True)  # gathered keys (valid first) instead of pages
  assert padded.selected_prompt == selected_attention.extra_bytes(
      1, 33024, 32, 32, 128, jnp.bfloat16, prefix=32768, chunk=1024, block=128, keep=0.25,
      n_global=64, padded=True)
  assert memory.estimate(cfg, 1, 33024, "vanilla", denoiser=selected).selected_prompt == 0
  # Dream-7B: 28 query heads on 4 kv heads; two devices hold half each.
  dream = presets.preset("dream_7b")
  on_cudnn = make_denoiser(dream, "focus", refresh_prompt_keep=0.25, attention_impl="cudnn")
  est = memory.estimate(dream, 1, 33024, "focus", model=2, denoiser=on_cudnn,
                        prompt_length=32768)
  assert est.selected_prompt == selected_attention.extra_bytes(
      1, 33024, 28, 4, 128, jnp.bfloat16, prefix=32768, chunk=1024, block=128, keep=0.25,
      n_global=64, padded=False, implementation="cudnn") // 2
  # A prompt too short to save anything refreshes densely and holds nothing more.
  assert memory.estimate(cfg, 1, 512 + 256, "focus", denoiser=selected).selected_prompt == 0


def test_check_fits_names_sizes_and_fixes():
  cfg = presets.preset("llada_8b")
  with pytest.raises(MemoryError, match=r"needs about .* GiB .*KV cache .*--config.mesh.model"):
    memory.check_fits(cfg, 1, 131328, "focus", limit=80 * memory.GIB)
  memory.check_fits(cfg, 1, 131328, "focus", limit=141 * memory.GIB)  # an H200 holds it


def test_check_fits_on_the_device_names_jax_share_of_it(monkeypatch):
  """The device's limit is JAX's allocator share (75% unless XLA_PYTHON_CLIENT_MEM_FRACTION):
  the error says so, since raising it is a fix; a limit passed in is not the device's."""
  cfg = presets.preset("llada_8b")
  monkeypatch.setattr(memory, "device_limit", lambda device=None: 60 * memory.GIB)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  with pytest.raises(MemoryError, match=r"use 0\.75 of the device \(XLA_PYTHON_CLIENT_MEM_"):
    memory.check_fits(cfg, 8, 33024, "focus")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  with pytest.raises(MemoryError, match=r"use 0\.9 of the device"):
    memory.check_fits(cfg, 8, 33024, "focus")
  with pytest.raises(MemoryError) as passed_in:
    memory.check_fits(cfg, 8, 33024, "focus", limit=60 * memory.GIB)
  assert "MEM_FRACTION" not in str(passed_in.value)


def test_generate_refuses_before_allocating(monkeypatch):
  model = focus_jax.load("tiny")
  monkeypatch.setattr(memory, "device_limit", lambda device=None: 1024)
  with pytest.raises(MemoryError, match="tokens needs about"):
    pipeline.generate_ids(model, np.ones((1, 64), np.int32), np.ones((1, 64), bool),
                          mode="dual_cache", gen_length=32, steps=32, block_length=16)
