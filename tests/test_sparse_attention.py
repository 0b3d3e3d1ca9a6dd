"""Block-sparse attention: every implementation against the reference, the reference against a
brute force, and the selection normaliser's guarantees. Pallas kernels run in interpret mode."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from focus_jax.kernels import sparse_attention as sa
from focus_jax.kernels.sparse import common


def _jit(fn, **static):
  """One XLA compile per test instead of op-by-op dispatch (much faster on CPU)."""
  return jax.jit(functools.partial(fn, **static))


def _interpret_params():
  return pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")


def _races_found() -> bool | None:
  """The TPU interpreter's race flag (private API: None when this jax does not have it)."""
  try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  except ImportError:
    return None
  return None if ipc.races is None else bool(ipc.races.races_found)


def make_case(seed: int, *, b=2, t=5, hq=4, hkv=2, d=128, s=512, bs=32, n=6, per_head=True,
              pattern="random", extra=True, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  g = hkv if per_head else 1
  nb = -(-s // bs)
  idx = rng.integers(0, nb, (b, g, n))
  cnt = rng.integers(0, n + 1, (b, g))
  if pattern == "empty":
    cnt[:] = 0
  elif pattern == "duplicate":
    idx[..., 1:] = idx[..., :1]
    cnt[:] = n
  elif pattern == "all":
    idx = np.broadcast_to(rng.permutation(np.arange(n) % nb), (b, g, n)).copy()
    cnt[:] = n
  elif pattern == "out_of_range":
    idx = rng.integers(-3 * nb, 3 * nb, (b, g, n))
    cnt[:] = n
  elif pattern == "padded":
    cnt = rng.integers(0, n + 4, (b, g))  # counts beyond N are clipped
    idx[..., n // 2:] = -1
  ps = rng.integers(0, s // 4, (b,))
  rs = rng.integers(s // 2, s - bs // 2, (b,))
  re = np.minimum(rs + rng.integers(0, 2 * bs, (b,)), s)
  if pattern == "no_keys":  # nothing selected, empty response: rows with no key at all
    cnt[:] = 0
    re = rs
    extra = False
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  args = [f(b, t, hq, d), f(b, s, hkv, d), f(b, s, hkv, d), jnp.asarray(idx, jnp.int32),
          jnp.asarray(cnt, jnp.int32), jnp.asarray(ps, jnp.int32), jnp.asarray(rs, jnp.int32),
          jnp.asarray(re, jnp.int32)]
  if extra:
    e = 7
    args += [f(b, e, hkv, d), f(b, e, hkv, d), jnp.asarray(rng.random((b, e)) < 0.5)]
  return args, bs


def brute_force(args, bs, scale=None, with_lse=False):
  """A per-row Python loop over explicit key sets, float64: independent of the reference. With
  `with_lse`, also each row's log-sum-exp of its scaled logits ([B, T, Hq], -inf: no key)."""
  q, k, v, idx, cnt, ps, rs, re, *extra = [None if a is None else np.asarray(a, np.float64)
                                           if a.dtype != jnp.bool_ else np.asarray(a)
                                           for a in args]
  idx, cnt = np.asarray(args[3]), np.asarray(args[4])
  ps, rs, re = (np.asarray(a) for a in args[5:8])
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  nb = -(-s // bs)
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  out = np.zeros(q.shape)
  lse = np.full(q.shape[:3], -np.inf)
  for bi in range(b):
    r0 = min(max(rs[bi], 0), s)
    r1 = min(max(re[bi], r0), s)
    p0 = min(max(ps[bi], 0), r0)
    for h in range(hq):
      kh = h // (hq // hkv)
      gi = kh if idx.shape[1] > 1 else 0
      blocks = {int(x) for x in idx[bi, gi, :max(0, min(cnt[bi, gi], idx.shape[2]))]
                if 0 <= x < nb}
      keys = sorted({j for blk in blocks for j in range(blk * bs, (blk + 1) * bs)
                     if p0 <= j < r0} | set(range(r0, r1)))
      kk = [k[bi, j, kh] for j in keys]
      vv = [v[bi, j, kh] for j in keys]
      if extra:
        ek, ev, evalid = extra
        for j in range(ek.shape[1]):
          if evalid[bi, j]:
            kk.append(ek[bi, j, kh])
            vv.append(ev[bi, j, kh])
      if not kk:
        continue
      kk, vv = np.stack(kk), np.stack(vv)
      for ti in range(t):
        sc = kk @ q[bi, ti, h] * scale
        p = np.exp(sc - sc.max())
        out[bi, ti, h] = p @ vv / p.sum()
        lse[bi, ti, h] = sc.max() + np.log(p.sum())
  return (out, lse) if with_lse else out


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["random", "duplicate", "out_of_range", "padded", "no_keys"])
@pytest.mark.parametrize("per_head", [True, False])
def test_reference_matches_brute_force(pattern, per_head):
  args, bs = make_case(3, d=16, s=200, bs=16, pattern=pattern, per_head=per_head)
  ref = sa.reference_block_sparse_attention(*args, block_size=bs)
  np.testing.assert_allclose(np.asarray(ref), brute_force(args, bs), atol=2e-5, rtol=2e-5)


_normalize_300_32 = jax.jit(lambda *a: sa.normalize_selection(*a, block_size=32, seq_len=300))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_normalize_selection_properties(seed):
  rng = np.random.default_rng(seed)
  b, g, n, s, bs = 2, 3, 9, 300, 32
  nb = -(-s // bs)
  idx = rng.integers(-3, nb + 3, (b, g, n)).astype(np.int32)
  cnt = rng.integers(-1, n + 3, (b, g)).astype(np.int32)
  ps = rng.integers(-10, s, (b,)).astype(np.int32)
  rs = rng.integers(-10, s + 10, (b,)).astype(np.int32)
  re = rng.integers(-10, s + 10, (b,)).astype(np.int32)
  sel = _normalize_300_32(idx, cnt, ps, rs, re)
  for bi in range(b):
    r0 = min(max(rs[bi], 0), s)
    p0 = min(max(ps[bi], 0), r0)
    assert int(sel.prompt_start[bi]) == p0 and int(sel.response_start[bi]) == r0
    assert r0 <= int(sel.response_end[bi]) <= s
    for gi in range(g):
      want = sorted({int(x) for x in idx[bi, gi, :max(0, min(cnt[bi, gi], n))]
                     if 0 <= x < nb and p0 < r0 and x * bs < r0 and (x + 1) * bs > p0})
      c = int(sel.counts[bi, gi])
      got = np.asarray(sel.indices[bi, gi])
      assert c == len(want) and list(got[:c]) == want
      assert np.all(got[c:] == (want[-1] if want else 0))  # padding repeats the last block


IMPLS = [
    ("xla_gather", {}),
    ("xla_gather", {"max_response_len": 80}),
    ("pallas_gpu", {"interpret": True}),
    ("pallas_tpu", {"interpret": "params", "max_response_len": 80}),
]

# (kwargs of make_case): shapes, block sizes, GQA groups, G = 1 vs G = Hkv, selection patterns.
CASES = [
    dict(),
    dict(pattern="empty"),
    dict(pattern="duplicate", per_head=False),
    dict(pattern="all", hq=8, hkv=2, n=16),
    dict(pattern="out_of_range", hq=4, hkv=1, t=3),
    dict(pattern="padded", hq=4, hkv=4, bs=16, n=10),
    dict(pattern="no_keys"),
    dict(per_head=False, hq=8, hkv=2, t=9, bs=64, s=1024, n=5, b=1),
    dict(pattern="random", hq=6, hkv=3, bs=16, s=256, n=12, extra=False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("impl,kw", IMPLS, ids=lambda x: x if isinstance(x, str) else
                         "-".join(sorted(x)) or "default")
def test_matches_reference(impl, kw, case):
  kw = dict(kw)
  if kw.get("interpret") == "params":
    kw["interpret"] = _interpret_params()
  args, bs = make_case(100 + case, **CASES[case])
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(*args)
  out = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl, **kw)(*args)
  assert out.shape == args[0].shape and out.dtype == args[0].dtype
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
  if impl == "pallas_tpu":
    assert _races_found() in (None, False)
  if CASES[case].get("pattern") == "no_keys":
    assert float(jnp.max(jnp.abs(out))) == 0.0  # a row with no key returns zeros


def test_cache_not_multiple_of_block_size():
  # The last block is partial: the GPU kernel clamps its tile into the cache, the XLA path pads.
  args, bs = make_case(7, s=300, bs=32, n=8, pattern="all")
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(*args)
  for impl, kw in (("xla_gather", {}), ("pallas_gpu", {"interpret": True})):
    out = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl, **kw)(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl,kw", [("xla_gather", {}), ("pallas_gpu", {"interpret": True}),
                                     ("pallas_tpu", {"interpret": True})])
def test_bf16_and_scale(impl, kw):
  args, bs = make_case(11, hq=8, hkv=2, t=8, dtype=jnp.bfloat16)
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs, scale=0.05)(*args)
  out = _jit(sa.block_sparse_attention, block_size=bs, scale=0.05, implementation=impl,
             **kw)(*args)
  assert out.dtype == jnp.bfloat16
  err = np.linalg.norm(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
  assert err / np.linalg.norm(np.asarray(ref, np.float32)) < 1e-2


def test_gpu_kernel_tilings_and_normalized_entry():
  # Several row tiles and splits (more splits than items too), through the pre-normalised entry.
  args, bs = make_case(13, hq=8, hkv=2, t=12, n=5)
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(*args)
  q, k, v, idx, cnt, ps, rs, re, *extra = args
  sel = sa.normalize_selection(idx, cnt, ps, rs, re, block_size=bs, seq_len=k.shape[1])
  for cfg in (dict(block_m=16, num_splits=3, static_loop=True),
              dict(block_m=16, num_splits=5, prefetch=True),
              dict(block_m=16, num_splits=4, static_loop=True, prefetch=True),
              dict(block_m=32, num_splits=64)):
    out = _jit(sa.block_sparse_attention_normalized, block_size=bs,
               implementation="pallas_gpu", interpret=True, kernel_config=cfg)(
                   q, k, v, sel, *extra)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
  # Without extra arrays the merge kernel finishes: every tile live (no query_counts), 6 tiles.
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(q, k, v, idx, cnt, ps, rs, re)
  for cfg in (dict(block_m=16, num_splits=3), dict(block_m=16, num_splits=5),
              dict(block_m=16, num_splits=2, merge_rows=2, merge_d=32)):
    out = _jit(sa.block_sparse_attention_normalized, block_size=bs,
               implementation="pallas_gpu", interpret=True, kernel_config=cfg)(q, k, v, sel)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl,kw", [("xla_gather", {}), ("pallas_gpu", {"interpret": True}),
                                     ("pallas_tpu", {"interpret": True})])
def test_selection_of_distinct_equals_the_normalised_selection(impl, kw):
  # Top-k style ids (distinct, inside the prompt, in relevance order, counts <= N) skip the
  # dedup; the kernels must not care that they are unsorted.
  args, bs = make_case(19, hq=8, hkv=2, t=6, n=8, s=768)
  q, k, v, idx, cnt, ps, rs, re, *extra = args
  rng = np.random.default_rng(19)
  first, stop = np.asarray(ps) // bs, np.asarray(rs) // bs  # blocks wholly inside the prompt
  idx = np.stack([np.stack([rng.permutation(np.arange(first[i], stop[i]))[:8]
                            for _ in range(idx.shape[1])]) for i in range(idx.shape[0])])
  cnt = np.asarray(cnt) % 9
  idx, cnt = jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32)
  sel = sa.selection_of_distinct(idx, cnt, ps, rs, re, block_size=bs, seq_len=k.shape[1])
  last = np.take_along_axis(np.asarray(idx), np.maximum(np.asarray(cnt) - 1, 0)[..., None], -1)
  pad = np.arange(8) >= np.asarray(cnt)[..., None]
  assert np.all(np.asarray(sel.indices)[pad] == np.broadcast_to(last, pad.shape)[pad])
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(q, k, v, idx, cnt, ps, rs, re,
                                                                  *extra)
  out = _jit(sa.block_sparse_attention_normalized, block_size=bs, implementation=impl, **kw)(
      q, k, v, sel, *extra)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
  # The same promise through the public entry (what Focus's sparse layers call).
  out = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl,
             distinct_selection=True, **kw)(q, k, v, idx, cnt, ps, rs, re, *extra)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl,kw,cfg", [
    ("reference", {}, None),
    ("xla_gather", {}, None),
    ("pallas_tpu", {"interpret": "params"}, None),
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=2)),  # slots become splits
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=3)),  # split runs 2 + 1
])
@pytest.mark.parametrize("pattern", ["random", "no_keys"])
@pytest.mark.parametrize("extra", [True, False])  # pallas_gpu: without extra_k, the merge kernel
def test_return_lse_is_each_rows_log_sum_exp(impl, kw, cfg, pattern, extra):
  """The lse `kernels.attention_mass` needs: per row, over the keys it attended (extra keys
  included), -inf for rows with no key and for queries past `query_counts`."""
  kw = dict(kw)
  if kw.get("interpret") == "params":
    kw["interpret"] = _interpret_params()
  args, bs = make_case(41, b=3, hq=8, hkv=2, t=6, n=8, pattern=pattern, extra=extra)
  counts = jnp.asarray([6, 0, 4], jnp.int32)
  want_out, want_lse = brute_force(args, bs, with_lse=True)
  live = np.arange(6)[None, :] < np.asarray(counts)[:, None]
  fn = sa.reference_block_sparse_attention if impl == "reference" else functools.partial(
      sa.block_sparse_attention, implementation=impl, kernel_config=cfg, **kw)
  out, lse = _jit(fn, block_size=bs, return_lse=True)(*args, query_counts=counts)
  assert lse.shape == args[0].shape[:3] and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.where(live[..., None, None], want_out, 0.0),
                             atol=2e-5, rtol=2e-5)
  want_lse = np.where(live[..., None], want_lse, -np.inf)
  lse = np.asarray(lse)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
  np.testing.assert_allclose(lse[np.isfinite(want_lse)], want_lse[np.isfinite(want_lse)],
                             atol=2e-5, rtol=2e-5)
  if pattern == "no_keys":
    assert np.all(np.isinf(lse))


