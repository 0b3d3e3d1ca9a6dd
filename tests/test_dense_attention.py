"""Dense attention dispatch: backend choice, overrides, and splash (interpret mode) vs XLA."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from focus_jax.kernels import dense_attention as da


def _qkv(seed, b=2, t=128, hq=4, hkv=2, d=128, s=256, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return f(b, t, hq, d), f(b, s, hkv, d), f(b, s, hkv, d), jnp.asarray(rng.random((b, s)) < 0.7)


def _naive(q, k, v, key_valid):
  """Repeated K/V, float64, plain softmax: independent of the grouped XLA path."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(key_valid)[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("with_mask", [False, True])
def test_xla_matches_naive(with_mask):
  q, k, v, kv = _qkv(0, t=16, d=32, s=40)
  if not with_mask:
    kv = jnp.ones_like(kv)
  out = da.attention(q, k, v, key_valid=kv if with_mask else None, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, kv), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_splash_interpret_matches_xla(with_mask):
  q, k, v, kv = _qkv(1, hq=6, hkv=2)
  kv = kv if with_mask else None
  ref = da.attention(q, k, v, key_valid=kv, implementation="xla")
  out = da.attention(q, k, v, key_valid=kv, implementation="splash")  # interpret off-TPU
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_auto_by_backend(monkeypatch):
  q, k, _, _ = _qkv(2)
  qb = q.astype(jnp.bfloat16)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert da._resolve("auto", qb, k) == "cudnn"
  assert da._resolve("auto", q, k) == "xla"  # float32 stays on XLA
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert da._resolve("auto", qb, k) == "splash"
  assert da._resolve("auto", qb[:, :32], k) == "xla"  # few queries: no splash
  assert da._resolve("auto", qb, k[:, :200]) == "xla"  # lengths not multiples of 128
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert da._resolve("auto", qb, k) == "xla"
  for impl in ("xla", "cudnn", "splash"):
    assert da._resolve(impl, qb, k) == impl  # an explicit choice overrides the backend


def test_unknown_implementation():
  q, k, v, _ = _qkv(3, t=8, s=16, d=16)
  with pytest.raises(ValueError, match="implementation"):
    da.attention(q, k, v, implementation="flash9000")


def test_auto_on_this_backend_runs():
  q, k, v, kv = _qkv(4, t=16, d=32, s=40)
  out = jax.jit(lambda *a: da.attention(*a))(q, k, v, kv)
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, kv), atol=1e-5, rtol=1e-5)
