"""LLaDA's SFT objective (masking only the response, 1/t weighting, response-length
normalisation), a few training steps on CPU, and the export -> load round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focus_jax import presets
from focus_jax.checkpoints_convert import load_model
from focus_jax.models.transformer import Transformer
from focus_jax.training import export, objective, tasks, train


def test_masking_only_touches_the_response_at_ratio_t():
  b, l = 4096, 64
  tokens = jnp.arange(b * l, dtype=jnp.int32).reshape(b, l) % 1000 + 10
  response = jnp.broadcast_to(jnp.arange(l) >= 32, (b, l))
  noisy, masked, p = objective.mask_response(jax.random.key(0), tokens, response, mask_id=3)
  masked, p, noisy = np.asarray(masked), np.asarray(p), np.asarray(noisy)
  assert not masked[:, :32].any()
  np.testing.assert_array_equal(noisy[:, :32], np.asarray(tokens)[:, :32])
  assert (noisy[masked] == 3).all() and (noisy[~masked] == np.asarray(tokens)[~masked]).all()
  assert p.min() >= objective.EPS and p.max() <= 1.0
  # Per-row fraction masked tracks p; p is uniform.
  frac = masked[:, 32:].mean(axis=1)
  assert np.corrcoef(frac, p)[0, 1] > 0.95
  assert abs(p.mean() - 0.5) < 0.03


def test_loss_is_weighted_by_inverse_ratio_and_normalised_by_response_length():
  v = 8
  logits = jnp.zeros((2, 4, v))  # uniform: every CE = log(v)
  targets = jnp.zeros((2, 4), jnp.int32)
  masked = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
  p = jnp.array([0.5, 0.25])
  got = objective.sft_loss(logits, targets, masked, p, jnp.array([4.0, 4.0]))
  want = np.log(v) * ((2 / 0.5) / 4 + (1 / 0.25) / 4) / 2
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # Unbiased: the expected weighted loss over the masking is the loss of predicting every token.
  got2 = objective.sft_loss(logits, targets, masked, p, jnp.array([2.0, 4.0]))
  assert float(got2) > float(got)


def test_a_few_steps_reduce_the_loss():
  cfg = train.demo_config(d_model=32, n_layers=2, n_heads=2, mlp_hidden=64)
  cfg16 = cfg.replace(dtype="float32")
  params = Transformer(cfg).init_params(jax.random.key(0))
  opt = train.make_optimizer(0.0, 0.0).init(params)
  batch = train.batch_for_step(0, 0, 512, 8 * 512)
  key = jax.random.key(1)
  losses = []
  for _ in range(8):
    params, opt, loss, _, aux = train.train_step(params, opt, batch, key, np.float32(3e-3), cfg16,
                                                 0.0)
    losses.append(float(loss) + float(aux))
  assert losses[-1] < 0.92 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_schedule_is_deterministic_and_grows_to_max_len():
  a = train.length_schedule(200, 0, 8192)
  np.testing.assert_array_equal(a, train.length_schedule(200, 0, 8192))
  assert set(a[:40]) == {train.MIN_LEN} and a[-40:].min() >= 1024 and 8192 in a
  assert a[:40].max() < 256  # short rows first: the copy circuit only forms there
  assert train.length_schedule(50, 0, 1024).max() <= 1024


def test_export_round_trip(tmp_path):
  cfg = train.demo_config(d_model=64, n_layers=2, n_heads=2, mlp_hidden=128)
  params = Transformer(cfg).init_params(jax.random.key(0))
  files = export.export_hf(params, cfg, str(tmp_path), max_shard_bytes=200_000)
  assert "model.safetensors.index.json" in files  # sharded
  loaded_cfg, loaded = load_model(str(tmp_path), dtype="float32")
  assert loaded_cfg.mask_token_id == tasks.MASK_ID and loaded_cfg.eos_token_id == tasks.EOS_ID
  assert (loaded_cfg.d_model, loaded_cfg.n_layers, loaded_cfg.vocab_size) == (64, 2, train.VOCAB_SIZE)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-2, rtol=1e-2)  # bf16


def test_export_refuses_fused_qkv_params(tmp_path):
  """The HF layout has three projections: fused params get an error naming the fix, and
  nothing is written."""
  cfg = presets.preset("tiny").replace(fused_qkv=True)
  params = Transformer(cfg).init_params(jax.random.key(0))
  with pytest.raises(ValueError, match="fused_qkv=False"):
    export.export_hf(params, cfg, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