@pytest.mark.parametrize("impl,kw,cfg", [
    ("xla_gather", {}, None),
    ("pallas_tpu", {"interpret": True}, None),
    # 9 queries x 4 heads = 36 rows: 3 row tiles of 16; counts leave 0, 1, 2 or 3 of them live,
    # so slots of dead tiles work as extra splits of live ones (with the sinks in split 0).
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=2)),
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=3, static_loop=True)),
    ("pallas_gpu", {"interpret": True}, dict(block_m=64, num_splits=2)),  # one tile
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=5)),  # merge runs of 4 + 1
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=2, fused_merge=False)),
    # smaller merge tiles
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=3, merge_rows=4, merge_d=16)),
    ("pallas_gpu", {"interpret": True}, dict(block_m=16, num_splits=2, merge_rows=16)),
])
def test_query_counts_zero_padded_slots_and_keep_live_rows(impl, kw, cfg):
  args, bs = make_case(29, b=4, hq=8, hkv=2, t=9, n=8, extra=False)
  q, k, v, *sel = args
  b, s = k.shape[:2]
  rng = np.random.default_rng(29)
  pos = jnp.asarray(rng.integers(0, s, (b, 6)), jnp.int32)
  valid = jnp.asarray(rng.random((b, 6, 2)) < 0.7)
  counts = jnp.asarray([0, 3, 9, 5], jnp.int32)  # live rows 0, 12, 36, 20 of 36
  full = _jit(sa.reference_block_sparse_attention, block_size=bs)(
      q, k, v, *sel, extra_valid=valid, extra_positions=pos)
  live = (np.arange(9)[None, :] < np.asarray(counts)[:, None])[:, :, None, None]
  want = np.where(live, np.asarray(full), 0.0)
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(
      q, k, v, *sel, extra_valid=valid, extra_positions=pos, query_counts=counts)
  np.testing.assert_allclose(np.asarray(ref), want, atol=1e-6)
  got = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl, kernel_config=cfg,
             **kw)(q, k, v, *sel, extra_valid=valid, extra_positions=pos, query_counts=counts)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="query_counts"):
    sa.block_sparse_attention(q, k, v, *sel, block_size=bs, query_counts=counts[:2])


