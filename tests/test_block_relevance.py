"""The fused block relevance kernel (Pallas, interpret mode) against its XLA definition, and the
definition against a float64 loop."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from focus_jax.kernels import block_relevance as br


def make_case(seed, *, b=2, hkv=2, rows=32, d=64, nb=40, bound=True, dtype=jnp.bfloat16,
              p_valid=0.7):
  rng = np.random.default_rng(seed)
  qg = jnp.asarray(rng.standard_normal((b, hkv, rows, d)), dtype)
  reps = rng.standard_normal((b, hkv, nb, 2 * d if bound else d))  # head-major
  if bound:
    reps[..., d:] = np.abs(reps[..., d:])  # radii
  weight = rng.random((b, rows))
  weight[:, :3] = 0.0  # padding rows / rows of non-focus queries
  valid = rng.random((b, nb)) < p_valid
  valid[:, 0] = False
  return qg, jnp.asarray(weight, jnp.float32), jnp.asarray(reps, dtype), jnp.asarray(valid)


def brute_force(qg, weight, reps, valid, bound):
  qg, reps, weight = (np.asarray(x, np.float64) for x in (qg, reps, weight))
  valid = np.asarray(valid)
  b, hkv, rows, d = qg.shape
  out = np.zeros((b, hkv, reps.shape[2]))
  for i in range(b):
    for h in range(hkv):
      for r in range(rows):
        q = qg[i, h, r]
        s = reps[i, h, :, :d] @ q + (reps[i, h, :, d:] @ np.abs(q) if bound else 0.0)
        s = s / np.sqrt(d)
        if not valid[i].any():
          continue
        e = np.where(valid[i], np.exp(s - s[valid[i]].max()), 0.0)
        out[i, h] += weight[i, r] * e / e.sum()
  return out


CASES = [
    dict(),
    dict(bound=False, rows=70, d=32, nb=64, hkv=1),  # rows past one tile, NB a tile multiple
    dict(rows=16, d=128, nb=17),  # NB just past a power of two: the last tile is shifted back
    dict(rows=224, d=32, nb=100, b=1, hkv=1),  # Dream's GQA rows: 4 row tiles
    dict(nb=16, p_valid=0.0),  # no valid block at all: zeros, not nan
    dict(nb=300, rows=8, d=16, b=1),  # several block tiles
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_pallas_matches_xla(case):
  kw = CASES[case]
  bound = kw.get("bound", True)
  args = make_case(case, **kw)
  ref = jax.jit(functools.partial(br.block_relevance, bound=bound, implementation="xla"))(*args)
  out = jax.jit(functools.partial(br.block_relevance, bound=bound, implementation="pallas_gpu",
                                  interpret=True))(*args)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=2e-5)
  # Invalid blocks get nothing; each row with a valid block spreads exactly its weight.
  valid = np.asarray(args[3])
  assert np.all(np.asarray(out)[np.broadcast_to(~valid[:, None], out.shape)] == 0)
  expected = np.asarray(args[1]).sum(axis=1) * valid.any(axis=1)
  np.testing.assert_allclose(np.asarray(out).sum(axis=2), np.broadcast_to(
      expected[:, None], out.shape[:2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bound", [True, False])
def test_xla_definition_matches_brute_force(bound):
  args = make_case(7, rows=6, nb=20, d=16, bound=bound, dtype=jnp.float32)
  out = br.block_relevance(*args, bound=bound, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), brute_force(*args, bound), rtol=1e-5, atol=1e-7)


def test_default_and_errors():
  args = make_case(3)
  default = br.block_relevance(*args, bound=True)
  np.testing.assert_array_equal(np.asarray(default), np.asarray(
      br.block_relevance(*args, bound=True, implementation="xla")))
  with pytest.raises(ValueError, match="implementation must be one of"):
    br.block_relevance(*args, bound=True, implementation="auto")
  with pytest.raises(AssertionError):  # "bound" needs [centre, radius] representatives
    br.block_relevance(*args, bound=False)
  qg, w, reps, valid = make_case(3, nb=8)
  with pytest.raises(ValueError, match="8 blocks"):
    br.block_relevance(qg, w, reps, valid, bound=True, implementation="pallas_gpu",
                       interpret=True)
