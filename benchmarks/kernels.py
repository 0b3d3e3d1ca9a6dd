"""Block-sparse attention kernels on a GPU: correctness, tuning, and the sweep of issue 4.

Run on the GPU machine (phases chosen with --phases, results as JSON under --out):
  check  every implementation vs the float32 reference on random bf16 inputs (small shapes)
  copy   the device copy bandwidth (bytes read + written), the ceiling for the targets
  tune   GPU kernel tilings at 32K, alpha 0.5, 32 queries, both layouts
  waves  the default KV split count (one wave of resident programs) against its neighbours
  live   the kernel and its merge as a Focus step calls it (32 query slots, 7 or 32 live) over
         KV split counts, row tiles and merge forms
  focus_call  a sparse layer exactly as Focus calls it (32 slots, 7 live, 32 sinks given as
         cache rows and deduplicated): each GPU kernel checked and timed
  matmul  a cached step's GEMMs (few rows x a large weight): XLA against the weight-streaming
         Pallas kernel over a sweep of its tilings (`kernels/matmul.py`)
  mgpu_dense  the refresh's dense attention at 32K: cuDNN vs JAX's Mosaic GPU (FA3-style) kernel
  fp8_dense  the refresh's dense attention in fp8 (`RefreshPolicy.fp8_attention`) against
         bfloat16: cuDNN's time for each, and each one's error (and the XLA emulation's)
  fp8_matmul  a 32K refresh's projections in fp8 (`RefreshPolicy.fp8_matmul`) against
         bfloat16: time and error
  fp8_gemm_forms  which way of writing an fp8 GEMM XLA makes into cuBLASLt's fp8 GEMM
  dense_padded  a padded batch's 32K refresh attention: valid-first keys with lengths against
         cuDNN's [B, 1, T, S] pad bias and the unpadded call
  mgpu_sparse  the Mosaic GPU (wgmma + TMA) split-KV sparse kernel: correctness against the
         float32 reference, then 32K timing against pallas_gpu and a sweep of its tiling knobs
  relevance  a sparse layer's prompt-block selection (relevance of the focus slots, top alpha):
         XLA against the fused Pallas kernel, per layer, and whether they keep the same blocks
  sweep  LLaDA-8B (32/32 heads) and Dream-7B (28/4) layouts, context 8K..128K, alpha, queries:
         Pallas kernel alone (selection pre-normalised), Pallas end to end, XLA gather end to end,
         dense cuDNN attention over the whole cache
Timing: L layers' worth of distinct K/V buffers (enough to overflow L2) are attended in one jitted
call, so launch overhead is amortised and no layer hits a warm cache; median of several calls after
warm-up, `block_until_ready` around each; reported per layer.
  python benchmarks/kernels.py --plot RESULTS.json   draws the plot next to the JSON (CPU is fine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np


def _import_kernels():
  """focus_jax.kernels, installed or straight from the checkout (the GPU machine has no install)."""
  try:
    from focus_jax.kernels import sparse_attention  # noqa: F401
  except ImportError:
    import types
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pkg = types.ModuleType("focus_jax")  # a bare namespace: kernels need nothing of the rest
    pkg.__path__ = [os.path.join(root, "focus_jax"), root]  # focus_jax.kernels -> <root>/kernels
    sys.modules["focus_jax"] = pkg
  from focus_jax.kernels import dense_attention, sparse_attention
  return sparse_attention, dense_attention


LAYOUTS = {"llada8b": dict(hq=32, hkv=32, d=128), "dream7b": dict(hq=28, hkv=4, d=128)}
GEN = 256  # the response region (generation length) after the prompt
SMOKE = False  # --smoke: tiny shapes in interpret mode, to test this script on a CPU
CTXS = [8192, 16384, 32768, 65536, 131072]
TARGET_CTX = 32768
TUNE_SET = "wide"
CHECK_IMPLS = ["pallas_gpu"]


def timeit(fn, args, reps: int = 7) -> tuple[float, float]:
  """(median seconds per call, compile+first-run seconds). Smoke runs (interpret mode on the CPU,
  where the number is meaningless) make one timed call and no warm-up call."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  if SMOKE:
    reps = 1
  else:
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), first


def make_problem(layout: str, ctx: int, alpha: float, t: int, block_size: int, layers: int,
                 seed: int = 0, per_head: bool = True):
  import jax
  import jax.numpy as jnp
  lay = LAYOUTS[layout]
  hq, hkv, d = lay["hq"], lay["hkv"], lay["d"]
  s_len = ctx + GEN
  key = jax.random.PRNGKey(seed)
  ks = []
  vs = []
  for i in range(layers):
    k1, k2, key = jax.random.split(key, 3)
    ks.append(jax.random.normal(k1, (1, s_len, hkv, d), jnp.bfloat16))
    vs.append(jax.random.normal(k2, (1, s_len, hkv, d), jnp.bfloat16))
  q = jax.random.normal(key, (1, t, hq, d), jnp.bfloat16)
  nbp = ctx // block_size
  n = max(1, round(alpha * nbp))
  g = hkv if per_head else 1
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.permutation(nbp)[:n] for _ in range(g)])[None].astype(np.int32)
  cnt = np.full((1, g), n, np.int32)
  ranges = (jnp.zeros((1,), jnp.int32), jnp.full((1,), ctx, jnp.int32),
            jnp.full((1,), s_len, jnp.int32))
  kv_bytes_read = (n * block_size + GEN) * hkv * d * 2 * 2  # K and V, bf16
  io_bytes = 2 * q.size * 2
  return dict(q=q, ks=ks, vs=vs, idx=jnp.asarray(idx), cnt=jnp.asarray(cnt), ranges=ranges,
              n=n, s_len=s_len, bytes=kv_bytes_read + io_bytes, layers=layers)


def layers_for(layout: str, ctx: int, target_bytes: float = 4e8) -> int:
  if SMOKE:
    return 2
  lay = LAYOUTS[layout]
  per_layer = (ctx + GEN) * lay["hkv"] * lay["d"] * 4
  return int(min(16, max(2, math.ceil(target_bytes / per_layer))))


