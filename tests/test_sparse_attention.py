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


def brute_force(args, bs, scale=None):
  """A per-row Python loop over explicit key sets, float64: independent of the reference."""
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
  return out


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
