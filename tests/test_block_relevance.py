"""Block relevance and the top blocks by it: the XLA definition against a float64 loop, and the
fused Pallas selection kernel (interpret mode, and its CUDA lowering) against the XLA path."""

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


@pytest.mark.parametrize("bound", [True, False])
def test_xla_definition_matches_brute_force(bound):
  args = make_case(7, rows=6, nb=20, d=16, bound=bound, dtype=jnp.float32)
  out = br.block_relevance(*args, bound=bound)
  np.testing.assert_allclose(np.asarray(out), brute_force(*args, bound), rtol=1e-5, atol=1e-7)


def selection_case(seed, *, b=2, t=8, hq=4, hkv=2, d=32, nb=40, bound=True, p_valid=0.7,
                   live=None, dtype=jnp.float32, ties=False):
  """Query slots [B, T, Hq, D], per-slot weights (zero past `live`), representatives, validity."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d))
  reps = rng.standard_normal((b, hkv, nb, 2 * d if bound else d))
  if bound:
    reps[..., d:] = np.abs(reps[..., d:])
  if ties:  # every block a copy of one of three: relevance ties everywhere
    reps = reps[:, :, rng.integers(0, 3, nb)]
  live = np.full((b,), t) if live is None else np.asarray(live)
  weight = rng.random((b, t)) * (np.arange(t)[None, :] < live[:, None])
  weight[:, 0] = 0.0  # a live slot of zero weight (a non-focus query before the last focus one)
  valid = rng.random((b, nb)) < p_valid
  return (jnp.asarray(q, dtype), jnp.asarray(weight, jnp.float32), jnp.asarray(reps, dtype),
          jnp.asarray(valid), jnp.asarray(live, jnp.int32))


SELECTION_CASES = [
    dict(),
    dict(nb=100, live=[3, 5]),  # slots past `live` skipped
    dict(hq=28, hkv=4, t=32, d=16, nb=64, live=[4, 7]),  # Dream's 7-head groups: rows cross tiles
    dict(nb=17, bound=False),  # NB past a power of two: the last tile is masked
    dict(nb=300, d=16, b=1),  # three 128-block tiles in a grid of four
    dict(nb=100, d=16, chunk=16, live=[8, 2]),  # seven 16-block tiles in a grid of eight
    dict(nb=40, p_valid=0.0),  # no valid block: count 0, ids padded with 0
    dict(nb=40, p_valid=0.2, keep=30),  # fewer valid blocks than kept: all of them
    dict(nb=48, ties=True, keep=20),  # ties: the lower ids, as lax.top_k
    dict(nb=64, live=[0, 1], keep=32),  # no live slot: relevance 0 everywhere, ties to id order
    dict(nb=20, keep=20, dtype=jnp.bfloat16),  # keep all
    dict(nb=40, row_keep=[3, 20], keep=12),  # per-row caps: below keep, and above it (clipped)
    dict(nb=48, ties=True, keep=20, row_keep=[0, 7]),  # a row keeping nothing; ties under a cap
]


@pytest.mark.parametrize("case", range(len(SELECTION_CASES)))
def test_pallas_selection_matches_xla(case):
  kw = dict(SELECTION_CASES[case])
  chunk, keep, row_keep = kw.pop("chunk", None), kw.pop("keep", None), kw.pop("row_keep", None)
  bound = kw.get("bound", True)
  q, w, reps, valid, live = selection_case(case, **kw)
  keep = keep or (reps.shape[2] + 1) // 2
  run = lambda impl, **extra: jax.jit(functools.partial(
      br.select_top_blocks, keep=keep, bound=bound, implementation=impl,
      return_relevance=True, row_keep=row_keep, **extra))(q, w, reps, valid)
  ref_ids, ref_counts, ref_rel = run("xla")
  ids, counts, rel = run("pallas_gpu", interpret=True, chunk=chunk, live_queries=live)
  np.testing.assert_allclose(np.asarray(rel), np.asarray(ref_rel), rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts), np.asarray(ref_counts))
  cap = np.minimum(keep, keep if row_keep is None else np.asarray(row_keep))
  np.testing.assert_array_equal(np.asarray(counts),
                                np.minimum(cap, np.asarray(valid).sum(1))[:, None]
                                * np.ones((1, reps.shape[1]), int))
  ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
  assert ids.shape == ref_ids.shape == reps.shape[:2] + (keep,) and ids.dtype == np.int32
  for b in range(ids.shape[0]):
    for h in range(ids.shape[1]):
      n = int(counts[b, h])
      kept = ids[b, h, :n]
      np.testing.assert_array_equal(kept, np.sort(ref_ids[b, h, :n]))  # ascending, same set
      assert np.all(np.asarray(valid)[b, kept])
      np.testing.assert_array_equal(ids[b, h, n:], kept[-1] if n else 0)  # padded with the last


def test_pallas_selection_ties_take_the_lower_ids():
  # All blocks score alike: the first `keep` valid ids, exactly what lax.top_k keeps.
  q, w, _, _, _ = selection_case(0, nb=32)
  reps = jnp.ones((2, 2, 32, 64), jnp.float32)
  valid = jnp.ones((2, 32), bool).at[:, 3].set(False)
  ids, counts = br.select_top_blocks(q, w, reps, valid, keep=5, bound=True,
                                     implementation="pallas_gpu", interpret=True)
  np.testing.assert_array_equal(np.asarray(ids), np.broadcast_to([0, 1, 2, 4, 5], (2, 2, 5)))
  np.testing.assert_array_equal(np.asarray(counts), 5)


@pytest.mark.parametrize("layout,nb", [("llada8b", 512), ("dream7b", 512), ("llada8b", 2048),
                                       ("dream7b", 130)])
def test_pallas_selection_lowers_for_cuda(layout, nb):
  # The Triton lowering runs in Python on any host (compiling needs the GPU): gathers of the
  # query rows, the bisection and the scatter of the kept ids, at LLaDA-8B's and Dream-7B's
  # head layouts, 32K, 128K and a ragged block count.
  hq, hkv = {"llada8b": (32, 32), "dream7b": (28, 4)}[layout]
  b, t, d = 1, 32, 128
  spec = jax.ShapeDtypeStruct
  f = functools.partial(br.select_top_blocks, keep=(nb + 1) // 2, bound=True,
                        implementation="pallas_gpu")
  text = jax.jit(f).trace(
      spec((b, t, hq, d), jnp.bfloat16), spec((b, t), jnp.float32),
      spec((b, hkv, nb, 2 * d), jnp.bfloat16), spec((b, nb), jnp.bool_),
      live_queries=spec((b,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
  assert "block_select" in text


def test_selection_errors():
  q, w, reps, valid, _ = selection_case(3)
  with pytest.raises(ValueError, match="implementation must be one of"):
    br.select_top_blocks(q, w, reps, valid, keep=4, bound=True, implementation="auto")
  with pytest.raises(ValueError, match="keep = 41"):
    br.select_top_blocks(q, w, reps, valid, keep=41, bound=True)
  with pytest.raises(AssertionError):  # "bound" needs [centre, radius] representatives
    br.select_top_blocks(q, w, reps, valid, keep=4, bound=False)
  with pytest.raises(ValueError, match="chunk = 24"):
    br.select_top_blocks(q, w, reps, valid, keep=4, bound=True, implementation="pallas_gpu",
                         interpret=True, chunk=24)