def target_problem(layout: str, block_size: int):
  """The issue's target case (32K, alpha 0.5, 32 queries) and the GPU kernel's default tiling
  for it: (problem, default kernel_config)."""
  from focus_jax.kernels.sparse import gpu  # pylint: disable=g-import-not-at-top
  lay = LAYOUTS[layout]
  p = make_problem(layout, TARGET_CTX, 0.5, 32, block_size, layers_for(layout, TARGET_CTX))
  n_resp = -(-GEN // block_size) + 1
  return p, gpu.default_config(1, lay["hkv"], lay["hq"] // lay["hkv"] * 32, p["n"], n_resp)


def sparse_fn(sa, impl: str, block_size: int, normalized: bool, cfg: dict | None = None):
  import jax

  def run(q, ks, vs, idx, cnt, ranges):
    outs = []
    ps, rs, re = ranges
    if normalized:
      sel = sa.normalize_selection(idx, cnt, ps, rs, re, block_size=block_size,
                                   seq_len=ks[0].shape[1])
    for k, v in zip(ks, vs):
      if normalized:
        o = sa.block_sparse_attention_normalized(q, k, v, sel, block_size=block_size,
                                                 implementation=impl, max_response_len=GEN,
                                                 kernel_config=cfg, interpret=SMOKE)
      else:
        o = sa.block_sparse_attention(q, k, v, idx, cnt, ps, rs, re, block_size=block_size,
                                      implementation=impl, max_response_len=GEN,
                                      kernel_config=cfg, interpret=SMOKE)
      outs.append(o)
    return outs
  return jax.jit(run)


def sparse_layers(sa, impl: str, block_size: int, normalized: bool, cfg: dict | None = None,
                  query_counts=None, sinks=None):
  """(prep, layers): prep runs once per call (outside the timed loop), layers once per iteration.

  With `normalized`, the selection is normalised in prep (the kernel alone is timed); otherwise
  every layer normalises its own selection (end to end). `query_counts` [B]: live queries.
  `sinks` (positions [B, E], validity [B, E]): extra keys given as cache rows, deduplicated
  against the selection, as Focus passes its attention sinks."""
  extra = {} if sinks is None else dict(extra_positions=sinks[0], extra_valid=sinks[1],
                                         dedup_extra=True)

  def prep(idx, cnt, ranges, s_len):
    if normalized:
      return (sa.normalize_selection(idx, cnt, *ranges, block_size=block_size, seq_len=s_len),)
    return (idx, cnt, *ranges)

  def layers(q, ks, vs, *sel):
    outs = []
    for k, v in zip(ks, vs):
      if normalized:
        o = sa.block_sparse_attention_normalized(q, k, v, sel[0], block_size=block_size,
                                                 implementation=impl, max_response_len=GEN,
                                                 kernel_config=cfg, interpret=SMOKE,
                                                 query_counts=query_counts, **extra)
      else:
        o = sa.block_sparse_attention(q, k, v, *sel, block_size=block_size,
                                      implementation=impl, max_response_len=GEN,
                                      kernel_config=cfg, interpret=SMOKE,
                                      query_counts=query_counts, **extra)
      outs.append(o)
    return outs
  return prep, layers


def dense_layers(da):
  def prep(idx, cnt, ranges, s_len):
    return ()

  def layers(q, ks, vs):
    return [da.attention(q, k, v, implementation="cudnn") for k, v in zip(ks, vs)]
  return prep, layers


def per_iteration_time(prep, layers, p, r_hi: int = 5, reps: int = 5) -> tuple[float, float]:
  """Seconds per loop iteration (all layers once), free of per-call costs, and compile seconds.

  One jitted call runs r iterations of a `fori_loop`; each iteration attends every layer and
  feeds a 1e-30 multiple of the outputs back into q (a real dependency: nothing is hoisted or
  dropped). (t(r_hi) - t(1)) / (r_hi - 1) removes dispatch, host sync and prep.
  """
  return _iteration_timer(prep, layers, p, r_hi, reps)()


def loop_overhead(p) -> float:
  """Per-iteration cost of the timing loop itself (the feedback add, the loop's own step)."""
  t, _ = per_iteration_time(lambda *a: (), lambda q, ks, vs: [q], p)
  return t


def dense_fn(da):
  import jax

  def run(q, ks, vs):
    return [da.attention(q, k, v, implementation="cudnn") for k, v in zip(ks, vs)]
  return jax.jit(run)


def random_check_case(sa, rng, case):
  """Random bf16 inputs of one check case (name, b, t, hq, hkv, d, s, bs, n, g, pattern, extra)
  and the float32 reference's output (float64). Shared by the check and mgpu_sparse phases."""
  import jax.numpy as jnp
  _, b, t, hq, hkv, d, s, bs, n, gm, pattern, extra = case
  g = hkv if gm == "hkv" else 1
  nb = -(-s // bs)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = jnp.asarray(f32(b, t, hq, d), jnp.bfloat16)
  k = jnp.asarray(f32(b, s, hkv, d), jnp.bfloat16)
  v = jnp.asarray(f32(b, s, hkv, d), jnp.bfloat16)
  idx = rng.integers(0, nb, (b, g, n))
  cnt = rng.integers(n // 2, n + 1, (b, g))
  ps = rng.integers(0, s // 8, (b,))
  rs = rng.integers(s // 2, s - 64, (b,))
  re = np.minimum(rs + rng.integers(0, 300, (b,)), s)
  if pattern == "dup":
    idx[..., 1::2] = idx[..., ::2][..., : idx[..., 1::2].shape[-1]]
  elif pattern == "oob":
    idx = rng.integers(-5, nb + 5, (b, g, n))
  elif pattern == "empty":
    cnt[:] = 0
  elif pattern == "no_keys":
    cnt[:] = 0
    re = rs.copy()
  elif pattern == "all":
    idx = np.broadcast_to(np.arange(n) % nb, (b, g, n)).copy()
    cnt[:] = n
  elif pattern == "padded":
    cnt = rng.integers(0, n + 3, (b, g))
  args = [q, k, v, jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32),
          jnp.asarray(ps, jnp.int32), jnp.asarray(rs, jnp.int32), jnp.asarray(re, jnp.int32)]
  if extra:
    e = 24
    args += [jnp.asarray(f32(b, e, hkv, d), jnp.bfloat16),
             jnp.asarray(f32(b, e, hkv, d), jnp.bfloat16),
             jnp.asarray(rng.random((b, e)) < 0.6)]
  ref = np.asarray(sa.reference_block_sparse_attention(*args, block_size=bs), np.float64)
  return args, bs, ref


# ------------------------------------------------------------------------------------------------
def phase_check(sa) -> list[dict]:
  import jax
  import jax.numpy as jnp
  rows = []
  rng = np.random.default_rng(1)
  cases = [
      # (b, t, hq, hkv, d, s, bs, n, g, pattern, extra)
      (2, 8, 4, 4, 128, 4096, 64, 16, "hkv", "random", False),
      (1, 32, 32, 32, 128, 8192, 64, 40, "hkv", "random", True),
      (2, 32, 28, 4, 128, 8448, 64, 50, "hkv", "random", True),
      (2, 64, 28, 4, 128, 8448, 64, 50, "one", "dup", False),
      (1, 17, 8, 2, 64, 3000, 32, 30, "hkv", "oob", True),
      (2, 8, 8, 8, 128, 4096, 128, 8, "one", "empty", False),
      (1, 32, 16, 4, 128, 4096, 16, 200, "hkv", "all", False),
      (3, 5, 6, 2, 128, 2048, 64, 12, "hkv", "padded", True),
  ]
  if SMOKE:
    cases = cases[-2:]
  for case in cases:
    b, t, hq, hkv, d, s, bs, n, gm, pattern, extra = case
    g = hkv if gm == "hkv" else 1
    args, bs, ref = random_check_case(sa, rng, ("", *case))
    for impl in CHECK_IMPLS:
      try:
        out = np.asarray(jax.jit(lambda *a: sa.block_sparse_attention(
            *a, block_size=bs, implementation=impl, interpret=SMOKE))(*args), np.float64)
        err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
        ok = bool(np.all(np.isfinite(out)) and (err < 1e-2 or np.linalg.norm(ref) == 0))
        if np.linalg.norm(ref) == 0:
          ok = ok and float(np.abs(out).max()) == 0.0
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        err, ok = repr(e)[:300], False
      row = dict(case=f"b{b} t{t} h{hq}/{hkv} d{d} s{s} bs{bs} n{n} g{g} {pattern} extra={extra}",
                 impl=impl, rel_err=err, ok=ok)
      print("CHECK", row, flush=True)
      rows.append(row)
  return rows


def phase_copy() -> dict:
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.PRNGKey(0), (1 << (20 if SMOKE else 30),), jnp.bfloat16)
  f = jax.jit(lambda a: a + jnp.bfloat16(1))
  t, _ = timeit(f, (x,), reps=10)
  bw = 2 * x.size * 2 / t
  print(f"COPY {bw / 1e12:.3f} TB/s ({t * 1e3:.3f} ms for 2 x 2 GiB)", flush=True)
  return dict(copy_tb_s=bw / 1e12, seconds=t)


def tune_configs(layout: str) -> list[dict]:
  out = []
  if SMOKE:
    return [dict(block_m=32, num_splits=2, num_warps=4, num_stages=2, static_loop=True)]
  if TUNE_SET == "diag":
    return DIAG_CFGS[layout]
  if layout == "llada8b":
    for bm in (32,):
      for sp in (4, 8, 16, 32):
        for nw in (4, 8):
          for ns in (2, 3):
            out.append(dict(block_m=bm, num_splits=sp, num_warps=nw, num_stages=ns))
  else:
    for bm, nw in ((32, 4), (64, 4), (128, 8), (256, 8)):
      for sp in (8, 16, 32, 64):
        for ns in (2, 3):
          out.append(dict(block_m=bm, num_splits=sp, num_warps=nw, num_stages=ns))
  return out


def phase_tune(sa, block_size: int) -> list[dict]:
  rows = []
  for layout in LAYOUTS:
    layers = layers_for(layout, TARGET_CTX)
    p = make_problem(layout, TARGET_CTX, 0.5, 32, block_size, layers)
    args = (p["q"], p["ks"], p["vs"], p["idx"], p["cnt"], p["ranges"])
    jobs = [("pallas_gpu", c) for c in [None] + tune_configs(layout)]
    if "jax_triton" in CHECK_IMPLS and TUNE_SET == "diag":
      jobs += [("jax_triton", c) for c in tune_configs(layout) if not c.get("static_loop")
               and not c.get("prefetch")]
    for impl, cfg in jobs:
      try:
        t, first = timeit(sparse_fn(sa, impl, block_size, True, cfg), args)
        t /= layers
        row = dict(layout=layout, impl=impl, cfg=cfg or "default", us=t * 1e6,
                   tb_s=p["bytes"] / t / 1e12, compile_s=first)
      except Exception as e:  # noqa: BLE001
        row = dict(layout=layout, impl=impl, cfg=cfg or "default", error=repr(e)[:300])
      print("TUNE", row, flush=True)
      rows.append(row)
  return rows


def phase_waves(sa, block_size: int, rounds: int = 3) -> list[dict]:
  """KV splits around one wave of resident programs (kernel alone, per layer, 32K, alpha 0.5).

  The default takes the largest split count whose programs fit in one wave; this measures that
  choice against half, one more, and twice as many splits. Rounds are interleaved and the median
  kept: single timings of a ~100 us layer vary by 10-20% between runs.
  """
  from focus_jax.kernels.sparse import common, gpu
  rows = []
  for layout in LAYOUTS:
    lay = LAYOUTS[layout]
    p, base = target_problem(layout, block_size)
    layers = p["layers"]
    units = lay["hkv"] * -(-(lay["hq"] // lay["hkv"] * 32) // base["block_m"])
    one_wave = gpu.PROGRAMS_PER_SM * gpu.num_sms() // units
    splits = sorted({max(1, one_wave // 2), one_wave, one_wave + 1, 2 * one_wave})
    if SMOKE:
      splits, rounds = [1], 1
    over = loop_overhead(p)
    times = {sp: [] for sp in splits}
    for _ in range(rounds):
      for sp in splits:
        cfg = dict(base, num_splits=sp)
        t, _ = per_iteration_time(*sparse_layers(sa, "pallas_gpu", block_size, True, cfg), p)
        times[sp].append((t - over) / layers)
    for sp in splits:
      t = statistics.median(times[sp])
      row = dict(layout=layout, cfg=dict(base, num_splits=sp), programs=units * sp,
                 one_wave=sp <= one_wave, default=sp == base["num_splits"], us=t * 1e6,
                 tb_s=p["bytes"] / t / 1e12, us_rounds=[x * 1e6 for x in times[sp]])
      print("WAVES", row, flush=True)
      rows.append(row)
  return rows


def live_configs(base: dict, layout: str) -> list[dict]:
  """Tilings around the default for a step with few live queries: the merge kernel's tiles
  (rows x head-dim chunk per program), the split kernel's pipeline depth and warps, one split
  count below, and the XLA merge instead of the kernel."""
  out = [base] + [dict(base, merge_rows=rows, merge_d=d)
                  for rows, d in ((8, 32), (4, 64), (4, 32))]
  if layout == "dream7b":  # four row tiles: a taller merge tile
    out.append(dict(base, merge_rows=16, merge_d=32))
  out += [dict(base, num_stages=2), dict(base, num_stages=4), dict(base, num_warps=8),
          dict(base, num_splits=max(1, base["num_splits"] // 2)), dict(base, fused_merge=False)]
  return out


def phase_live(sa, block_size: int, live_counts=(7, 32), rounds: int = 2) -> list[dict]:
  """The split-KV kernel with its merge, as a Focus step calls it: 32K, alpha 0.5, 32 query
  slots of which `live` are live (`query_counts`; a timed Dream step has about 7), over a sweep
  of tilings (`live_configs`). Per layer, interleaved rounds, median."""
  import jax.numpy as jnp
  rows = []
  for layout in LAYOUTS:
    p, base = target_problem(layout, block_size)
    cfgs = [base] if SMOKE else live_configs(base, layout)
    over = loop_overhead(p)
    for live in live_counts:
      counts = jnp.full((1,), live, jnp.int32)
      # 20 timed iterations, not 4: rounds of one tiling spread up to 6 us on a 21-27 us layer
      # with the default loop length (kernels_h200_live_merge.json).
      timers = [_iteration_timer(*sparse_layers(sa, "pallas_gpu", block_size, True, c, counts),
                                 p, r_hi=2 if SMOKE else 21, reps=7) for c in cfgs]
      times = [[] for _ in cfgs]
      for _ in range(1 if SMOKE else rounds):
        for i, timer in enumerate(timers):
          times[i].append((timer()[0] - over) / p["layers"])
      for cfg, ts in zip(cfgs, times):
        t = statistics.median(ts)
        row = dict(layout=layout, live_queries=live, cfg=cfg, default=cfg == base,
                   us=t * 1e6, tb_s=p["bytes"] / t / 1e12, us_rounds=[x * 1e6 for x in ts])
        print("LIVE", json.dumps(row), flush=True)
        rows.append(row)
  return rows


def focus_call_impls() -> list[tuple[str, dict | None]]:
  """The kernels a Focus sparse layer can run: the Triton split-KV kernel (the default) and the
  Mosaic GPU one, with its default tiling and with one consumer (64-row tiles: a step's ~49 live
  rows of Dream fill one). Smoke: the Triton kernel only. Mosaic GPU's interpreter took half a
  minute for one Dream layer there; the same call (sinks deduplicated, live query counts) is
  checked interpreted by tests/test_sparse_attention.py."""
  mosaic = [] if SMOKE else [("mosaic_gpu", None), ("mosaic_gpu", dict(num_wgs=1))]
  return [("pallas_gpu", None)] + mosaic


def phase_focus_call(sa, block_size: int, live: int = 7, n_sink: int = 32,
                     rounds: int = 3) -> list[dict]:
  """A sparse layer exactly as Focus calls it: 32K, alpha 0.5, 32 query slots of which `live`
  are live, and `n_sink` sinks given as cache rows (positions, half of them inside kept blocks,
  deduplicated against the selection). Each implementation of `focus_call_impls` is checked on
  the first layer against the float32 reference, then timed per layer (interleaved rounds of
  21-iteration loops, median), both layouts."""
  import jax
  import jax.numpy as jnp
  rows = []
  for layout in LAYOUTS:
    p, _ = target_problem(layout, block_size)
    rng = np.random.default_rng(11)
    pos = rng.integers(0, TARGET_CTX, (1, n_sink))
    kept = np.asarray(p["idx"])[0, 0]  # kv head 0's blocks: those sinks are attended twice
    pos[0, ::2] = np.resize(kept, n_sink // 2) * block_size + rng.integers(0, block_size,
                                                                    n_sink // 2)
    sinks = (jnp.asarray(pos, jnp.int32), jnp.ones((1, n_sink), bool))
    counts = jnp.full((1,), live, jnp.int32)
    args = (p["q"], p["ks"][0], p["vs"][0], p["idx"], p["cnt"], *p["ranges"])
    ref = np.asarray(jax.jit(lambda *a: sa.reference_block_sparse_attention(
        *[x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in a],
        block_size=block_size, extra_positions=sinks[0], extra_valid=sinks[1], dedup_extra=True,
        query_counts=counts))(*args), np.float64)
    over = loop_overhead(p)
    jobs = []
    for impl, cfg in focus_call_impls():
      row = dict(layout=layout, live_queries=live, sinks=n_sink, impl=impl, cfg=cfg or "default")
      try:
        prep, layers = sparse_layers(sa, impl, block_size, True, cfg, counts, sinks)
        out = jax.jit(lambda q, k, v, idx, cnt, *r: layers(
            q, [k], [v], *prep(idx, cnt, r, k.shape[1]))[0])(*args)
        out = np.asarray(out, np.float64)
        row["max_rel_err"] = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
        row["ok"] = bool(np.all(np.isfinite(out)) and row["max_rel_err"] < 2e-2)
        jobs.append((row, _iteration_timer(prep, layers, p, r_hi=2 if SMOKE else 21,
                                           reps=1 if SMOKE else 7)))
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row.update(ok=False, error=repr(e)[:300])
      rows.append(row)
    for _ in range(1 if SMOKE else rounds):
      for row, timer in jobs:
        row.setdefault("us_rounds", []).append((timer()[0] - over) / p["layers"] * 1e6)
    for row, _ in jobs:
      row.update(us=statistics.median(row["us_rounds"]),
                 tb_s=p["bytes"] / (statistics.median(row["us_rounds"]) * 1e-6) / 1e12)
      print("FOCUS_CALL", json.dumps(row), flush=True)
  return rows


def phase_relevance(block_size: int, rounds: int = 3) -> list[dict]:
  """A sparse layer's prompt-block selection as a Focus step runs it (32 query slots of which 4
  hold I_focus, Quest-bound representatives, alpha 0.5): XLA (relevance GEMM, softmax, top_k)
  against the fused Pallas kernel, per layer, at 32K for both layouts and at 8K with batch 8
  for LLaDA-8B. Checks that both keep the same blocks and relevance."""
  import jax
  import jax.numpy as jnp
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from focus_jax.focus import pruning
  grid = [("llada8b", 32768, 1), ("dream7b", 32768, 1), ("llada8b", 8192, 8)]
  if SMOKE:
    grid = [("dream7b", 2048, 1), ("llada8b", 1024, 2)]
  rows = []
  for layout, ctx, bsz in grid:
    lay = LAYOUTS[layout]
    hq, hkv, d = lay["hq"], lay["hkv"], lay["d"]
    nb = ctx // block_size
    layers = 2 if SMOKE else 16
    key = jax.random.PRNGKey(0)
    reps = []
    for _ in range(layers):
      k1, key = jax.random.split(key)
      r = jax.random.normal(k1, (bsz, hkv, nb, 2 * d), jnp.bfloat16)  # head-major
      reps.append(r.at[..., d:].set(jnp.abs(r[..., d:])))
    q = jax.random.normal(key, (bsz, 32, hq, d), jnp.bfloat16)
    focus = jnp.zeros((bsz, 32), bool).at[:, :4].set(True)  # the indicator packs focus first
    valid = jnp.ones((bsz, nb), bool)
    p = dict(q=q, ks=reps, vs=reps, idx=focus, cnt=valid, ranges=())

    def layers_of(impl):
      def layer_fn(qc, ks, vs, f, v):
        sel = [pruning.select_prompt_blocks(qc, f, r, v, alpha=0.5, selection="per_kv_head",
                                            kind="bound", implementation=impl) for r in ks]
        return [jnp.zeros_like(qc) + jnp.sum(i[0]) + jnp.sum(i[1]) for i in sel]
      return (lambda f, v, ranges, s_len: (f, v)), layer_fn

    picked = {impl: pruning.select_prompt_blocks(q, focus, reps[0], valid, alpha=0.5,
                                                 selection="per_kv_head", kind="bound",
                                                 implementation=impl)
              for impl in ("xla", "pallas_gpu")}
    counts = np.asarray(picked["xla"][1])
    same = bool(np.array_equal(counts, np.asarray(picked["pallas_gpu"][1])))
    for b in range(bsz):
      for h in range(hkv):
        n = counts[b, h]
        same &= sorted(np.asarray(picked["xla"][0])[b, h, :n].tolist()) == sorted(
            np.asarray(picked["pallas_gpu"][0])[b, h, :n].tolist())
    over = loop_overhead(p)
    times = {"xla": [], "pallas_gpu": []}
    for _ in range(1 if SMOKE else rounds):
      for impl in times:
        t, _ = per_iteration_time(*layers_of(impl), p)
        times[impl].append((t - over) / layers)
    row = dict(layout=layout, context=ctx, batch=bsz, kv_heads=hkv, query_slots=32,
               focus_slots=4, blocks=nb, kept=pruning.kept_blocks(nb, 0.5),
               xla_us=statistics.median(times["xla"]) * 1e6,
               pallas_us=statistics.median(times["pallas_gpu"]) * 1e6, same_blocks=same)
    print("RELEVANCE", row, flush=True)
    rows.append(row)
  return rows


MASS_TILINGS = [(64, 4), (128, 4), (128, 8), (256, 4), (256, 8), (512, 8)]  # (key tile, warps)


def phase_mass(rounds: int = 3) -> list[dict]:
  """The sink layer's column sums (`kernels/attention_mass.py`), 32 queries: the XLA einsum
  (which transposes the cache for its batched GEMM) against the Pallas kernel that reads K in
  place, with a sweep of its (key tile, warps); then the whole sink layer
  (`attention_with_sink_scores`): the one-pass XLA softmax against split-KV attention + mass.
  LLaDA-8B and Dream-7B layouts at 8K and 32K, and LLaDA at 8K with batch 8.
  Correctness: max |pallas - xla| / max |xla| with lse over all keys. TB/s over K's bytes."""
  import jax
  import jax.numpy as jnp
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from focus_jax.focus import sinks
  from focus_jax.kernels import attention_mass as am
  rows = []
  grid = [("llada8b", 8192, 1), ("llada8b", 8192, 8), ("llada8b", 32768, 1),
          ("dream7b", 8192, 1), ("dream7b", 32768, 1)]
  tilings = MASS_TILINGS
  if SMOKE:
    grid, tilings = [("dream7b", 512, 1), ("llada8b", 512, 2)], MASS_TILINGS[:2]
  for layout, ctx, bsz in grid:
    lay = LAYOUTS[layout]
    hq, hkv, d = lay["hq"], lay["hkv"], lay["d"]
    s_len = ctx + GEN
    layers = 2 if SMOKE else (4 if bsz > 1 else 8)
    key = jax.random.PRNGKey(0)
    ks = []
    for _ in range(layers):
      k1, key = jax.random.split(key)
      ks.append(jax.random.normal(k1, (bsz, s_len, hkv, d), jnp.bfloat16))
    q = jax.random.normal(key, (bsz, 32, hq, d), jnp.bfloat16)
    logits = jnp.einsum("bthd,bshd->bths", q, jnp.repeat(ks[0], hq // hkv, axis=2),
                        preferred_element_type=jnp.float32) * d ** -0.5
    lse = jax.nn.logsumexp(logits, axis=-1)
    del logits
    weight = jnp.full((bsz, 32), 1.0 / hq, jnp.float32)
    p = dict(q=q, ks=ks, vs=ks, idx=lse, cnt=weight, ranges=())
    passthrough = lambda lse_, w, ranges, s: (lse_, w)

    def mass_layers(impl, **knobs):
      def layer_fn(qc, ks_, vs_, l_, w_):
        if impl == "xla":
          masses = [am.attention_mass(qc, k, l_, w_, implementation="xla") for k in ks_]
        else:
          masses = [am.attention_mass_pallas(qc, k, l_, w_, scale=d ** -0.5, interpret=SMOKE,
                                             **knobs) for k in ks_]
        return [jnp.zeros_like(qc) + jnp.sum(m) for m in masses]
      return layer_fn

    def sink_layers(impl):
      def layer_fn(qc, ks_, vs_, l_, w_):
        valid = jnp.ones(qc.shape[:2], bool)
        outs = []
        for k in ks_:
          o, sc = sinks.attention_with_sink_scores(
              qc, k, k, None, valid, jnp.zeros((bsz,), jnp.int32), ctx, attention_impl=impl)
          outs.append(o + jnp.sum(sc).astype(o.dtype))
        return outs
      return layer_fn

    ref = am.attention_mass(q, ks[0], lse, weight, implementation="xla")
    over = loop_overhead(p)
    configs = {"xla": mass_layers("xla")}
    errs = {}
    for tile, warps in tilings:
      name = f"pallas_t{tile}_w{warps}"
      try:
        out = am.attention_mass_pallas(q, ks[0], lse, weight, scale=d ** -0.5, tile=tile,
                                       num_warps=warps, interpret=SMOKE)
        errs[name] = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        configs[name] = mass_layers("pallas", tile=tile, num_warps=warps)
      except Exception as e:  # a tiling Triton cannot compile: record it, go on
        errs[name] = f"{type(e).__name__}: {str(e)[:120]}"
    default = am.attention_mass(q, ks[0], lse, weight, implementation="pallas_gpu",
                                interpret=SMOKE)
    mass_per_row = float(jnp.sum(default)) / bsz  # = 32 queries: each head's row sums to 1
    configs["sink_xla"] = sink_layers("xla")
    configs["sink_split"] = sink_layers("auto")
    times = {name: [] for name in configs}
    timers = {name: _iteration_timer(passthrough, fn, p) for name, fn in configs.items()}
    for _ in range(1 if SMOKE else rounds):
      for name, timer in timers.items():
        times[name].append((timer()[0] - over) / layers)
    us = {name: statistics.median(v) * 1e6 for name, v in times.items()}
    k_bytes = bsz * s_len * hkv * d * 2
    pallas = {n: t for n, t in us.items() if n.startswith("pallas")}
    best = min(pallas, key=pallas.get)
    row = dict(layout=layout, context=ctx, batch=bsz, kv_heads=hkv, keys=s_len, us=us,
               max_rel_err=errs, mass_per_row=mass_per_row, best_pallas=best,
               best_pallas_tb_s=k_bytes / (us[best] * 1e-6) / 1e12)
    print("MASS", json.dumps(row), flush=True)
    rows.append(row)
    del ks, p
  return rows


MATMUL_SHAPES = {  # (K, N) of a cached step's GEMMs; "swiglu": silu(x @ gate) * (x @ up)
    "llada8b": dict(q_o=(4096, 4096), qkv=(4096, 12288), swiglu=(4096, 12288),
                    gate_up=(4096, 12288), down=(12288, 4096), lm_head=(4096, 126464)),
    "dream7b": dict(q_o=(3584, 3584), k_v=(3584, 512), qkv=(3584, 4608), swiglu=(3584, 18944),
                    down=(18944, 3584), lm_head=(3584, 152064)),
}
MATMUL_TILES = ((64, 128), (64, 256), (64, 512), (128, 64), (128, 128), (128, 256), (256, 64),
                (256, 128))  # (block_n, k_chunk): weight tiles of 16-32K elements (32-64 KB)


def matmul_tilings(k: int, n: int, swiglu: bool):
  """(block_n, k_chunk, programs) grid at 4 warps / 3 stages; `phase_matmul` then sweeps warps
  and stages around the grid's best. SwiGLU has no K split, so no `programs` axis."""
  for block_n, k_chunk in MATMUL_TILES:
    for programs in ((264,) if swiglu else (132, 264, 528)):
      if n % block_n == 0 and k % k_chunk == 0:
        yield dict(block_n=block_n, k_chunk=k_chunk, programs=programs, num_stages=3)


def phase_matmul(rows: int = 32, impls=("xla", "pallas"), label: str = "", rounds: int = 2,
                 layouts=None, gemms=None):
  """The GEMMs of a cached step (`kernels/matmul.py`): `rows` x K times K x N, bf16, and the
  SwiGLU up-projection (two such weights, silu(gate) * up).

  Each timed layer is y_l = op(x + c, w_l) with c = 1e-30 * y_{l-1}[0, 0]: a chain, as in the
  model, where every projection's input comes out of an elementwise op (XLA fuses that op into
  its GEMM; a Pallas call runs it as one more small kernel, so the timing charges it). Every y_l
  is returned from the loop, so XLA cannot shrink a dot to the element the chain reads. L
  distinct weights (>= 400 MB in all: no L2 reuse) per iteration of a fori_loop; per op =
  (t(r=4) - t(r=1)) / 3 / L. TB/s over the weights' bytes."""
  import jax
  import jax.numpy as jnp
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from focus_jax.kernels import matmul as mm
  out = []
  shapes = [(lay, name, kn) for lay, d in MATMUL_SHAPES.items() for name, kn in d.items()
            if (layouts is None or lay in layouts) and (gemms is None or name in gemms)]
  if SMOKE:
    shapes = [("tiny", "square", (512, 256)), ("tiny", "swiglu", (512, 256))]
  for layout, name, (k, n) in shapes:
    is_swiglu = name == "swiglu"
    n_weights = 2 if is_swiglu else 1
    weight_bytes = n_weights * k * n * 2
    layers = 2 if SMOKE else max(2, math.ceil(4e8 / weight_bytes))
    key = jax.random.PRNGKey(0)
    ws = [tuple(0.05 * jax.random.normal(jax.random.fold_in(key, n_weights * i + j), (k, n),
                                         jnp.bfloat16) for j in range(n_weights))
          for i in range(layers)]
    x = jax.random.normal(key, (rows, k), jnp.bfloat16)

    def chain(op):
      def run(r, x0, ws_):
        def body(i, carry):
          c, _ = carry
          ys = []
          for w in ws_:
            y = op(x0 + c.astype(x0.dtype), *w)
            c = 1e-30 * y[0, 0].astype(jnp.float32)
            ys.append(y)
          return c, tuple(ys)
        zeros = tuple(jnp.zeros((rows, n), x0.dtype) for _ in ws_)
        return jax.lax.fori_loop(0, r, body, (jnp.float32(0), zeros))
      f = jax.jit(run)

      def measure():
        t1, first = timeit(f, (jnp.int32(1), x, ws), reps=5)
        t4, _ = timeit(f, (jnp.int32(4), x, ws), reps=5)
        return (t4 - t1) / 3 / layers, first
      return measure

    if is_swiglu:
      xla_op = lambda a, wg, wu: jax.nn.silu(a @ wg) * (a @ wu)
      pallas_op = lambda t: (lambda a, wg, wu: mm.swiglu_pallas(a, wg, wu, tiling=t,
                                                                interpret=SMOKE))
      default = mm.DEFAULT_SWIGLU_TILING
    else:
      xla_op = lambda a, w: a @ w
      pallas_op = lambda t: (lambda a, w: mm.matmul_pallas(a, w, tiling=t, interpret=SMOKE))
      default = mm.DEFAULT_TILING
    ref = np.asarray(jax.jit(xla_op)(x, *ws[0]), np.float32)
    us, errs = {}, {}

    def time_configs(items):
      timers = {}
      for nm, fn in items:
        try:
          got = np.asarray(jax.jit(fn)(x, *ws[0]), np.float32)
          errs[nm] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
          timers[nm] = chain(fn)
        except Exception as e:  # a tiling Triton cannot compile: record it, go on
          errs[nm] = f"{type(e).__name__}: {str(e)[:160]}"
      times = {nm: [] for nm in timers}
      for _ in range(1 if SMOKE else rounds):
        for nm, timer in timers.items():
          times[nm].append(timer()[0])
      us.update({nm: statistics.median(v) * 1e6 for nm, v in times.items()})

    if "xla" in impls:
      time_configs([("xla", xla_op)])
    if "pallas" in impls:
      grid = {f"pallas_n{t['block_n']}_k{t['k_chunk']}_p{t['programs']}": mm.MatmulTiling(**t)
              for t in matmul_tilings(k, n, is_swiglu)}
      time_configs([(nm, pallas_op(t)) for nm, t in grid.items()])
      timed = [nm for nm in grid if nm in us]
      if timed:  # warps and stages around the best grid point
        best = grid[min(timed, key=us.get)]
        extra = []
        for warps, stages in ((8, 3), (4, 2), (4, 4), (8, 4)):
          t = dataclasses.replace(best, num_warps=warps, num_stages=stages)
          extra.append((f"pallas_n{t.block_n}_k{t.k_chunk}_p{t.programs}_w{warps}_s{stages}",
                        pallas_op(t)))
        time_configs(extra)
      if mm.supported((rows, k), (k, n), jnp.bfloat16, default) is None:
        time_configs([("pallas_default", pallas_op(default))])
    row = dict(layout=layout, gemm=name, k=k, n=n, rows=rows, layers=layers, label=label,
               us=us, tb_s={nm: weight_bytes / (v * 1e-6) / 1e12 for nm, v in us.items()},
               max_rel_err=errs)
    ranked = sorted(us, key=us.get)
    row["best"] = ranked[0] if ranked else None
    print("MATMUL", layout, name, label, " ".join(f"{nm}={us[nm]:.1f}" for nm in ranked[:4]),
          "| xla", f"{us.get('xla', float('nan')):.1f}", flush=True)
    out.append(row)
    del ws
  return out


def phase_mgpu_dense(reps: int = 5) -> list[dict]:
  """The refresh's dense attention at 32K: cuDNN against JAX's Mosaic GPU (FA3-style) kernel.

  The Mosaic GPU kernel (`jax.experimental.pallas.ops.gpu.attention_mgpu`) takes float16 only
  (its shared-memory tiles are float16) and has no key mask; it is adopted only if it wins.
  """
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  s_len = TARGET_CTX + GEN
  rows = []
  for layout, lay in LAYOUTS.items():
    for dtype in (jnp.bfloat16, jnp.float16):
      k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
      q = jax.random.normal(k1, (1, s_len, lay["hq"], lay["d"]), dtype)
      k = jax.random.normal(k2, (1, s_len, lay["hkv"], lay["d"]), dtype)
      v = jax.random.normal(k3, (1, s_len, lay["hkv"], lay["d"]), dtype)
      flops = 4 * s_len * s_len * lay["d"] * lay["hq"]
      cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                    implementation="cudnn"))
      jobs = [("cudnn", cudnn)]
      if dtype == jnp.float16:
        for bq, bkv, steps in ((64, 64, 2), (64, 128, 2), (128, 64, 4)):
          cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps)
          jobs.append((f"mosaic_gpu bq{bq} bkv{bkv} steps{steps}",
                       jax.jit(lambda q, k, v, cfg=cfg: am.attention(q, k, v, cfg))))
      for name, fn in jobs:
        try:
          t, _ = timeit(fn, (q, k, v), reps=reps)
          row = dict(layout=layout, dtype=jnp.dtype(dtype).name, impl=name, ms=t * 1e3,
                     tflops=flops / t / 1e12)
        except Exception as e:  # noqa: BLE001
          row = dict(layout=layout, dtype=jnp.dtype(dtype).name, impl=name, error=repr(e)[:300])
        print("MGPU_DENSE", row, flush=True)
        rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------------
# mgpu_sparse: the Mosaic GPU (wgmma + TMA) variant of the split-KV kernel against pallas_gpu.

MGPU_CHECK_CASES = [
    # (name, b, t, hq, hkv, d, s, bs, n, g, pattern, extra)
    ("mha", 1, 32, 32, 32, 128, 8192, 64, 40, "hkv", "random", True),
    ("gqa28/4", 2, 32, 28, 4, 128, 8448, 64, 50, "hkv", "random", True),
    ("gqa28/4 G=1 dup", 2, 64, 28, 4, 128, 8448, 64, 50, "one", "dup", False),
    ("empty", 2, 8, 8, 8, 128, 4096, 128, 8, "one", "empty", False),
    ("no keys", 1, 8, 8, 2, 128, 4096, 64, 8, "hkv", "no_keys", False),
    ("all", 1, 32, 16, 4, 128, 4096, 64, 64, "hkv", "all", False),
    ("padded", 3, 5, 6, 2, 128, 2048, 64, 12, "hkv", "padded", True),
    ("S%bs!=0 d64 oob", 1, 17, 8, 2, 64, 3000, 64, 30, "hkv", "oob", True),
    ("S%bs!=0 bs128", 1, 32, 28, 4, 128, 5000, 128, 20, "hkv", "random", False),
]
# Tilings checked on the GQA case besides the default (each must also be right).
MGPU_CHECK_CFGS = [dict(kv_blocks=2), dict(kv_blocks=2, num_stages=2, num_splits=7),
                   dict(num_wgs=1), dict(num_wgs=2, num_stages=2), dict(num_wgs=1, wg_rows=128),
                   dict(semantics="lane"), dict(semantics="warpgroup"), dict(num_splits=1),
                   dict(num_splits=64), dict(num_wgs=4)]


def _iteration_timer(prep, layers, p, r_hi: int = 5, reps: int = 5):
  """`per_iteration_time` with the jitted loop built once, so interleaved rounds of one config
  reuse its compiled executable: returns a function giving (seconds per iteration, first-call
  seconds). Same loop, same feedback into q, same (t(r_hi) - t(1)) / (r_hi - 1)."""
  import jax
  import jax.numpy as jnp

  def run(r, q, ks, vs, idx, cnt, ranges):
    extra = prep(idx, cnt, ranges, ks[0].shape[1])

    def body(i, qc):
      outs = layers(qc, ks, vs, *extra)
      tot = outs[0].astype(jnp.float32)
      for o in outs[1:]:
        tot = tot + o.astype(jnp.float32)
      return qc + (tot * 1e-30).astype(qc.dtype)
    return jax.lax.fori_loop(0, r, body, q)

  f = jax.jit(run)
  args = (p["q"], p["ks"], p["vs"], p["idx"], p["cnt"], p["ranges"])
  if SMOKE:  # the fewest interpreted iterations that still give a difference
    r_hi = 2

  def measure():
    t_lo, first = timeit(f, (jnp.int32(1), *args), reps=reps)
    t_hi, _ = timeit(f, (jnp.int32(r_hi), *args), reps=reps)
    return (t_hi - t_lo) / (r_hi - 1), first
  return measure


def mgpu_ab_configs(base: dict) -> list[dict]:
  """The A/B of the kernel's later changes, each undone in turn from its default: the fused
  Triton merge (against XLA's), 128-key steps (kv_blocks=2 against 1), FA3's ping-pong between
  the two consumers, and masking only the steps that hold a partial tile."""
  if SMOKE:
    return [dict(base, fused_merge=False)]
  out = [dict(base, fused_merge=False), dict(base, kv_blocks=3 - base["kv_blocks"])]
  if base["num_wgs"] == 2:  # the ping-pong pairs two consumers
    out.append(dict(base, pingpong=False))
  return out + [dict(base, mask_full_steps=True)]


def mgpu_sweep_configs(layout: str, base: dict, hkv: int, rows: int, n_items: int,
                       block_size: int) -> list[dict]:
  """A small sweep of the Mosaic kernel's knobs around its default: blocks per pipeline step
  (128-key Q K^T), ring depth, KV splits (half / twice the one-wave count), Mosaic GPU's
  lowering semantics, consumer warpgroups (rows per program) and rows per warpgroup. Risky
  register splits (3-4 consumers, ~160 / ~112 registers each) come last."""
  from focus_jax.kernels.sparse import mosaic_gpu as mg

  def with_splits(cfg, factor=1.0):  # the rest of the tiling derived as the kernel's caller does
    cfg = mg.default_config(1, hkv, rows, n_items, 0, d=LAYOUTS[layout]["d"],
                            block_size=block_size, **cfg)
    return dict(cfg, num_splits=max(1, int(round(cfg["num_splits"] * factor))))
  tiling = {k: v for k, v in base.items() if k not in ("kv_blocks", "num_splits")}  # retiled
  if SMOKE:
    return [dict(base, num_stages=2)]
  out = [with_splits(dict(base, kv_blocks=3 - base["kv_blocks"], num_stages=ns))
         for ns in (2, 3)]
  out += [with_splits(dict(tiling, num_stages=ns)) for ns in (2, 4) if ns != base["num_stages"]]
  out += [with_splits(base, 0.5), with_splits(base, 2.0)]
  try:  # the semantics the installed jax does not default to (0.10: lane, 0.11: warpgroup)
    from jax.experimental.pallas import mosaic_gpu as plgpu
    lane = plgpu.CompilerParams().lowering_semantics == plgpu.LoweringSemantics.Lane
    out.append(dict(base, semantics="warpgroup" if lane else "lane"))
  except Exception:  # noqa: BLE001
    out.append(dict(base, semantics="lane"))
  if layout == "llada8b":  # 2 stages: 81 KB, two programs per SM if the registers allow
    out.append(with_splits(dict(tiling, num_stages=2), 2.0))
  if layout == "dream7b":
    out += [with_splits(dict(tiling, num_wgs=1)),
            with_splits(dict(tiling, num_wgs=2, wg_rows=128)),
            with_splits(dict(tiling, num_wgs=4)),
            with_splits(dict(tiling, num_wgs=4, num_stages=4))]
  return out


def refresh_qkv(lay: dict, s_len: int, seed: int):
  """Random bf16 q [1, s_len, Hq, D], k and v [1, s_len, Hkv, D] of a layout: a refresh's."""
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, (1, s_len, h, lay["d"]), jnp.bfloat16)
               for key, h in zip(keys, (lay["hq"], lay["hkv"], lay["hkv"])))


def phase_selected_prompt(da, reps: int = 5) -> list[dict]:
  """The refresh's attention at 32K with selected prompt blocks (`kernels.selected_attention`)
  against dense attention (cuDNN on a GPU), per layout and (chunk, keep): time, the share of
  the dense score FLOPs it computes, and its time over dense x that share (the gather's and
  the selection's overhead). A small case checks the batched call against the XLA path."""
  import jax
  import jax.numpy as jnp
  from focus_jax.kernels import selected_attention as sel
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  ctx, block, n_global = (512, 16, 16) if SMOKE else (TARGET_CTX, 128, 64)
  settings = ([(64, 0.25)] if SMOKE else
              [(1024, 0.25), (1024, 0.125), (512, 0.25), (2048, 0.25), (1024, 0.5)])
  rows = []
  for layout, lay in LAYOUTS.items():
    s_len = ctx + GEN
    q, k, v = refresh_qkv(lay, s_len, seed=2)
    dense = jax.jit(lambda q, k, v: da.attention(q, k, v, implementation=impl))
    t_dense, _ = timeit(dense, (q, k, v), reps=reps)
    rows.append(dict(layout=layout, context=ctx, impl=impl, variant="dense", ms=t_dense * 1e3))
    print("SELECTED", rows[-1], flush=True)
    for chunk, keep in settings:
      n_keep = sel.kept_blocks(ctx, chunk, block, keep, n_global)
      share = (ctx * (n_keep * block + s_len - ctx // block * block) + GEN * s_len) / s_len ** 2
      fn = jax.jit(lambda q, k, v, chunk=chunk, keep=keep: sel.selected_prefix_attention(
          q, k, v, prefix=ctx, chunk=chunk, block=block, keep=keep, n_global=n_global,
          implementation=impl))
      t, first = timeit(fn, (q, k, v), reps=reps)
      rows.append(dict(layout=layout, context=ctx, impl=impl, variant="selected", chunk=chunk,
                       keep=keep, block=block, kept_blocks=n_keep, flop_share=share,
                       ms=t * 1e3, compile_s=first, speedup=t_dense / t,
                       over_ideal=t / (t_dense * share)))
      print("SELECTED", rows[-1], flush=True)
      if (chunk, keep) == settings[0]:  # a padded batch's row: keys gathered valid first
        pads = jnp.arange(s_len)[None] >= 64  # 64 left pads
        fn = jax.jit(lambda q, k, v, kv, chunk=chunk, keep=keep: sel.selected_prefix_attention(
            q, k, v, prefix=ctx, chunk=chunk, block=block, keep=keep, n_global=n_global,
            key_valid=kv, implementation=impl))
        t, first = timeit(fn, (q, k, v, pads), reps=reps)
        rows.append(dict(rows[-1], variant="selected_padded", pads=64, ms=t * 1e3,
                         compile_s=first, speedup=t_dense / t, over_ideal=t / (t_dense * share),
                         baseline="unpadded dense, unpadded flop share"))
        print("SELECTED", rows[-1], flush=True)
    # The batched call (kv heads folded into the batch) against the XLA path: unpadded (pages
    # read in place) and with left pads (keys gathered valid first, a length per row). Two
    # sequences (page offsets per sequence), and a tail that ends inside a page (the key count
    # cuts it).
    small, check_chunk = (256, 64) if SMOKE else (2048, 128)
    length = small + GEN + 37
    # (blocks chosen by score besides the forced ones, else the call would be dense)
    assert sel.check_selected(small, length, check_chunk, block, 0.5, n_global) is None
    qs, ks, vs = (jnp.concatenate([x[:, :length], x[:, -length:]]) for x in (q, k, v))
    for n_pads in (0, 40):
      pads = (jnp.arange(length) >= n_pads)[None].repeat(2, 0) if n_pads else None
      call = lambda impl_: jax.jit(lambda q, k, v, kv: sel.selected_prefix_attention(
          q, k, v, prefix=small, chunk=check_chunk, block=block, keep=0.5,
          n_global=n_global, key_valid=kv, query_valid=kv, implementation=impl_))
      got, want = (call(i)(qs, ks, vs, pads).astype(jnp.float32)[:, n_pads:]
                   for i in (impl, "xla"))
      err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
      rows.append(dict(layout=layout, context=small, impl=impl, variant="check", pads=n_pads,
                       max_rel_err=err, ok=err < 2e-2))
      print("SELECTED", rows[-1], flush=True)
  return rows


def phase_dense_padded(da, reps: int = 5) -> list[dict]:
  """A padded batch's refresh attention at 32K (64 left pads), per layout: the call as the
  model makes it (on a GPU, cuDNN over keys reordered valid first with a length per row,
  `dense_attention.lengths_beat_a_mask`), the pad mask given to cuDNN as a [B, 1, T, S] bias
  (the path before 2026-12-07; GPU only), and the unpadded call: time and XLA's temporaries.
  A small case with pads anywhere checks the call against the XLA path."""
  import jax
  import jax.numpy as jnp
  gpu = jax.default_backend() == "gpu"
  impl = "cudnn" if gpu else "xla"
  ctx, pads = (256, 8) if SMOKE else (TARGET_CTX, 64)
  rows = []
  for layout, lay in LAYOUTS.items():
    s_len = ctx + GEN
    q, k, v = refresh_qkv(lay, s_len, seed=3)
    valid = jnp.arange(s_len)[None] >= pads
    calls = {"padded": (jax.jit(lambda q, k, v, kv: da.attention(
                 q, k, v, key_valid=kv, implementation=impl)), (q, k, v, valid)),
             "unpadded": (jax.jit(lambda q, k, v: da.attention(q, k, v, implementation=impl)),
                          (q, k, v))}
    if gpu:
      calls["padded_bias"] = (jax.jit(lambda q, k, v, kv: jax.nn.dot_product_attention(
          q, k, v, mask=jnp.broadcast_to(kv[:, None, None, :], (1, 1, s_len, s_len)),
          implementation="cudnn")), (q, k, v, valid))
    # Where the padded call's time over the unpadded one goes: the length-masked kernel with
    # every key valid (no reorder), and the valid-first reorder of K and V alone.
    calls["lengths_all_valid"] = (jax.jit(lambda q, k, v: da.attention(
        q, k, v, key_lengths=jnp.full((1,), s_len, jnp.int32), implementation=impl)), (q, k, v))
    calls["reorder_only"] = (jax.jit(da.valid_first_kv), (k, v, valid))
    for variant, (fn, args) in calls.items():
      t, first = timeit(fn, args, reps=reps)
      temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
      rows.append(dict(layout=layout, context=ctx, impl=impl, variant=variant, pads=pads,
                       ms=t * 1e3, compile_s=first, temp_gib=temp / 2**30))
      print("DENSE_PADDED", rows[-1], flush=True)
    # Two sequences, pads anywhere, enough query rows for the lengths path (LLaDA's 32 kv heads
    # need 8192); XLA's reference in query chunks (its float32 scores would not fit at once).
    n = 256 if SMOKE else 8448
    assert SMOKE or da.lengths_beat_a_mask(n, k)
    qs, ks, vs = (jnp.concatenate([x[:, :n], x[:, -n:]]) for x in (q, k, v))
    anywhere = (jnp.arange(n)[None] >= jnp.array([[0], [40]])) & (jnp.arange(n)[None] % 97 != 5)
    got = da.attention(qs, ks, vs, key_valid=anywhere, implementation=impl).astype(jnp.float32)
    rows_at = jnp.linspace(0, n - 64, 8).astype(jnp.int32)[:, None] + jnp.arange(64)
    xla_rows = jax.jit(lambda qq: da.attention(qq, ks, vs, key_valid=anywhere,
                                               implementation="xla"))
    want = jnp.stack([xla_rows(qs[:, r]) for r in rows_at], 1).astype(jnp.float32)
    got = jnp.stack([got[:, r] for r in rows_at], 1)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    rows.append(dict(layout=layout, context=n, impl=impl, variant="check", max_rel_err=err,
                     ok=err < 2e-2 and bool(jnp.isfinite(got).all())))
    print("DENSE_PADDED", rows[-1], flush=True)
  return rows


def phase_fp8_dense(da, reps: int = 5, ref_rows: int = 256) -> list[dict]:
  """The refresh's dense attention at 32K (and LLaDA's at 8K) in bfloat16 and in fp8.

  cuDNN on a GPU (the XLA path and the fp8 emulation in a smoke run). Errors of the first
  `ref_rows` query rows against a float32 reference: (max |error| / max |ref|, relative L2), on
  diffuse logits (q, k ~ N(0, 1)), on peaked ones (q, k x3: fp8's error grows with the
  logits), with two key channels offset by +16/-12 in every token (what smoothing the keys
  is for; the float32 reference sees the same keys), and with 63 left pad keys (masked in the
  reference and in bfloat16, neutralised in fp8). The emulation's error is reported beside
  cuDNN's fp8: the CPU and TPU (and the tests) run the emulation, so the two must agree. So is fp8 without smoothing K and V (`smooth=False`), error and time: what smoothing
  buys and costs.
  """
  import jax
  import jax.numpy as jnp
  gpu = jax.default_backend() == "gpu"
  bf16_impl = "cudnn" if gpu else "xla"
  cases = [("llada8b", TARGET_CTX), ("dream7b", TARGET_CTX), ("llada8b", 8192)]
  if SMOKE:
    cases = [("llada8b", TARGET_CTX), ("dream7b", TARGET_CTX)]

  def errors(out, ref):
    diff = out[:, :ref_rows].astype(jnp.float32) - ref
    return [float(jnp.max(jnp.abs(diff)) / jnp.max(jnp.abs(ref))),
            float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref))]

  # Jitted once: the cases of a layout share shapes, so each compiles once per shape.
  ref_fn = jax.jit(lambda q, k, v, kv, pads: da.xla_attention(
      q[:, pads:pads + ref_rows].astype(jnp.float32), k.astype(jnp.float32),
      v.astype(jnp.float32), kv), static_argnums=4)
  bf16 = jax.jit(lambda q, k, v, kv: da.attention(q, k, v, kv, implementation=bf16_impl))
  fp8 = jax.jit(lambda q, k, v, kv: da.attention(q, k, v, kv, implementation=bf16_impl,
                                                 fp8=True))
  emulated = jax.jit(lambda q, k, v, kv: da.xla_fp8_attention(q, k, v, kv))
  unsmoothed = jax.jit(lambda q, k, v: (da.cudnn_fp8_attention if gpu
                                        else da.xla_fp8_attention)(q, k, v, smooth=False))
  rows = []
  for layout, ctx in cases:
    lay = LAYOUTS[layout]
    s_len = ctx + GEN
    flops = 4.0 * s_len * s_len * lay["d"] * lay["hq"]
    offset = jnp.zeros((lay["d"],), jnp.float32).at[jnp.array([3, 17])].set(
        jnp.array([16.0, -12.0]))
    # (logit scale, common key channels, left pads): pads are neutralised, not masked, in fp8
    for logit_scale, common, pads in ((1.0, False, 0), (3.0, False, 0), (1.0, True, 0),
                                      (1.0, False, 63)):
      keys = jax.random.split(jax.random.PRNGKey(1), 3)
      shape = lambda h: (1, s_len, h, lay["d"])
      q = (jax.random.normal(keys[0], shape(lay["hq"])) * logit_scale).astype(jnp.bfloat16)
      k = jax.random.normal(keys[1], shape(lay["hkv"])) * logit_scale
      v = jax.random.normal(keys[2], shape(lay["hkv"]))
      if common:
        k = k + offset
      k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
      kv = (jnp.arange(s_len) >= pads)[None] if pads else None
      group = lay["hq"] // lay["hkv"]
      ref = ref_fn(q, k, v, kv, pads)
      errors_of = lambda out: errors(out[:, pads:], ref)
      row = dict(layout=layout, context=ctx, logit_scale=logit_scale, common_channels=common,
                 pads=pads, group=group, impl=bf16_impl,
                 bf16_err=errors_of(bf16(q, k, v, kv)), fp8_err=errors_of(fp8(q, k, v, kv)),
                 emulation_err=errors_of(emulated(q, k, v, kv)))
      if not pads:  # (unsmoothed fp8 cannot neutralise pads)
        row["fp8_unsmoothed_err"] = errors_of(unsmoothed(q, k, v))
      if logit_scale == 1.0 and not common and not pads:
        for name, fn, args in (("bf16", bf16, (q, k, v, kv)), ("fp8", fp8, (q, k, v, kv)),
                               ("fp8_unsmoothed", unsmoothed, (q, k, v))):
          t, _ = timeit(fn, args, reps=reps)
          row[f"{name}_ms"], row[f"{name}_tflops"] = t * 1e3, flops / t / 1e12
        row["fp8_speedup"] = row["bf16_ms"] / row["fp8_ms"]
      print("FP8_DENSE", row, flush=True)
      rows.append(row)
  return rows


def _gemm_operands(rows: int, k: int, n: int, seed: int):
  """x [rows, k] ~ N(0, 1) and w [k, n] ~ N(0, 0.02) in bfloat16, and err(y): the relative L2
  error of y's first 256 rows against their float32 product."""
  import jax
  import jax.numpy as jnp
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (rows, k), jnp.float32).astype(jnp.bfloat16)
  w = (0.02 * jax.random.normal(kw, (k, n), jnp.float32)).astype(jnp.bfloat16)
  ref = jnp.dot(x[:256].astype(jnp.float32), w.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST)
  err = lambda y: float(jnp.linalg.norm(y[:256].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  return x, w, err


def phase_fp8_matmul(reps: int = 5) -> list[dict]:
  """A 32K refresh's projections (33024 rows, LLaDA-8B's and Dream-7B's weights) in bfloat16
  (XLA: cuBLAS) and in fp8 (`matmul.fp8_matmul`: cuBLASLt's fp8 GEMM on Hopper, the operands'
  quantisation included), each timed alone, and fp8's error against a float32 product of the
  first 256 rows (relative L2). Inputs ~ N(0, 1), weights ~ N(0, 0.02)."""
  import jax
  import jax.numpy as jnp
  from focus_jax.kernels import matmul as mm
  rows = 512 if SMOKE else TARGET_CTX + GEN
  shapes = {"llada8b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 2 * 12288),
                        "down": (12288, 4096)},
            "dream7b": {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 2 * 18944),
                        "down": (18944, 3584)}}
  if SMOKE:
    shapes = {"tiny": {"qkv": (128, 384), "down": (256, 128)}}
  out = []
  for layout, gemms in shapes.items():
    for name, (k, n) in gemms.items():
      x, w, err = _gemm_operands(rows, k, n, seed=2)
      bf16 = jax.jit(lambda x, w: x @ w)
      fp8 = jax.jit(mm.fp8_matmul)
      row = dict(layout=layout, gemm=name, rows=rows, k=k, n=n, bf16_err=err(bf16(x, w)),
                 fp8_err=err(fp8(x, w)))
      flops = 2.0 * rows * k * n
      for label, fn in (("bf16", bf16), ("fp8", fp8)):
        t, _ = timeit(fn, (x, w), reps=reps)
        row[f"{label}_ms"], row[f"{label}_tflops"] = t * 1e3, flops / t / 1e12
      row["fp8_speedup"] = row["bf16_ms"] / row["fp8_ms"]
      print("FP8_MATMUL", row, flush=True)
      out.append(row)
  return out


def phase_fp8_gemm_forms(reps: int = 5) -> list[dict]:
  """Which way of writing an fp8 GEMM XLA turns into cuBLASLt's fp8 GEMM: LLaDA-8B's fused
  q|k|v at a 32K refresh ([33024, 4096] x [4096, 12288], bf16) in each form, with the custom
  calls of its compiled HLO (`__cublas$lt$matmul$f8` is the fp8 GEMM), its time (quantisation
  included) and its error on the first 256 rows against float32. "direct_bf16_out" is
  `matmul.fp8_matmul` itself."""
  import jax
  import jax.numpy as jnp
  from focus_jax.kernels import fp8
  from focus_jax.kernels import matmul as mm
  rows, k, n = (256, 64, 32) if SMOKE else (TARGET_CTX + GEN, 4096, 12288)
  dot = (((1,), (0,)), ((), ()))
  quantised = lambda a: fp8.quantize(a, power_of_two=True)[:2]

  def converted_and_scaled(x, w, barrier):  # XLA's documented pattern
    (x8, dx), (w8, dw) = quantised(x), quantised(w)
    if barrier:  # (without it XLA drops the e4m3 round trip: a plain bf16 product)
      x8, w8 = jax.lax.optimization_barrier((x8, w8))
    return (x8.astype(x.dtype) * dx.astype(x.dtype)) @ (w8.astype(x.dtype) * dw.astype(x.dtype))

  def direct_f32_out(x, w):
    (x8, dx), (w8, dw) = quantised(x), quantised(w)
    return (jax.lax.dot_general(x8, w8, dot, preferred_element_type=jnp.float32)
            * (dx * dw)).astype(x.dtype)

  x, w, err_of = _gemm_operands(rows, k, n, seed=0)
  x8, w8 = quantised(x)[0], quantised(w)[0]
  forms = [("bf16", lambda x, w: x @ w, (x, w)),
           ("converted_and_scaled", lambda x, w: converted_and_scaled(x, w, True), (x, w)),
           ("converted_and_scaled_no_barrier", lambda x, w: converted_and_scaled(x, w, False),
            (x, w)),
           ("direct_f32_out", direct_f32_out, (x, w)),
           ("direct_bf16_out", mm.fp8_matmul, (x, w)),
           # the fp8 GEMM alone, on operands quantised beforehand (no error: not x @ w)
           ("prequantised_gemm", lambda a, b: jax.lax.dot_general(
               a, b, dot, preferred_element_type=jnp.bfloat16), (x8, w8)),
           # the same with the weight stored transposed, [N, K], as models.transformer's
           # fp8_weights hold it: both operands K-contiguous, no transpose left to XLA
           ("prequantised_transposed_gemm", lambda a, b: jax.lax.dot_general(
               a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16),
            (x8, jnp.asarray(w8.T)))]
  out = []
  for name, fn, args in forms:
    jitted = jax.jit(fn)
    hlo = jitted.lower(*args).compile().as_text()
    calls = sorted({line.split('custom_call_target="')[1].split('"')[0]
                    for line in hlo.splitlines() if 'custom_call_target="' in line})
    y = jitted(*args)
    err = None if name.startswith("prequantised") else err_of(y)
    t, _ = timeit(jitted, args, reps=reps)
    row = dict(form=name, rows=rows, k=k, n=n, ms=t * 1e3,
               tflops=2.0 * rows * k * n / t / 1e12, rel_err=err, custom_calls=calls)
    print("FP8_GEMM_FORM", row, flush=True)
    out.append(row)
  return out


def phase_mgpu_sparse(sa, block_size: int, path: str | None = None, res: dict | None = None,
                      rounds: int = 3, parts: str = "check,time,sweep",
                      layouts: str | None = None) -> list[dict]:
  """The Mosaic GPU split-KV kernel (`kernels/sparse/mosaic_gpu.py`): correctness, then timing.

  (1) Random bf16 cases (MHA and GQA 28/4, empty / no-key / all / padded selections, S not a
  multiple of the block, extra segments) against the float32 reference, with the default tiling
  and, on the GQA case, several others: relative error (norm) and max relative error
  (max |out - ref| / max |ref|). (2) 32K, alpha 0.5, 32 queries, both layouts, kernel alone
  (selection pre-normalised), per layer, loop overhead removed, median of `rounds` interleaved
  rounds: mosaic_gpu against pallas_gpu (both defaults), then the A/B of the kernel's later
  changes (`mgpu_ab_configs`) and a small sweep of its knobs. TB/s as in the waves phase (bytes it must read + q and output). Every case is
  wrapped: a failing tiling prints its error and the phase goes on. Rows are saved after every
  case (a hung kernel leaves the rows before it); a compact table is printed at the end.
  `parts` (--mgpu-parts) picks among check, time, ab and sweep (default: all but ab); `layouts`
  (--mgpu-layouts) restricts the timing to some layouts: to split the phase over several runs.
  """
  parts_ = set(parts.split(","))
  unknown = parts_ - {"check", "time", "ab", "sweep"}
  if unknown:
    raise ValueError(f"unknown --mgpu-parts {sorted(unknown)}")
  timed_layouts = list(LAYOUTS) if not layouts else layouts.split(",")
  import jax
  from focus_jax.kernels.sparse import mosaic_gpu as mg
  rows: list[dict] = []

  def save(row):
    print("MGPU_SPARSE", json.dumps(row), flush=True)
    rows.append(row)
    if res is not None and path:
      res["mgpu_sparse"] = rows
      with open(path, "w") as f:
        json.dump(res, f, indent=1)

  # (1) correctness
  rng = np.random.default_rng(7)
  cases = MGPU_CHECK_CASES
  cfgs_for = lambda name: [None] + (MGPU_CHECK_CFGS if name == "gqa28/4" else [])
  if SMOKE:  # tiny, interpreted: the shapes that exercise padding, S % bs and GQA
    cases = [("smoke gqa", 1, 4, 8, 2, 64, 1000, 64, 6, "hkv", "random", True),
             ("smoke empty", 1, 4, 4, 2, 64, 512, 64, 4, "one", "no_keys", False)]
    cfgs_for = lambda name: [None, dict(num_wgs=2, num_splits=3)] if "gqa" in name else [None]
  for case in cases if "check" in parts_ else []:
    name = case[0]
    try:
      args, bs, ref = random_check_case(sa, rng, case)
    except Exception as e:  # noqa: BLE001
      save(dict(part="check", case=name, error=repr(e)[:300], ok=False))
      continue
    why = mg.supported(args[0].shape, args[1].shape, args[0].dtype, bs)
    for cfg in cfgs_for(name):
      print(f"mgpu_sparse check {name} cfg={cfg} ...", flush=True)
      try:
        if why:
          raise ValueError(f"unsupported: {why}")
        fn = jax.jit(lambda *a, cfg=cfg, bs=bs: sa.block_sparse_attention(
            *a, block_size=bs, implementation="mosaic_gpu", kernel_config=cfg,
            interpret=SMOKE))
        out = np.asarray(fn(*args), np.float64)
        nref = np.linalg.norm(ref)
        err = float(np.linalg.norm(out - ref) / max(nref, 1e-30))
        max_err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
        ok = bool(np.all(np.isfinite(out)) and (err < 1e-2 if nref > 0 else
                                                float(np.abs(out).max()) == 0.0))
        row = dict(part="check", case=name, cfg=cfg or "default", rel_err=err,
                   max_rel_err=max_err, ok=ok)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row = dict(part="check", case=name, cfg=cfg or "default", error=repr(e)[:300], ok=False)
      save(row)

  # (2) timing
  n_resp = -(-GEN // block_size) + 1
  for layout in timed_layouts if parts_ & {"time", "ab", "sweep"} else []:
    lay = LAYOUTS[layout]
    hkv, d = lay["hkv"], lay["d"]
    q_rows = lay["hq"] // hkv * 32
    layers = layers_for(layout, TARGET_CTX)
    try:
      p = make_problem(layout, TARGET_CTX, 0.5, 32, block_size, layers)
      base = mg.default_config(1, hkv, q_rows, p["n"], n_resp, d=d, block_size=block_size)
      if SMOKE:  # interpreted: one split keeps the grid small
        base["num_splits"] = 1
      keys = p["n"] * block_size + GEN
      flops = 4 * hkv * q_rows * keys * d  # Q K^T and P V, 2 flops per multiply-add
      r_hi, reps = (2, 1) if SMOKE else (5, 5)
      over, _ = _iteration_timer(lambda *a: (), lambda q, ks, vs: [q], p, r_hi, reps)()
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      save(dict(part="time", layout=layout, error=repr(e)[:300]))
      continue
    jobs = [("pallas_gpu", None), ("mosaic_gpu", base)] if "time" in parts_ else []
    if "ab" in parts_:
      jobs += [("mosaic_gpu", c) for c in mgpu_ab_configs(base)]
    if "sweep" in parts_:
      jobs += [("mosaic_gpu", c) for c in mgpu_sweep_configs(layout, base, hkv, q_rows,
                                                            p["n"] + n_resp, block_size)]
    timers, times, errors = {}, {}, {}
    for _ in range(1 if SMOKE else rounds):
      for j, (impl, cfg) in enumerate(jobs):
        if j in errors:
          continue
        print(f"mgpu_sparse time {layout} {impl} cfg={cfg} ...", flush=True)
        try:
          if j not in timers:
            timers[j] = _iteration_timer(*sparse_layers(sa, impl, block_size, True, cfg), p,
                                         r_hi, reps)
          t, _ = timers[j]()
          times.setdefault(j, []).append((t - over) / layers)
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          errors[j] = repr(e)[:300]
    for j, (impl, cfg) in enumerate(jobs):
      row = dict(part="time", layout=layout, impl=impl,
                 cfg=cfg if impl == "mosaic_gpu" else "default",
                 default=impl == "pallas_gpu" or cfg == base, layers_timed=layers)
      if j in times:
        t = statistics.median(times[j])
        row.update(us=t * 1e6, tb_s=p["bytes"] / t / 1e12, tflops=flops / t / 1e12,
                   us_rounds=[x * 1e6 for x in times[j]])
      else:
        row["error"] = errors.get(j, "not run")
      save(row)
    del p, timers

  # compact table
  print("\n=== mgpu_sparse: correctness (max |out-ref| / max |ref|; norm-relative) ===")
  for r in rows:
    if r["part"] == "check":
      c = r.get("cfg", "")
      c = c if isinstance(c, str) else " ".join(f"{k}={v}" for k, v in c.items())
      if "error" in r:
        print(f"  FAIL {r['case']:18} {c:28} {r['error'][:100]}")
      else:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['case']:18} {c:28} "
              f"max_rel {r['max_rel_err']:.2e}  rel {r['rel_err']:.2e}")
  print("=== mgpu_sparse: 32K, alpha 0.5, 32 queries, kernel alone, per layer ===")
  print(f"  {'layout':8} {'impl':10} {'us':>8} {'TB/s':>5} {'TFLOP/s':>7}  config")
  for r in rows:
    if r["part"] == "time":
      c = r.get("cfg", "")
      c = c if isinstance(c, str) else " ".join(f"{k}={v}" for k, v in c.items())
      mark = "*" if r.get("default") else " "
      if "us" in r:
        print(f" {mark}{r['layout']:8} {r['impl']:10} {r['us']:8.1f} {r['tb_s']:5.2f} "
              f"{r['tflops']:7.1f}  {c}")
      else:
        print(f" {mark}{r.get('layout', ''):8} {r.get('impl', ''):10} {'-':>8}  {c}  "
              f"ERROR {r.get('error', '')[:100]}")
  return rows


DIAG_CFGS = {
    "llada8b": [dict(block_m=32, num_splits=sp, num_warps=4, num_stages=ns, static_loop=st,
                     prefetch=pf)
                for st in (False, True) for pf in (False, True) for sp in (8, 32) for ns in (2, 3)],
    "dream7b": [dict(block_m=bm, num_splits=16, num_warps=nw, num_stages=ns, static_loop=st,
                     prefetch=pf)
                for st in (False, True) for pf in (False, True) for (bm, nw) in ((64, 4), (128, 8))
                for ns in (2, 3)],
}


def phase_diag(sa, block_size: int) -> list[dict]:
  """Single launches per config, to be read by a profiler (ncu): kernel time apart from XLA."""
  import jax
  rows = []
  for layout in LAYOUTS:
    p = make_problem(layout, TARGET_CTX, 0.5, 32, block_size, 1)
    args = (p["q"], p["ks"], p["vs"], p["idx"], p["cnt"], p["ranges"])
    for impl, cfg in [("pallas_gpu", c) for c in DIAG_CFGS[layout]] + [
        ("jax_triton", c) for c in DIAG_CFGS[layout] if not c.get("static_loop")
        and not c.get("prefetch")]:
      if impl == "jax_triton" and "jax_triton" not in CHECK_IMPLS:
        continue
      f = sparse_fn(sa, impl, block_size, True, cfg)
      for _ in range(2):
        jax.block_until_ready(f(*args))
      rows.append(dict(layout=layout, impl=impl, cfg=cfg, bytes=p["bytes"]))
      print("DIAG", rows[-1], flush=True)
    f = sparse_fn(sa, "pallas_gpu", block_size, False, None)
    for _ in range(2):
      jax.block_until_ready(f(*args))
    print("DIAG e2e default", layout, flush=True)
    f = sparse_fn(sa, "xla_gather", block_size, False, None)
    for _ in range(2):
      jax.block_until_ready(f(*args))
    print("DIAG e2e xla_gather", layout, flush=True)
  return rows


def phase_sweep(sa, da, block_size: int, grid: str, cfgs: dict | None, out_path=None,
                res=None) -> list[dict]:
  rows = []
  points = []
  for layout in LAYOUTS:
    for ctx in CTXS:
      for alpha in (0.1, 0.25, 0.5, 1.0):
        for t in (8, 32, 64):
          if grid == "full" or t == 32 or ctx == TARGET_CTX:
            points.append((layout, ctx, alpha, t))
  points.sort(key=lambda x: (x[1] != TARGET_CTX, x[3] != 32))  # the target's rows first
  dense_cache = {}
  overhead = None
  for layout, ctx, alpha, t in points:
    layers = layers_for(layout, ctx)
    p = make_problem(layout, ctx, alpha, t, block_size, layers)
    if overhead is None:
      overhead = loop_overhead(p)
      print("loop overhead per iteration (us)", overhead * 1e6, flush=True)
    row = dict(layout=layout, ctx=ctx, s_len=p["s_len"], alpha=alpha, queries=t,
               block_size=block_size, blocks=p["n"], layers_timed=layers,
               bytes_per_layer=p["bytes"])
    cfg = (cfgs or {}).get(layout)
    jobs = [("pallas_kernel", "pallas_gpu", True), ("xla_gather_kernel", "xla_gather", True)]
    if ctx == TARGET_CTX and t == 32:  # end to end: each layer also normalises its selection
      jobs += [("pallas_e2e", "pallas_gpu", False), ("xla_gather_e2e", "xla_gather", False)]
    for name, impl, norm in jobs:
      try:
        tm, first = per_iteration_time(*sparse_layers(sa, impl, block_size, norm,
                                                      cfg if impl == "pallas_gpu" else None), p)
        row[name + "_us"] = max(tm - overhead, 0.0) / layers * 1e6
        row[name + "_compile_s"] = first
      except Exception as e:  # noqa: BLE001
        row[name + "_error"] = repr(e)[:200]
    dk = (layout, ctx, t)
    if dk not in dense_cache:
      try:
        tm, _ = per_iteration_time(*dense_layers(da), p)
        dense_cache[dk] = max(tm - overhead, 0.0) / layers * 1e6
      except Exception as e:  # noqa: BLE001
        dense_cache[dk] = repr(e)[:200]
    if isinstance(dense_cache[dk], float):
      row["dense_cudnn_us"] = dense_cache[dk]
    else:
      row["dense_cudnn_error"] = dense_cache[dk]
    if "pallas_kernel_us" in row:
      row["pallas_kernel_tb_s"] = p["bytes"] / (row["pallas_kernel_us"] * 1e-6) / 1e12
      if "xla_gather_kernel_us" in row:
        row["speedup_vs_xla_gather"] = row["xla_gather_kernel_us"] / row["pallas_kernel_us"]
      if "dense_cudnn_us" in row:
        row["speedup_vs_dense_cudnn"] = row["dense_cudnn_us"] / row["pallas_kernel_us"]
    if "pallas_e2e_us" in row and "xla_gather_e2e_us" in row:
      row["speedup_vs_xla_gather_e2e"] = row["xla_gather_e2e_us"] / row["pallas_e2e_us"]
    print("SWEEP", json.dumps(row), flush=True)
    rows.append(row)
    if res is not None and out_path:
      res["sweep"] = rows
      res["loop_overhead_us"] = overhead * 1e6
      with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    del p
  return rows


def summary(res: dict) -> None:
  copy = res.get("copy", {}).get("copy_tb_s")
  print("\n=== summary", res["device"], "jax", res["jax"], "===")
  if "check" in res:
    bad = [r for r in res["check"] if not r["ok"]]
    print(f"check: {len(res['check']) - len(bad)}/{len(res['check'])} ok",
          *(f"\n  FAIL {r}" for r in bad))
  if copy:
    print(f"copy bandwidth {copy:.2f} TB/s; target 70% = {0.7 * copy:.2f} TB/s")
  if "tune" in res:
    for r in sorted(res["tune"], key=lambda r: (r["layout"], r.get("us", 1e9))):
      c = r["cfg"]
      c = c if isinstance(c, str) else " ".join(f"{k[:6]}={int(v)}" for k, v in c.items())
      print(f"tune {r['layout']:8} {r.get('impl', ''):10} {r.get('us', float('nan')):8.1f} us "
            f"{r.get('tb_s', float('nan')):5.2f} TB/s  {c} {r.get('error', '')[:80]}")
  for r in res.get("focus_call", []):
    c = r["cfg"] if isinstance(r["cfg"], str) else " ".join(f"{k}={v}" for k, v in r["cfg"].items())
    err = f"max_rel {r['max_rel_err']:.1e}" if "max_rel_err" in r else r.get("error", "")[:60]
    print(f"focus_call {r['layout']:8} {r['impl']:10} {c:22} {r.get('us', float('nan')):7.1f} us "
          f"{'ok' if r['ok'] else 'FAIL'} {err}")
  for r in res.get("selected_prompt", []):
    if r["variant"] == "check":
      print(f"selected {r['layout']:8} check, {r.get('pads', 40)} pads "
            f"{'ok' if r['ok'] else 'FAIL'} {r['max_rel_err']:.1e}")
    elif r["variant"] == "dense":
      print(f"selected {r['layout']:8} dense {r['ms']:8.2f} ms")
    else:
      print(f"selected {r['layout']:8} chunk {r['chunk']:5} keep {r['keep']:5} {r['ms']:8.2f} ms "
            f"x{r['speedup']:.2f} (share {r['flop_share']:.2f}, {r['over_ideal']:.2f} x ideal)")
  for r in res.get("matmul", []):
    us, tb = r["us"], r["tb_s"]
    line = " ".join(f"{nm} {us[nm]:.1f} us {tb[nm]:.2f} TB/s" for nm in
                    ("xla", r["best"], "pallas_default") if nm in us)
    print(f"matmul {r['layout']:8} {r['gemm']:8} {r['label']:8} {line}")
  if "sweep" in res:
    print(f"{'layout':8} {'ctx':>6} {'a':>4} {'T':>3} {'kern us':>8} {'TB/s':>5} {'xla us':>8} "
          f"{'x xla':>6} {'e2e us':>7} {'xlae2e':>7} {'cudnn us':>8} {'x dense':>7}")
    for r in res["sweep"]:
      f = lambda key, fmt: (fmt % r[key]) if key in r else "-"
      print(f"{r['layout']:8} {r['ctx']:>6} {r['alpha']:>4} {r['queries']:>3} "
            f"{f('pallas_kernel_us', '%8.1f')} {f('pallas_kernel_tb_s', '%5.2f')} "
            f"{f('xla_gather_kernel_us', '%8.1f')} {f('speedup_vs_xla_gather', '%6.2f')} "
            f"{f('pallas_e2e_us', '%7.1f')} {f('xla_gather_e2e_us', '%7.1f')} "
            f"{f('dense_cudnn_us', '%8.1f')} "
            f"{f('speedup_vs_dense_cudnn', '%7.2f')}")


def plot(path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  res = json.load(open(path))
  rows = res["sweep"]
  fig, axes = plt.subplots(1, 3, figsize=(17, 5))
  for layout, ls in (("llada8b", "-"), ("dream7b", "--")):
    for alpha, c in zip((0.1, 0.25, 0.5, 1.0), ("C0", "C1", "C2", "C3")):
      rr = sorted([r for r in rows if r["layout"] == layout and r["alpha"] == alpha
                   and r["queries"] == 32 and "pallas_kernel_us" in r], key=lambda r: r["ctx"])
      if not rr:
        continue
      x = [r["ctx"] // 1024 for r in rr]
      axes[0].plot(x, [r["pallas_kernel_tb_s"] for r in rr], ls, color=c, marker="o",
                   label=f"{layout} a={alpha}")
      axes[1].plot(x, [r.get("speedup_vs_xla_gather", np.nan) for r in rr], ls, color=c,
                   marker="o", label=f"{layout} a={alpha}")
      axes[2].plot(x, [r.get("speedup_vs_dense_cudnn", np.nan) for r in rr], ls, color=c,
                   marker="o", label=f"{layout} a={alpha}")
  copy = res.get("copy", {}).get("copy_tb_s")
  if copy:
    axes[0].axhline(copy, color="k", lw=0.8, label="device copy")
    axes[0].axhline(0.7 * copy, color="k", lw=0.8, ls=":", label="70% of copy")
  axes[1].axhline(3.0, color="k", lw=0.8, ls=":", label="3x target")
  axes[2].axhline(1.0, color="k", lw=0.8, ls=":")
  titles = ("Pallas kernel: TB/s over the bytes it must read", "speed-up vs XLA gather path",
            "speed-up vs dense cuDNN over the whole cache")
  for ax, title in zip(axes, titles):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (K tokens), 32 queries, bf16, block 64")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[1].set_yscale("log")
  axes[2].set_yscale("log")
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle(f"block_sparse_attention on {res['device']}, jax {res['jax']}, {res['date']}")
  fig.tight_layout()
  out = os.path.splitext(path)[0] + ".png"
  fig.savefig(out, dpi=110)
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--phases", default="check,copy,tune,sweep")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--grid", default="partial", choices=("partial", "full"))
  ap.add_argument("--cfg", default=None, help="JSON {layout: kernel_config} for the sweep")
  ap.add_argument("--plot", default=None)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--tune-set", default="wide", choices=("wide", "diag"))
  ap.add_argument("--ctxs", default=None, help="comma-separated contexts for the sweep")
  ap.add_argument("--mgpu-parts", default="check,time,sweep",
                  help="mgpu_sparse: comma-separated parts among check, time, ab, sweep")
  ap.add_argument("--mgpu-layouts", default=None,
                  help="mgpu_sparse, matmul: comma-separated layouts to time (default: all)")
  ap.add_argument("--matmul-impls", default="xla,pallas",
                  help="matmul: among xla, pallas")
  ap.add_argument("--matmul-gemms", default=None,
                  help="matmul: comma-separated GEMMs to time (q_o, qkv, swiglu, ...; default: all)")
  ap.add_argument("--matmul-label", default="",
                  help="matmul: recorded with each row (e.g. the XLA_FLAGS of the run)")
  a = ap.parse_args()
  global CTXS, TUNE_SET
  TUNE_SET = a.tune_set
  try:
    import jax_triton  # noqa: F401  (optional: carried as a wheel to the GPU machine)
    CHECK_IMPLS.append("jax_triton")
  except ImportError:
    pass
  if a.ctxs:
    CTXS = [int(c) for c in a.ctxs.split(",")]
  if a.smoke:
    global SMOKE, TARGET_CTX
    SMOKE, CTXS, TARGET_CTX = True, [512], 512
  if a.plot:
    print(plot(a.plot))
    return
  sa, da = _import_kernels()
  import jax
  dev = jax.devices()[0]
  res = dict(device=dev.device_kind, jax=jax.__version__, platform=dev.platform,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             block_size=a.block_size, generation_len=GEN, batch=1, selection="per kv head")
  phases = a.phases.split(",")
  name = "kernels_" + dev.device_kind.replace(" ", "_").lower() + ".json"
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, name)

  def save():
    with open(path, "w") as f:
      json.dump(res, f, indent=1)

  t0 = time.time()
  for ph in phases:
    if ph == "check":
      res["check"] = phase_check(sa)
    elif ph == "copy":
      res["copy"] = phase_copy()
    elif ph == "tune":
      res["tune"] = phase_tune(sa, a.block_size)
    elif ph == "waves":
      res["waves"] = phase_waves(sa, a.block_size)
    elif ph == "live":
      res["live"] = phase_live(sa, a.block_size)
    elif ph == "focus_call":
      res["focus_call"] = phase_focus_call(sa, a.block_size)
    elif ph == "relevance":
      res["relevance"] = phase_relevance(a.block_size)
    elif ph == "mass":
      res["mass"] = phase_mass()
    elif ph == "matmul":
      res["matmul"] = phase_matmul(impls=a.matmul_impls.split(","), label=a.matmul_label,
                                   layouts=a.mgpu_layouts and a.mgpu_layouts.split(","),
                                   gemms=a.matmul_gemms and a.matmul_gemms.split(","))
    elif ph == "mgpu_dense":
      res["mgpu_dense"] = phase_mgpu_dense()
    elif ph == "fp8_dense":
      res["fp8_dense"] = phase_fp8_dense(da)
    elif ph == "selected_prompt":
      res["selected_prompt"] = phase_selected_prompt(da)
    elif ph == "dense_padded":
      res["dense_padded"] = phase_dense_padded(da)
    elif ph == "fp8_matmul":
      res["fp8_matmul"] = phase_fp8_matmul()
    elif ph == "fp8_gemm_forms":
      res["fp8_gemm_forms"] = phase_fp8_gemm_forms()
    elif ph == "mgpu_sparse":
      res["mgpu_sparse"] = phase_mgpu_sparse(sa, a.block_size, path, res,
                                             parts=a.mgpu_parts, layouts=a.mgpu_layouts)
    elif ph == "diag":
      res["diag"] = phase_diag(sa, a.block_size)
    elif ph == "sweep":
      res["sweep"] = phase_sweep(sa, da, a.block_size, a.grid,
                                 json.loads(a.cfg) if a.cfg else None, path, res)
    save()
  res["wall_s"] = time.time() - t0
  save()
  summary(res)


if __name__ == "__main__":
  main()
