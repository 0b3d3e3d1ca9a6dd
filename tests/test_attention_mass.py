"""kernels.attention_mass: the XLA definition against a float64 softmax, the Pallas GPU kernel
(interpret mode) against it, and the two-pass form (attention's lse, then the mass) against the
column sums of a dense softmax."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from focus_jax.kernels import attention_mass as am
from focus_jax.kernels import sparse_attention as sa


def _case(seed, *, b=2, t=5, hq=8, hkv=2, d=32, s=200, dtype=jnp.float32):
  """Random q/k, each row's lse over all S keys (float64), and weights with zeros; the last row
  has its last two queries dead (lse -inf, as padded slots come back from the attention)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d))
  k = rng.standard_normal((b, s, hkv, d))
  kh = np.repeat(k, hq // hkv, axis=2)  # [B, S, Hq, D]
  logits = np.einsum("bthd,bshd->bths", q, kh) / np.sqrt(d)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  lse[b - 1, -2:] = -np.inf
  w = rng.random((b, t))
  w[0, 1] = 0.0
  probs = np.where(np.isfinite(lse)[..., None], np.exp(logits - lse[..., None]), 0.0)
  want = np.einsum("bths,bt->bs", probs, w)
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(lse, jnp.float32),
          jnp.asarray(w, jnp.float32)), want


CASES = [dict(), dict(hq=4, hkv=4, t=3, s=64), dict(hq=6, hkv=3, t=7, s=129, d=16),
         dict(b=1, hq=4, hkv=1, t=40, s=300)]  # 160 rows: 256 padded


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_matches_a_float64_softmax(impl, case):
  args, want = _case(case, **CASES[case])
  fn = jax.jit(functools.partial(am.attention_mass, implementation=impl,
                                 interpret=impl == "pallas_gpu"))
  got = fn(*args)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


def test_key_tiles_that_do_not_divide_the_cache():
  """S = 200 with tiles of 64: the last tile is shifted back and overlaps the one before."""
  args, want = _case(7, s=200)
  got = jax.jit(functools.partial(am.attention_mass_pallas, scale=32 ** -0.5, tile=64,
                                  interpret=True))(*args)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tile,s,match", [(48, 300, "power of two"), (512, 300, "cache length"),
                                          (512, 600, "score elements")])
def test_bad_key_tiles_are_refused_before_compiling(tile, s, match):
  """A tile that is not a power of two, one longer than the cache, and one whose [rows, tile]
  score block is over the limit (160 rows pad to 256; 256 x 512 gave wrong sums on an H200)."""
  args, _ = _case(0, b=1, hq=4, hkv=1, t=40, s=s)
  with pytest.raises(ValueError, match=match):
    am.attention_mass_pallas(*args, scale=1.0, tile=tile, interpret=True)


def test_two_pass_form_equals_dense_column_sums():
  """Attention over the whole cache with its lse (split-KV kernel, interpreted), then the mass:
  each live query's probabilities sum to 1 per head, and the mass equals the column sums."""
  rng = np.random.default_rng(3)
  b, t, hq, hkv, d, s, bs = 2, 6, 8, 2, 64, 256, 32
  q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  nb = s // bs
  idx = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, 1, nb))
  counts = jnp.asarray([6, 4], jnp.int32)
  prompt_start = jnp.asarray([0, 40], jnp.int32)
  _, lse = jax.jit(functools.partial(
      sa.block_sparse_attention, block_size=bs, implementation="pallas_gpu", interpret=True,
      return_lse=True))(q, k, v, idx, jnp.full((b, 1), nb, jnp.int32), prompt_start,
                        jnp.full((b,), s - 32, jnp.int32), jnp.full((b,), s, jnp.int32),
                        query_counts=counts)
  weight = jnp.ones((b, t), jnp.float32)
  mass = np.asarray(am.attention_mass(q, k, lse, weight, implementation="pallas_gpu",
                                      interpret=True))
  seen = np.arange(s)[None, :] >= np.asarray(prompt_start)[:, None]
  kh = np.repeat(np.asarray(k), hq // hkv, axis=2)
  logits = np.einsum("bthd,bshd->bths", np.asarray(q), kh) / np.sqrt(d)
  logits = np.where(seen[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  live = np.arange(t)[None, :] < np.asarray(counts)[:, None]
  want = np.einsum("bths,bt->bs", probs, live.astype(np.float64))
  np.testing.assert_allclose(np.where(seen, mass, 0.0), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.sum(np.where(seen, mass, 0.0), axis=1),
                             hq * np.asarray(counts), rtol=1e-5)


def test_bf16_inputs():
  args, want = _case(11, dtype=jnp.bfloat16)
  got = am.attention_mass(*args, implementation="pallas_gpu", interpret=True)
  ref = am.attention_mass(*args, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0.1, atol=0.02)  # bf16 q, k


def test_clear_errors():
  (q, k, lse, w), _ = _case(0)
  with pytest.raises(ValueError, match="implementation must be one of"):
    am.attention_mass(q, k, lse, w, implementation="cuda")
  with pytest.raises(AssertionError):
    am.attention_mass(q, k, lse[:, :2], w)
  with pytest.raises(ValueError, match="not a multiple"):
    am.attention_mass(q[:, :, :3], k, lse[:, :, :3], w)
  with pytest.raises(ValueError, match="head dim"):
    am.attention_mass_pallas(q[..., :24], k[..., :24], lse, w, scale=1.0, interpret=True)
  assert am.supported(q.shape, k.shape) is None