@pytest.mark.parametrize("impl,kw", [("reference", {}), ("xla_gather", {}),
                                     ("pallas_gpu", {"interpret": True}),
                                     ("pallas_tpu", {"interpret": True})])
@pytest.mark.parametrize("per_head_sel,per_head_valid", [(True, False), (False, True),
                                                         (True, True)])
def test_dedup_extra_counts_rows_the_selection_attends_once(impl, kw, per_head_sel,
                                                           per_head_valid):
  """Extra rows inside a selected block (within the prompt range) or inside the response range
  are dropped, per kv head; the others count. Checked against validity cleared by a Python loop
  over the explicit key sets."""
  args, bs = make_case(31, b=2, hq=8, hkv=2, t=6, n=8, per_head=per_head_sel, extra=False)
  q, k, v, idx, cnt, ps, rs, re = args
  b, s, hkv = k.shape[0], k.shape[1], k.shape[2]
  rng = np.random.default_rng(31)
  e = 24
  # Half the positions inside selected blocks (some outside the prompt range), a few in the
  # response, the rest anywhere; out-of-range ones are clipped like the gather clips them.
  pos = rng.integers(-2, s + 2, (b, e))
  for bi in range(b):
    for j in range(e // 2):
      blk = int(np.asarray(idx)[bi, j % idx.shape[1], j % idx.shape[2]])
      pos[bi, j] = min(blk * bs + int(rng.integers(0, bs)), s - 1)
    pos[bi, e // 2] = min(int(rs[bi]), s - 1)
  valid = rng.random((b, e, hkv) if per_head_valid else (b, e)) < 0.8
  cleared = np.broadcast_to(valid[..., None] if valid.ndim == 2 else valid, (b, e, hkv)).copy()
  nb = -(-s // bs)
  for bi in range(b):
    r0, r1, p0 = int(rs[bi]), int(re[bi]), int(ps[bi])
    for h in range(hkv):
      gi = h if idx.shape[1] > 1 else 0
      blocks = {int(x) for x in np.asarray(idx)[bi, gi, :int(cnt[bi, gi])] if 0 <= x < nb}
      for j in range(e):
        p = min(max(int(pos[bi, j]), 0), s - 1)
        if (p // bs in blocks and p0 <= p < r0) or r0 <= p < r1:
          cleared[bi, j, h] = False
  pos_j, valid_j = jnp.asarray(pos, jnp.int32), jnp.asarray(valid)
  want = _jit(sa.reference_block_sparse_attention, block_size=bs)(
      q, k, v, *args[3:], extra_valid=jnp.asarray(cleared), extra_positions=pos_j)
  fn = (sa.reference_block_sparse_attention if impl == "reference" else
        functools.partial(sa.block_sparse_attention, implementation=impl,
                          kernel_config={"block_m": 16, "num_splits": 3}
                          if impl == "pallas_gpu" else None, **kw))
  got = _jit(fn, block_size=bs, dedup_extra=True)(q, k, v, *args[3:], extra_valid=valid_j,
                                                  extra_positions=pos_j)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  assert not np.array_equal(cleared, np.broadcast_to(
      valid[..., None] if valid.ndim == 2 else valid, (b, e, hkv)))  # the case drops some
  with pytest.raises(ValueError, match="dedup_extra"):
    sa.block_sparse_attention(*args, block_size=bs, dedup_extra=True)


def test_gpu_tile_plan_covers_each_live_tile_once():
  """Every (slot, split) program works for one live tile; each live tile gets contiguous,
  distinct split ids 0..splits-1 covering all its programs."""
  from focus_jax.kernels.sparse import common
  for m_tiles in (1, 2, 3, 4, 7):
    for n_live in range(1, m_tiles + 1):
      seen = {}
      for slot in range(m_tiles):
        for sp in range(3):
          tile, split, splits = (int(x) for x in common.tile_plan(
              jnp.int32(n_live * 16 - 5), 16, m_tiles, jnp.int32(slot), jnp.int32(sp), 3))
          assert tile == slot % n_live
          seen.setdefault(tile, []).append((split, splits))
      assert sorted(seen) == list(range(n_live))
      for tile, got in seen.items():
        splits = {n for _, n in got}
        assert len(splits) == 1 and sorted(i for i, _ in got) == list(range(splits.pop()))


def test_jit_and_auto_on_cpu():
  args, bs = make_case(17)
  assert sa.resolve_implementation("auto", args[0].shape, args[1].shape, args[0].dtype,
                                   bs) == ("xla_gather" if jax.default_backend() == "cpu"
                                           else sa.resolve_implementation(
                                               "auto", args[0].shape, args[1].shape,
                                               args[0].dtype, bs))
  f = jax.jit(lambda *a: sa.block_sparse_attention(*a, block_size=bs))
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(*args)
  np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_clear_errors():
  args, bs = make_case(19)
  q, k, v, idx, cnt, ps, rs, re, *extra = args
  with pytest.raises(ValueError, match="implementation"):
    sa.block_sparse_attention(*args, block_size=bs, implementation="nope")
  with pytest.raises(ValueError, match="kv heads"):
    sa.block_sparse_attention(q[:, :, :3], k, v, idx, cnt, ps, rs, re, block_size=bs)
  with pytest.raises(ValueError, match="block_indices"):
    sa.block_sparse_attention(q, k, v, jnp.zeros((2, 3, 4), jnp.int32), jnp.zeros((2, 3),
                              jnp.int32), ps, rs, re, block_size=bs)
  with pytest.raises(ValueError, match="together"):
    sa.block_sparse_attention(q, k, v, idx, cnt, ps, rs, re, extra[0], None, None,
                              block_size=bs)
  with pytest.raises(ValueError, match="pallas_gpu cannot"):
    sa.block_sparse_attention(*args, block_size=24, implementation="pallas_gpu", interpret=True)
  with pytest.raises(ValueError, match="pallas_tpu cannot"):
    sa.block_sparse_attention(*args, block_size=12, implementation="pallas_tpu", interpret=True)


@pytest.mark.parametrize("impl,kw", [("xla_gather", {}), ("pallas_gpu", {"interpret": True}),
                                     ("pallas_tpu", {"interpret": True})])
def test_per_kv_head_extra_valid(impl, kw):
  """Sinks may be valid for some kv heads only (Focus drops a sink from the heads whose kept
  blocks already contain it): [B, E, Hkv] validity equals running each head with its own."""
  rng = np.random.default_rng(3)
  b, t, hq, hkv, d, s, bs, e = 2, 4, 4, 2, 128, 256, 32, 6
  q = jnp.asarray(rng.normal(size=(b, t, hq, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32)
  ek = jnp.asarray(rng.normal(size=(b, e, hkv, d)), jnp.float32)
  ev = jnp.asarray(rng.normal(size=(b, e, hkv, d)), jnp.float32)
  valid = jnp.asarray(rng.random((b, e, hkv)) < 0.5)
  idx = jnp.asarray([[[0, 2, 3]], [[1, 4, 5]]], jnp.int32)
  args = (idx, jnp.full((b, 1), 3, jnp.int32), jnp.asarray([0, 9], jnp.int32),
          jnp.full((b,), 224, jnp.int32), jnp.full((b,), s, jnp.int32))
  got = sa.block_sparse_attention(q, k, v, *args, ek, ev, valid, block_size=bs,
                                  implementation=impl, max_response_len=s - 224, **kw)
  g = hq // hkv
  for h in range(hkv):  # kv head h serves query heads h*g .. (h+1)*g - 1
    want = sa.reference_block_sparse_attention(
        q[:, :, h * g:(h + 1) * g], k[:, :, h:h + 1], v[:, :, h:h + 1], *args,
        ek[:, :, h:h + 1], ev[:, :, h:h + 1], valid[:, :, h], block_size=bs)
    np.testing.assert_allclose(np.asarray(got[:, :, h * g:(h + 1) * g]), np.asarray(want),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl,kw", [("reference", {}), ("xla_gather", {}),
                                     ("pallas_gpu", {"interpret": True}),
                                     ("pallas_tpu", {"interpret": True})])
@pytest.mark.parametrize("per_head_valid,e", [(False, 7), (True, 5), (True, 20)])
def test_extra_positions_equal_gathered_extra_keys(impl, kw, per_head_valid, e):
  """Extra keys given as cache rows (the GPU kernel gathers them in split 0; the others gather
  in XLA) equal the same rows passed as arrays, with positions outside the cache invalid,
  several row tiles and splits, and E padded past one tile (20 -> 32)."""
  args, bs = make_case(23, hq=8, hkv=2, t=12, extra=False)
  q, k, v, *sel = args
  b, s, hkv = k.shape[0], k.shape[1], k.shape[2]
  rng = np.random.default_rng(e)
  pos = rng.integers(-2, s + 3, (b, e))
  pos[:, 0], pos[:, 1] = -2, s + 2  # outside the cache: invalid, whatever extra_valid says
  valid = rng.random((b, e, hkv) if per_head_valid else (b, e)) < 0.6
  valid[:, :2] = True
  pos, valid = jnp.asarray(pos, jnp.int32), jnp.asarray(valid)
  rows = np.clip(np.asarray(pos), 0, s - 1)
  ek = jnp.asarray(np.take_along_axis(np.asarray(k), rows[:, :, None, None], axis=1))
  ev = jnp.asarray(np.take_along_axis(np.asarray(v), rows[:, :, None, None], axis=1))
  inside = (np.asarray(pos) >= 0) & (np.asarray(pos) < s)
  want_valid = jnp.asarray(np.asarray(valid) & (inside[..., None] if per_head_valid else inside))
  want = _jit(sa.reference_block_sparse_attention, block_size=bs)(q, k, v, *sel, ek, ev,
                                                                  want_valid)
  kernel_config = {"block_m": 16, "num_splits": 3} if impl == "pallas_gpu" else None
  got = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl,
             kernel_config=kernel_config, **kw)(q, k, v, *sel, extra_valid=valid,
                                                extra_positions=pos)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="not both"):
    sa.block_sparse_attention(q, k, v, *sel, ek, ev, valid, block_size=bs, extra_positions=pos)
  with pytest.raises(ValueError, match="extra_valid"):
    sa.block_sparse_attention(q, k, v, *sel, block_size=bs, extra_positions=pos)


@pytest.mark.parametrize("sms", [132, 108, 46])  # H100/H200, A100, a smaller Ampere part
@pytest.mark.parametrize("hkv,rows,n_sel", [(32, 32, 256), (4, 224, 256), (8, 8, 3), (1, 64, 40)])
def test_gpu_default_splits_fill_one_wave(monkeypatch, sms, hkv, rows, n_sel):
  """The default split count is the largest whose programs fit in one wave (a tail wave cost
  LLaDA 26% at 32K on the H100), unless the work items run out first."""
  from focus_jax.kernels.sparse import gpu
  monkeypatch.setattr(gpu, "num_sms", lambda: sms)
  cfg = gpu.default_config(1, hkv, rows, n_sel, 5)
  m_tiles = -(-rows // cfg["block_m"])
  programs = hkv * m_tiles * cfg["num_splits"]
  slots = gpu.PROGRAMS_PER_SM * sms
  items_cap = -(-(n_sel + 5) // 4)
  assert cfg["num_splits"] >= 1
  assert programs <= max(slots, hkv * m_tiles)  # one wave (or one split when even that is more)
  if cfg["num_splits"] < min(items_cap, 64):
    assert hkv * m_tiles * (cfg["num_splits"] + 1) > slots  # one more split would spill


# ------------------------------------------------------------------------------------------------
# The Mosaic GPU kernel ("mosaic_gpu": wgmma + TMA, Hopper). On the CPU: its planning, that it
# lowers for CUDA (the Mosaic GPU lowering runs on any host), and its own code in Mosaic GPU's
# interpreter with the race detector on. The interpreter cannot run wgmma with an A operand in
# registers, a transposed B (jax 0.10) or `pl.run_state` accumulators, so under `interpret` the
# two matmuls are plain dots (`mosaic_gpu._dot`); the rest is the kernel's code.
from focus_jax.kernels.sparse import mosaic_gpu as mgpu  # noqa: E402


def _mgpu_races_found() -> bool:
  """The Mosaic GPU interpreter's race flag (private API; the test fails if it moved)."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  return bool(gpu_callbacks.get_races().races_found)


def _upcast(args):
  """float32 copies of the bf16 arrays among `args` (the rest as given)."""
  return [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]


def _f32_reference(args, bs):
  """The reference on float32 copies of bf16 inputs: a float32 output to compare against."""
  return np.asarray(_jit(sa.reference_block_sparse_attention, block_size=bs)(*_upcast(args)))


MGPU_CASES = [  # (make_case kwargs, kernel_config); few splits: the interpreter walks the grid
    (dict(hq=8, hkv=2, t=6, d=64, s=512, bs=64, n=6), dict(num_splits=2)),  # GQA, extra keys
    (dict(pattern="duplicate", per_head=False, hq=4, hkv=1, t=16, d=64, s=512, bs=64),
     dict(num_splits=2)),
    (dict(pattern="no_keys", d=64, s=256, bs=64, b=1), dict(num_splits=2)),
    (dict(pattern="empty", hq=4, hkv=2, d=64, s=256, bs=64, b=1), dict(num_splits=1)),
    (dict(pattern="all", hq=4, hkv=2, d=64, s=488, bs=64, n=8, b=1),  # S % bs == 40
     dict(num_splits=2)),
    (dict(pattern="padded", hq=6, hkv=2, t=5, d=64, s=384, bs=64, n=8), dict(num_splits=1)),
    (dict(hq=8, hkv=2, t=12, d=128, s=1024, bs=128, n=5, b=1),
     dict(num_wgs=2, num_splits=3, num_stages=2)),  # 48 rows over 2 warpgroups, 3 splits
    (dict(hq=4, hkv=1, t=36, d=64, s=640, bs=64, n=4, b=1),  # 144 rows: 2 row tiles of 128;
     dict(num_splits=4)),  # more splits than items (1-7 here): idle splits
    (dict(hq=4, hkv=2, t=8, d=64, s=640, bs=64, n=7, b=1, per_head=False),
     dict(wg_rows=128, num_stages=4, num_splits=1)),
    # 2 blocks per step (Q K^T over 128 keys): odd item counts end on a masked duplicate tile.
    (dict(hq=8, hkv=2, t=6, d=64, s=488, bs=64, n=7, pattern="padded"),
     dict(kv_blocks=2, num_splits=2, num_stages=2)),
    (dict(hq=4, hkv=1, t=16, d=64, s=1000, bs=128, n=5, b=1),  # N = 256, S % bs == 104
     dict(kv_blocks=2, num_splits=1, num_stages=2)),
]


@pytest.mark.parametrize("case", range(len(MGPU_CASES)))
def test_mosaic_gpu_matches_reference_interpreted(case):
  """Case 0 also returns the log-sum-exp."""
  kw, cfg = MGPU_CASES[case]
  args, bs = make_case(300 + case, dtype=jnp.bfloat16, **kw)
  ref = _f32_reference(args, bs)
  params = mgpu.gpu_interpret_params(detect_races=True)
  out = _jit(sa.block_sparse_attention, block_size=bs, implementation="mosaic_gpu",
             interpret=params, kernel_config=cfg, return_lse=case == 0)(*args)
  if case == 0:
    out, lse = out
    _, want = brute_force(_upcast(args), bs, with_lse=True)
    np.testing.assert_allclose(np.asarray(lse), want, atol=2e-2, rtol=1e-2)
  assert out.shape == args[0].shape and out.dtype == jnp.bfloat16
  assert not _mgpu_races_found()
  out = np.asarray(out, np.float32)
  assert np.all(np.isfinite(out))
  if kw.get("pattern") == "no_keys":
    assert float(np.abs(out).max()) == 0.0 and float(np.abs(ref).max()) == 0.0
    return
  # bf16 output and bf16 probabilities in P V: ~2^-8 relative; a wrong block or mask is O(1).
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
  assert np.abs(out - ref).max() < 2e-2 * np.abs(ref).max()


@pytest.mark.parametrize("case", [
    dict(hq=8, hkv=2, t=10, d=64, s=640, bs=64, n=6, b=2),  # 1 consumer, 64-key steps
    dict(hq=14, hkv=2, t=4, d=64, s=488, bs=64, n=5, b=2),  # 2 consumers, 128-key steps
])
def test_mosaic_gpu_triton_merge_with_live_queries_and_lse_interpreted(case):
  # No extra arrays to merge on top: Triton's merge finishes (splits, lse, padded query slots).
  args, bs = make_case(350, dtype=jnp.bfloat16, extra=False, **case)
  counts = jnp.asarray([case["t"] - 3, case["t"]], jnp.int32)
  cfg = dict(num_splits=3)
  if case["hq"] == 14:  # 7 heads a group, as Dream's: 28 rows on two warpgroups
    cfg.update(num_wgs=2)
  out, lse = _jit(sa.block_sparse_attention, block_size=bs, implementation="mosaic_gpu",
                  interpret=True, kernel_config=cfg, query_counts=counts,
                  return_lse=True)(*args)
  want, want_lse = brute_force(_upcast(args), bs, with_lse=True)
  live = np.arange(case["t"])[None, :] < np.asarray(counts)[:, None]  # [B, T]
  want = np.where(live[:, :, None, None], want, 0.0)
  want_lse = np.where(live[:, :, None], want_lse, -np.inf)
  out = np.asarray(out, np.float32)
  assert np.all(out[~live] == 0.0) and np.all(np.isneginf(np.asarray(lse)[~live]))
  assert np.abs(out - want).max() < 2e-2 * np.abs(want).max()
  np.testing.assert_allclose(np.asarray(lse)[live], want_lse[live], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("e,per_head,cfg", [
    # One sink tile; 2 row tiles of 64 rows, one split each: a live tile whose twin slot is dead
    # gets two splits.
    # (XLA merges the tile slots; the fused merge's one-consumer case is the next one's)
    (24, True, dict(num_wgs=1, num_splits=1, fused_merge=False)),
    # One selection for both heads, per-head sinks; 128-key steps: the sink tile and a cache
    # block share a step (the bias covers the first column block only).
    (40, False, dict(num_wgs=1, num_splits=1, kv_blocks=2)),
    # Two sink tiles in one 128-key step, 2 consumers (one row tile of 128 rows). At most
    # num_stages steps a split: the interpreter runs the 3 warpgroups on a CPU thread pool, and on
    # a 2-core host a producer that waits for both consumers to free a slot deadlocks with the
    # second consumer not yet started.
    (70, True, dict(num_wgs=2, kv_blocks=2, num_splits=2)),
])
def test_mosaic_gpu_sinks_dedup_and_live_row_tiles_interpreted(e, per_head, cfg):
  # Focus's sparse layer: sinks given as cache rows (per-head validity, some inside kept blocks
  # or the response: dedup_extra drops those), and padded query slots, whose row tiles work
  # as extra KV splits of the live ones (with 64-row tiles, query counts leave 2, 1 and 0 live
  # tiles of 2).
  args, bs = make_case(360 + e, b=3, hq=8, hkv=2, t=20, d=64, s=448, bs=64, n=4, extra=False,
                       dtype=jnp.bfloat16, per_head=per_head)
  q, k, v, idx, cnt, ps, rs, re = args
  rng = np.random.default_rng(e)
  pos = rng.integers(-2, k.shape[1] + 2, (3, e))
  pos[:, 0] = np.asarray(rs)  # in the response: counted once, there
  pos[:, 1] = np.asarray(idx)[:, 0, 0] * bs + 3  # inside a block head 0 may keep
  valid = jnp.asarray(rng.random((3, e, 2)) < 0.7)
  pos = jnp.asarray(pos, jnp.int32)
  counts = jnp.asarray([20, 5, 0], jnp.int32)  # live rows 80, 20 and 0 of 80
  up = _upcast(args)
  want = np.asarray(_jit(sa.reference_block_sparse_attention, block_size=bs, dedup_extra=True)(
      *up, extra_valid=valid, extra_positions=pos, query_counts=counts))
  got = _jit(sa.block_sparse_attention, block_size=bs, implementation="mosaic_gpu",
             interpret=mgpu.gpu_interpret_params(detect_races=True), kernel_config=cfg,
             dedup_extra=True)(*args, extra_valid=valid, extra_positions=pos,
                               query_counts=counts)
  assert not _mgpu_races_found()
  got = np.asarray(got, np.float32)
  assert np.all(got[2] == 0.0) and np.all(got[1, 5:] == 0.0)
  assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
  no_sinks = np.asarray(_jit(sa.reference_block_sparse_attention, block_size=bs)(
      *up, query_counts=counts))
  assert np.abs(no_sinks - want).max() > 0.1 * np.abs(want).max()  # the sinks matter here


def test_extra_tiles_gathers_rows_and_masks_invalid_ones_per_head():
  # What the Mosaic GPU kernel reads for Focus's sinks: rows in their given order, whole tiles,
  # and a bias that is -inf exactly where a head must not count a row (and on the padding).
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.normal(size=(2, 40, 3, 8)), jnp.bfloat16)
  v = jnp.asarray(rng.normal(size=(2, 40, 3, 8)), jnp.bfloat16)
  pos = jnp.asarray(rng.integers(-3, 44, (2, 5)), jnp.int32)  # some outside the cache: clipped
  valid = jnp.asarray(rng.random((2, 5, 3)) < 0.5)
  xk, xv, bias = common.extra_tiles(k, v, pos, valid, tile_rows=4)
  assert xk.shape == xv.shape == (2, 8, 3, 8) and bias.shape == (2, 3, 8)
  rows = np.clip(np.asarray(pos), 0, 39)
  for b in range(2):
    np.testing.assert_array_equal(np.asarray(xk[b, :5]), np.asarray(k[b, rows[b]]))
    np.testing.assert_array_equal(np.asarray(xv[b, :5]), np.asarray(v[b, rows[b]]))
  want = np.where(np.swapaxes(np.asarray(valid), 1, 2), 0.0, -np.inf)
  np.testing.assert_array_equal(np.asarray(bias[:, :, :5]), want)
  assert np.all(np.isneginf(np.asarray(bias[:, :, 5:])))
  _, _, shared = common.extra_tiles(k, v, pos, valid[:, :, 0], tile_rows=4)  # [B, E]: all heads
  np.testing.assert_array_equal(np.asarray(shared[:, 1, :5]), want[:, 0])


def test_mosaic_gpu_normalized_entry_and_more_splits_than_items():
  args, bs = make_case(331, b=1, hq=2, hkv=1, t=4, d=64, s=320, bs=64, n=3,
                       dtype=jnp.bfloat16)
  q, k, v, idx, cnt, ps, rs, re, *extra = args
  sel = sa.normalize_selection(idx, cnt, ps, rs, re, block_size=bs, seq_len=k.shape[1])
  out = _jit(sa.block_sparse_attention_normalized, block_size=bs, implementation="mosaic_gpu",
             interpret=True, kernel_config=dict(num_splits=7))(q, k, v, sel, *extra)
  ref = _f32_reference(args, bs)
  assert np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref) < 1e-2


def test_mosaic_gpu_supported():
  ok = ((1, 32, 28, 128), (1, 33024, 4, 128), jnp.bfloat16, 64)
  assert mgpu.supported(*ok) is None
  assert mgpu.supported((1, 32, 32, 64), (1, 4096, 32, 64), jnp.float16, 128) is None
  assert "dtype" in mgpu.supported(ok[0], ok[1], jnp.float32, 64)
  assert "head dim" in mgpu.supported((1, 32, 28, 96), (1, 33024, 4, 96), jnp.bfloat16, 64)
  assert "multiple of 64" in mgpu.supported(ok[0], ok[1], jnp.bfloat16, 32)
  assert "multiple of 64" in mgpu.supported(ok[0], ok[1], jnp.bfloat16, 320)
  assert "multiple of 8" in mgpu.supported(ok[0], (1, 33020, 4, 128), jnp.bfloat16, 64)
  assert "shorter" in mgpu.supported(ok[0], (1, 32, 4, 128), jnp.bfloat16, 64)
  assert "shared memory" in mgpu.supported(ok[0], ok[1], jnp.bfloat16, 256)  # 2 stages: 257 KB
  assert "kv heads" in mgpu.supported((1, 32, 6, 128), ok[1], jnp.bfloat16, 64)
  args, bs = make_case(5, hq=4, hkv=2, d=64, s=256, bs=32, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="mosaic_gpu cannot"):
    sa.block_sparse_attention(*args, block_size=bs, implementation="mosaic_gpu", interpret=True)
  args, bs = make_case(5, hq=4, hkv=2, d=64, s=256, bs=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="positive softmax scale"):
    sa.block_sparse_attention(*args, block_size=bs, scale=-0.1, implementation="mosaic_gpu",
                              interpret=True)


def test_mosaic_gpu_plan():
  # Dream-7B: 7 heads x 32 queries = 224 rows -> 2 row tiles of 2 x 64 rows; LLaDA: 32 -> 64.
  dream = mgpu.plan(1, 4, 224, 128, 64, 261, sms=132)
  assert (dream.num_wgs, dream.row_tiles, dream.rows_pad) == (2, 2, 256)
  assert (dream.kv_blocks, dream.pingpong, dream.mask_full_steps) == (2, True, False)
  assert dream.smem_bytes <= mgpu.SMEM_PER_BLOCK
  llada = mgpu.plan(1, 32, 32, 128, 64, 261, sms=132)
  assert (llada.num_wgs, llada.row_tiles, llada.rows_pad) == (1, 1, 64)
  assert (llada.kv_blocks, llada.pingpong) == (1, False)  # one consumer: 64-key steps
  assert mgpu.plan(1, 4, 224, 128, 128, 261, sms=132).kv_blocks == 1  # 2 x 128 keys: no
  with pytest.raises(ValueError, match="pingpong"):
    mgpu.plan(1, 4, 224, 128, 64, 261, num_wgs=4, pingpong=True)
  # A tiling override gets the rest derived around it (steps and splits that fit 4 consumers:
  # one row tile, so about twice the splits), and other keys pass through.
  base = mgpu.default_config(1, 4, 224, 256, 5)
  four = mgpu.default_config(1, 4, 224, 256, 5, num_wgs=4, semantics="lane")
  assert (base["kv_blocks"], four["kv_blocks"], four["semantics"]) == (2, 1, "lane")
  assert four["num_splits"] > base["num_splits"]
  assert mgpu.default_config(1, 4, 224, 256, 5, num_splits=3)["num_splits"] == 3
  for p, units in ((dream, 4 * 2), (llada, 32)):  # KV splits fill one wave, and no more
    slots = p.programs_per_sm * 132
    assert p.num_splits * units <= slots < (p.num_splits + 1) * units
  assert mgpu.plan(1, 4, 224, 128, 64, 3, sms=132).num_splits == 2  # at most 1 per 2 items
  four = mgpu.plan(1, 4, 224, 128, 64, 261, num_wgs=4, num_stages=4, sms=132)
  assert (four.row_tiles, four.rows_pad) == (1, 256)
  assert four.smem_bytes == 4 * 64 * 128 * 2 + 2 * 4 * 64 * 128 * 2 + 1024
  # setmaxnreg: consumers take only what the producer gives up (the CTA's pool is fixed at
  # launch: 65536 / threads, a multiple of 8), e.g. FA3's 2 x 232 + 40 = 3 x 168.
  assert mgpu.register_split(2) == (232, 40)
  assert mgpu.register_split(1) == (0, 0)
  for nw in (2, 3, 4):
    c, pr = mgpu.register_split(nw)
    launch = 65536 // ((nw + 1) * 128) // 8 * 8
    assert c % 8 == 0 and c > launch and nw * c + pr <= (nw + 1) * launch
  with pytest.raises(ValueError, match="shared memory"):
    mgpu.plan(1, 4, 224, 128, 128, 100, num_wgs=4, num_stages=4)
  with pytest.raises(ValueError, match="wg_rows"):
    mgpu.plan(1, 4, 224, 128, 64, 100, wg_rows=32)


@pytest.mark.parametrize("capability,queries,heads,want", [
    ("9.0", 32, (28, 4), "mosaic_gpu"),  # Dream-7B's Focus step: 7 x 32 = 224 rows a kv head
    ("9.0", 33, (28, 4), "mosaic_gpu"),  # its dual cache (the row before the block too)
    ("9.0", 8, (28, 4), "pallas_gpu"),  # 56 rows: memory-bound, Triton's kernel
    ("9.0", 64, (28, 4), "mosaic_gpu"),  # 448 rows, the most checked on the GPU
    ("9.0", 257, (28, 4), "pallas_gpu"),  # Dream's prefix cache (1799 rows): not checked there
    ("9.0", 256, (32, 32), "pallas_gpu"),  # LLaDA's prefix cache (MHA): not timed with it
    ("9.0", 32, (32, 32), "pallas_gpu"),  # LLaDA-8B (MHA): 32 rows
    ("8.0", 32, (28, 4), "pallas_gpu"),  # no wgmma before Hopper
    ("10.0", 32, (28, 4), "pallas_gpu"),  # nor is the kernel written for Blackwell
    (None, 32, (28, 4), "pallas_gpu")])  # a GPU that reports no capability (ROCm)
def test_auto_picks_mosaic_gpu_for_many_rows_a_kv_head_on_hopper(monkeypatch, capability,
                                                                 queries, heads, want):
  import types
  monkeypatch.setattr(sa.jax, "default_backend", lambda: "gpu")
  gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability,
                              device_kind="NVIDIA GPU")
  monkeypatch.setattr(sa.jax, "devices", lambda *a: [gpu])
  q, k = (1, queries, heads[0], 128), (1, 33024, heads[1], 128)
  assert mgpu.supported(q, k, jnp.bfloat16, 64) is None
  assert sa.resolve_implementation("auto", q, k, jnp.bfloat16, 64) == want
  assert sa.resolve_implementation("auto", q, k, jnp.float32, 64) == "pallas_gpu"  # 16-bit only
  assert sa.resolve_implementation("pallas_gpu", q, k, jnp.bfloat16, 64) == "pallas_gpu"


@pytest.mark.parametrize("layout", ["llada8b", "dream7b"])
@pytest.mark.parametrize("semantics", ["lane", "warpgroup"])
def test_mosaic_gpu_lowers_for_cuda(layout, semantics):
  # Mosaic GPU's lowering runs in Python on any host: shapes, TMA views and wgmma operand
  # layouts are checked here (compiling needs the GPU). Both of its lowering semantics.
  hq, hkv = {"llada8b": (32, 32), "dream7b": (28, 4)}[layout]
  b, t, d, s, bs, n = 1, 32, 128, 33024, 64, 256
  qg = jax.ShapeDtypeStruct((b, hkv, hq // hkv * t, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  sel = sa.Selection(i32(b, hkv, n), i32(b, hkv), i32(b), i32(b), i32(b))
  cfg = mgpu.default_config(b, hkv, hq // hkv * t, n, 5, d=d, block_size=bs)
  f = lambda q, k, v, sel: mgpu.sparse_partial(q, k, v, sel, block_size=bs, scale=0.088,
                                               semantics=semantics, **cfg)
  text = jax.jit(f).trace(qg, kv, kv, sel).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def _i32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def _cuda_lowering_shapes(layout: str):
  """q, k/v and a normalised selection of one 32K step (batch 1, 32 queries, block 64)."""
  hq, hkv = {"llada8b": (32, 32), "dream7b": (28, 4)}[layout]
  b, t, d, s, n = 1, 32, 128, 33024, 256
  q = jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
  return q, kv, sa.Selection(_i32(b, hkv, n), _i32(b, hkv), _i32(b), _i32(b), _i32(b))


@pytest.mark.parametrize("layout", ["llada8b", "dream7b"])
@pytest.mark.parametrize("kernel_config", [None, dict(num_wgs=4), dict(fused_merge=False)])
def test_mosaic_gpu_attention_lowers_for_cuda(layout, kernel_config):
  # The public entry: the kernel and Triton's merge (or XLA's), with the lse. A tiling override
  # re-derives the blocks per step: 4 consumers with 128-key steps would not fit in shared memory.
  q, kv, sel = _cuda_lowering_shapes(layout)
  i32, b, bs = _i32, 1, 64
  f = functools.partial(sa.block_sparse_attention_normalized, block_size=bs,
                        implementation="mosaic_gpu", max_response_len=256, return_lse=True,
                        kernel_config=kernel_config)
  text = jax.jit(f).trace(q, kv, kv, sel, query_counts=i32(b)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert ("block_sparse_attention_merge" in text) == (kernel_config != dict(fused_merge=False))


@pytest.mark.parametrize("layout", ["llada8b", "dream7b"])
def test_mosaic_gpu_focus_call_lowers_for_cuda(layout):
  # Focus's sparse layer: 32 sinks as cache rows (deduplicated), padded query slots.
  q, kv, sel = _cuda_lowering_shapes(layout)
  i32, b = _i32, 1
  f = functools.partial(sa.block_sparse_attention_normalized, block_size=64,
                        implementation="mosaic_gpu", max_response_len=256, dedup_extra=True)
  text = jax.jit(f).trace(q, kv, kv, sel, extra_positions=i32(b, 32),
                          extra_valid=jax.ShapeDtypeStruct((b, 32), jnp.bool_),
                          query_counts=i32(b)).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "block_sparse_attention_merge" in text


@pytest.mark.parametrize("merge", [dict(merge_rows=12), dict(merge_d=48)])
def test_merge_kernel_refuses_a_tiling_that_would_leave_rows_or_channels_unwritten(merge):
  # Triton refuses these shapes when lowering; interpret mode would return wrong values instead.
  args, bs = make_case(5, b=1, hq=8, hkv=2, t=6, n=4, extra=False)
  with pytest.raises(ValueError, match="merge tiling"):
    sa.block_sparse_attention(*args, block_size=bs, implementation="pallas_gpu", interpret=True,
                              kernel_config=dict(block_m=16, num_splits=2, **merge))


@pytest.mark.parametrize("layout", ["llada8b", "dream7b"])
@pytest.mark.parametrize("return_lse,merge", [
    (False, {}), (True, {}), (True, dict(merge_d=32)),
    (True, dict(num_splits=17))])  # 17 splits: runs of 16 + 1
def test_pallas_gpu_lowers_for_cuda(layout, return_lse, merge):
  # The Triton lowering runs in Python on any host: the split-KV kernel and the merge kernel's
  # scatter of rows into [T * Hq, D] (interpret mode does not check what Triton accepts).
  q, kv, sel = _cuda_lowering_shapes(layout)
  i32, b, bs = _i32, 1, 64
  f = functools.partial(sa.block_sparse_attention_normalized, block_size=bs,
                        implementation="pallas_gpu", max_response_len=256, dedup_extra=True,
                        return_lse=return_lse, kernel_config=merge or None)
  text = jax.jit(f).trace(q, kv, kv, sel, extra_positions=i32(b, 8),
                          extra_valid=jax.ShapeDtypeStruct((b, 8), jnp.bool_),
                          query_counts=i32(b)).lower(lowering_platforms=("cuda",)).as_text()
  assert "block_sparse_attention_merge" in text and "block_sparse_attention_split_kv" in text


def test_mosaic_gpu_large_logits():
  # Scores spread over hundreds: any rescaling not relative to the running max overflows.
  args, bs = make_case(341, b=1, hq=4, hkv=2, t=4, d=64, s=640, bs=64, n=8, extra=False,
                       dtype=jnp.bfloat16)
  up = _upcast(args)
  ref = np.asarray(_jit(sa.reference_block_sparse_attention, block_size=bs, scale=16.0)(*up))
  out = _jit(sa.block_sparse_attention, block_size=bs, scale=16.0, implementation="mosaic_gpu",
             interpret=True, kernel_config=dict(num_splits=1))(*args)
  out = np.asarray(out, np.float32)
  assert np.all(np.isfinite(out))
  assert np.abs(out - ref).max() < 2e-2 * np.abs(ref).max()


@pytest.mark.parametrize("impl,kw", [("xla_gather", {}), ("pallas_gpu", {"interpret": True})])
def test_distinct_selection_clips_counts_and_ids_into_range(impl, kw):
  """A broken `distinct_selection` promise (a count above N or below 0, an id outside the
  cache) must not make a kernel repeat a block, skip response blocks or read outside the cache:
  counts are clipped into [0, N] ("all" / "none", as the reference reads them) and ids into the
  cache's blocks."""
  args, bs = make_case(31, b=1, t=1, hq=2, hkv=1, d=16, s=64, bs=16, n=2, extra=False)
  q, k, v, _, _, _, _, _ = args
  idx = jnp.asarray([[[0, 1]]], jnp.int32)
  ps, rs, re = (jnp.asarray([x], jnp.int32) for x in (0, 40, 64))
  for count in (3, -1):
    cnt = jnp.asarray([[count]], jnp.int32)
    ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(
        q, k, v, idx, jnp.clip(cnt, 0, 2), ps, rs, re)
    out = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl,
               distinct_selection=True, **kw)(q, k, v, idx, cnt, ps, rs, re)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
  sel = sa.selection_of_distinct(jnp.asarray([[[-4, 9]]], jnp.int32), jnp.asarray([[2]]),
                                 ps, rs, re, block_size=bs, seq_len=64)
  np.testing.assert_array_equal(np.asarray(sel.indices), [[[0, 3]]])


@pytest.mark.parametrize("impl,kw", [("xla_gather", {}), ("pallas_gpu", {"interpret": True})])
def test_empty_response_window_and_empty_selection(impl, kw):
  """A response bound of 0 (no response region: response_start = response_end = S) and a
  selection list of length 0 are contract inputs: no error, the reference's answer."""
  args, bs = make_case(32, b=2, t=3, hq=4, hkv=2, d=16, s=128, bs=16, n=4, extra=True)
  q, k, v, idx, cnt, ps, _, _, *extra = args
  end = jnp.full((2,), 128, jnp.int32)
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(q, k, v, idx, cnt, ps, end,
                                                                  end, *extra)
  out = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl, max_response_len=0,
             **kw)(q, k, v, idx, cnt, ps, end, end, *extra)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
  none = jnp.zeros((2, 2, 0), jnp.int32), jnp.zeros((2, 2), jnp.int32)
  rs, re = args[6], args[7]
  ref = _jit(sa.reference_block_sparse_attention, block_size=bs)(q, k, v, *none, ps, rs, re,
                                                                  *extra)
  out = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl, **kw)(
      q, k, v, *none, ps, rs, re, *extra)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl,kw", [("xla_gather", {}), ("pallas_gpu", {"interpret": True}),
                                     ("pallas_gpu", {"interpret": True,
                                                     "kernel_config": {"static_loop": True}})])
def test_an_understated_response_bound_cuts_the_response_alike_everywhere(impl, kw):
  """`max_response_len` below a row's response: every implementation attends the response's
  first `max_response_len` keys (the XLA window's reading), none drops selected blocks."""
  args, bs = make_case(33, b=1, t=2, hq=2, hkv=1, d=16, s=128, bs=16, n=3, extra=False)
  q, k, v, idx, cnt, ps, _, _ = args
  rs, re = jnp.asarray([64], jnp.int32), jnp.asarray([128], jnp.int32)
  want = _jit(sa.reference_block_sparse_attention, block_size=bs)(q, k, v, idx, cnt, ps, rs,
                                                                   rs + 16)
  out = _jit(sa.block_sparse_attention, block_size=bs, implementation=impl, max_response_len=16,
             **kw)(q, k, v, idx, cnt, ps, rs, re)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=2e-5)
