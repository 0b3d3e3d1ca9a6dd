"""Block-sparse attention on Hopper: a Mosaic GPU kernel (wgmma + TMA), split over the KV axis.

Why a second GPU kernel: the Triton one (`gpu.py`) is at 95% of copy bandwidth for LLaDA's MHA
layout but compute-bound for Dream's GQA layout, where a kv head carries 7 query heads x 32
queries = 224 rows (~220 flop per byte): Triton's `mma` path tops out there. This kernel issues
Hopper `wgmma` (64 query rows per warpgroup as the M dimension) on K/V tiles brought into shared
memory by the TMA engine, FlashAttention-3 style: a producer warpgroup streams tiles through a
ring of `num_stages` slots while the consumer warpgroups compute.

Work layout (the same algorithm and partial format as `gpu.sparse_partial`):
- grid (batch * kv head, row tile, KV split); `num_wgs` consumer warpgroups of `wg_rows` rows
  each stack the G query heads of the kv head (`rows = T * G`, padded to whole row tiles), so
  K/V are read once per row tile and never repeated (GQA).
- the work items of a (batch, kv head) are its extra tiles (below), its normalised selected
  blocks, then the blocks covering [response_start, response_end); split `s` walks a contiguous
  share of them. Block ids
  and the ranges are runtime values read from GMEM inside the kernel (no scalar prefetch on
  GPU); the producer turns each into the TMA copy of one [block_size, D] tile of K and of V out
  of the [B, S, Hkv, D] cache (rows Hkv*D elements apart: a strided TMA box). If S is not a
  multiple of the block size, the last tile is shifted back inside the cache and masked, as in
  the Triton kernel (TMA needs the row offset to be a multiple of 8, hence S % 8 == 0).
- extra keys (Focus's sinks, `extra`): XLA gathers their rows (`common.extra_tiles`) into whole
  [block_size, D] tiles that come first in the item list; the tile's TMA reads that array
  instead of the cache, and a per-head score bias (0 or -inf a row, loaded per masked step)
  masks the rows a head must not count (invalid for it, or already in its kept blocks).
- padded query slots: a program whose row tile holds no live row (`row_counts`) works for a live
  tile, as extra KV splits of it (`common.tile_plan`, the Triton kernel's scheme); its partial
  goes to its own slot's rows, which the merges read.
- each consumer keeps (acc, m, l) in registers (m in log2 units, exp2 with the scale folded into
  one FMA) and writes its unnormalised partial straight to GMEM (m back in natural log). The
  Triton kernel's merge (`gpu.merge_to_output`) merges the splits by log-sum-exp, normalises and
  writes [B, T, Hq, D] (`sparse_attention`); with an extra segment to merge on top, XLA merges
  (`sparse_partial`).
- only a step holding a partial tile (the prompt's or response's edge, a split's padding) is
  masked: the others skip the mask's compares and selects (`lax.cond`).
- with two consumers, FA3's ping-pong: a barrier they meet twice a step orders one's wgmmas
  against the other's softmax (as JAX's FA3 kernel does).

Synchronisation per ring slot: `k_ready`/`v_ready` (TMA completion, awaited by every consumer),
`k_free`/`v_free` (one arrival per consumer, awaited by the producer before it refills the slot,
and drained at the end so that every completion is awaited, as Mosaic GPU barriers require).

With `kv_blocks` > 1, one pipeline step (one ring slot, one Q K^T, one P V) covers that many
items: the producer copies each into its share of the slot, the consumers mask each column
block with its own item's key range.

Status: lowers for CUDA (sm_90a) on jax 0.10.2 and 0.11.2 and matches the reference in Mosaic
GPU's CPU interpreter (with the wgmma stand-in of `_dot`; the ping-pong barrier is skipped
there, see `_kernel`). On the GPU: right on every check case (H200 2026-12-01; H100
2026-12-06: 19 of 19, and Focus's call with sinks and padded slots, max error 3.2e-3 of the
largest output; `benchmarks/results/kernels_h100_focus_call.json`). 32K, alpha 0.5, 32 queries, per
layer, kernel alone, H100 2026-12-06, one process (benchmarks/results/kernels_h100_mgpu_dream.json):
Dream-7B 25.4 us (1.36 TB/s, 301 TFLOP/s) against the Triton kernel's 35.9. With the four
changes above undone (XLA merge, 64-key steps, no ping-pong, every step masked) it measured
36.5 against the Triton kernel's 37.9 in an earlier process. LLaDA-8B's MHA layout: 80.9 us
(64-key steps) against the Triton kernel's 101.0 in that process; its rounds spread 79-130 us
(2 layers of buffers, so L2 reuse); 70.7 vs 65.0 on the H200. "auto" does not pick it. As Focus
calls it (7 of 32 slots live, 32 sinks deduplicated, per layer with the XLA preparation; H100,
one process): Dream-7B 29.5 us (28.7 with one consumer) against the Triton kernel's 30.7
(`benchmarks/results/kernels_h100_focus_call_bias.json`), and the Dream-7B 32K Focus step ties,
7.33 against 7.32 ms (`e2e_h100_dream_mgpu_bias.json`): in the step the kernel plus its merge
take 25.1 us a layer against Triton's 29.2, but the sinks' XLA preparation (gather, dedup,
bias: 4 small kernels) adds 5.9 (`profile_step_h100_dream_mgpu_bias.json`). So Focus keeps the
Triton kernel, which gathers and deduplicates the sinks itself.
FA3's intra-warpgroup overlap (softmax under the previous P V wgmma) was built and measured
slower (34.7 against 28.2 us): ptxas serialises the wgmmas (C7513) because the in-flight P V's
register A operand gets redefined, see `benchmarks/results/kernels_h100_mgpu_overlap.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import lax

from focus_jax.kernels.sparse import common
from focus_jax.kernels.sparse.gpu import merge_tile_slots as _merge_tile_slots  # XLA's merge
from focus_jax.kernels.sparse.gpu import merge_to_output as _merge_to_output  # Triton's merge
from focus_jax.kernels.sparse.gpu import num_sms  # the device's SM count, shared with Triton's

try:  # Mosaic GPU ships with jax; keep this module importable where it does not.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the jax build
  pl = plgpu = None
  _IMPORT_ERROR = f"jax.experimental.pallas.mosaic_gpu is not importable: {e}"

SMEM_PER_SM = 228 * 1024  # Hopper: shared memory per SM (227 KB usable by one block)
SMEM_PER_BLOCK = 227 * 1024
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
WG_THREADS = 128
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supported(q_shape, k_shape, dtype, block_size: int) -> str | None:
  """None when the kernel handles these shapes, else why not.

  q [B, T, Hq, D], k [B, S, Hkv, D]. The limits come from wgmma and TMA: 16-bit operands; D is
  the contraction of Q K^T and must be a whole number of 128-byte swizzle tiles (64 elements),
  and at most 128 so that the [64, D] float32 accumulator fits a warpgroup's registers; the block
  is both the N of Q K^T (<= 256) and the contraction of P V (a multiple of 64); the TMA view
  tiles the key axis by 8 rows, so S % 8 == 0 (row offsets of tiles must be multiples of 8).
  """
  if _IMPORT_ERROR:
    return _IMPORT_ERROR
  if len(q_shape) != 4 or len(k_shape) != 4:
    return f"q {q_shape} and k {k_shape} must be rank 4"
  d = q_shape[-1]
  s_len, hkv = k_shape[1], k_shape[2]
  if jnp.dtype(dtype) not in _DTYPES:
    return f"dtype {jnp.dtype(dtype)} is not bfloat16 or float16 (wgmma operands are 16-bit here)"
  if d not in (64, 128):
    return f"head dim {d} is not 64 or 128"
  if k_shape[-1] != d:
    return f"k head dim {k_shape[-1]} differs from q's {d}"
  if q_shape[2] % hkv:
    return f"query heads {q_shape[2]} not a multiple of kv heads {hkv}"
  if block_size % 64 or not 64 <= block_size <= 256:
    return f"block_size {block_size} is not a multiple of 64 in [64, 256]"
  if s_len < block_size:
    return f"cache length {s_len} is shorter than a block"
  if s_len % 8:
    return f"cache length {s_len} is not a multiple of 8 (TMA row tiling)"
  smallest = smem_bytes(64, 1, 2, block_size, d, jnp.dtype(dtype).itemsize)
  if smallest > SMEM_PER_BLOCK:
    return (f"block_size {block_size} x head dim {d}: even 2 K/V stages need {smallest} bytes of "
            f"shared memory (> {SMEM_PER_BLOCK})")
  return None


# ----------------------------------------------------------------------------------------------
# Planning: pure Python, tested on the CPU.

@dataclasses.dataclass(frozen=True)
class Plan:
  """Static shape of one launch, derived from the tiling knobs (see `plan`)."""
  wg_rows: int       # query rows per consumer warpgroup (the wgmma M): 64 or 128
  num_wgs: int       # consumer warpgroups per program
  row_tiles: int     # programs along the row axis: ceil(rows / (wg_rows * num_wgs))
  rows_pad: int      # rows padded to whole row tiles
  num_splits: int    # programs along the KV axis
  num_stages: int    # K/V ring slots
  kv_blocks: int     # KV blocks per step and slot (the N of Q K^T is kv_blocks * block_size)
  smem_bytes: int    # shared memory of one program (Q + K/V ring + barriers)
  consumer_regs: int  # setmaxnreg targets; 0 when the kernel does not rebalance registers
  producer_regs: int
  programs_per_sm: int  # resident at once, by shared memory, threads and registers
  pingpong: bool = False  # FA3's schedule barrier between the two consumers
  mask_full_steps: bool = False  # mask every step (else only steps with a partial tile)

  @property
  def rows_per_program(self) -> int:
    return self.wg_rows * self.num_wgs


def smem_bytes(wg_rows: int, num_wgs: int, num_stages: int, block_size: int, d: int,
               itemsize: int = 2, kv_blocks: int = 1) -> int:
  """Q tiles of every consumer plus the K and V ring, plus 1 KB for barriers and alignment."""
  q = num_wgs * wg_rows * d * itemsize
  kv = 2 * num_stages * kv_blocks * block_size * d * itemsize
  return q + kv + 1024


def register_split(num_wgs: int, producer_regs: int | None = None) -> tuple[int, int]:
  """(consumer, producer) per-thread register targets for `setmaxnreg`, or (0, 0) for none.

  Assumes a CTA launches with the most registers `(num_wgs + 1) * 128` threads allow:
  floor(65536 / threads) rounded down to 8, as JAX's FA3 kernel does (3 warpgroups: 168 each,
  and its 2 * 232 + 40 = 3 * 168). The per-CTA pool is fixed at launch, so the consumers may
  take only what the producer gives up: asking for more would block `setmaxnreg.inc` forever.
  One consumer needs no rebalancing.
  The producer keeps 40 (FA3's value) with up to 2 consumers, 24 (the minimum) with more.
  """
  if num_wgs <= 1:
    return 0, 0
  if producer_regs is None:
    producer_regs = 40 if num_wgs <= 2 else 24
  threads = (num_wgs + 1) * WG_THREADS
  launch = min(255, REGS_PER_SM // threads) // 8 * 8
  consumer = min(240, ((num_wgs + 1) * launch - producer_regs) // num_wgs // 8 * 8)
  if consumer <= launch:
    return 0, 0
  return consumer, producer_regs


def programs_per_sm(num_wgs: int, smem: int) -> int:
  """Programs of this kernel resident on one SM: shared memory, threads, registers."""
  if smem > SMEM_PER_BLOCK:
    return 0
  by_smem = SMEM_PER_SM // smem
  threads = (num_wgs + 1) * WG_THREADS
  by_threads = MAX_THREADS_PER_SM // threads
  # With setmaxnreg the CTA holds the whole launch allocation. Without it (one consumer) ptxas
  # picks the count; a guess of 168 (64 x D accumulator, scores, tiles) gives one per SM.
  regs = (min(255, REGS_PER_SM // threads) // 8 * 8 if num_wgs > 1 else 168) * threads
  by_regs = REGS_PER_SM // regs
  return max(0, min(by_smem, by_threads, by_regs))


def plan(bsz: int, hkv: int, rows: int, d: int, block_size: int, n_items: int, *,
         wg_rows: int = 64, num_wgs: int | None = None, num_splits: int | None = None,
         num_stages: int = 3, kv_blocks: int | None = None, producer_regs: int | None = None,
         pingpong: bool | None = None, mask_full_steps: bool = False,
         sms: int | None = None) -> Plan:
  """Tiling of one launch. Defaults: 64 rows per warpgroup (one wgmma M tile; 128 doubles the
  registers of the accumulator and scores), up to 2 consumer warpgroups (FA3's split: 232
  registers each; 4 leave ~112 and risk spills), enough row tiles to cover the rows, and as
  many KV splits as fill **one wave** of resident programs (`gpu.default_config`'s lesson: a
  partial tail wave runs with most SMs idle), at most one split per 2 items. `kv_blocks`
  blocks share one pipeline step (one slot, one Q K^T of N = kv_blocks * block_size <= 256):
  fewer, larger wgmmas and barrier round trips, at the price of a masked duplicate tile when a
  split's item count is odd, and of the scores' registers. Default: 2 with two consumers where
  that makes 128 keys and the ring fits (Dream-7B 32K, H100: 25.4 against 28.5 us a layer),
  else 1 (LLaDA-8B's one consumer: 80.9 us with 1, 96.7-115.5 with 2, rounds 79-130 us, same
  process, `benchmarks/results/kernels_h100_mgpu_dream.json`: not better, so kept at 1).
  """
  if wg_rows not in (64, 128):
    raise ValueError(f"wg_rows must be 64 or 128, got {wg_rows}")
  if num_stages < 2:
    raise ValueError(f"num_stages must be at least 2, got {num_stages}")
  if num_wgs is None:
    num_wgs = max(1, min(2, -(-rows // wg_rows)))
  if not 1 <= num_wgs <= 4:
    raise ValueError(f"num_wgs must be in [1, 4], got {num_wgs}")
  if kv_blocks is None:  # 128-key steps for two consumers, where the ring still fits
    two = smem_bytes(wg_rows, num_wgs, num_stages, block_size, d, kv_blocks=2)
    kv_blocks = 2 if num_wgs == 2 and 2 * block_size <= 128 and two <= SMEM_PER_BLOCK else 1
  if kv_blocks < 1 or kv_blocks * block_size > 256:
    raise ValueError(f"kv_blocks * block_size must be in [block_size, 256] (the N of wgmma), "
                     f"got {kv_blocks} x {block_size}")
  if pingpong is None:
    pingpong = num_wgs == 2
  if pingpong and num_wgs != 2:
    raise ValueError(f"pingpong pairs two consumer warpgroups; num_wgs is {num_wgs}")
  per_prog = wg_rows * num_wgs
  row_tiles = max(1, -(-rows // per_prog))
  smem = smem_bytes(wg_rows, num_wgs, num_stages, block_size, d, kv_blocks=kv_blocks)
  if smem > SMEM_PER_BLOCK:
    raise ValueError(f"{smem} bytes of shared memory exceed the {SMEM_PER_BLOCK} of a block "
                     f"(wg_rows={wg_rows}, num_wgs={num_wgs}, num_stages={num_stages}, "
                     f"kv_blocks={kv_blocks}, block_size={block_size}, d={d})")
  consumer, producer = register_split(num_wgs, producer_regs)
  per_sm = max(1, programs_per_sm(num_wgs, smem))
  if num_splits is None:
    slots = per_sm * (sms or num_sms())
    num_splits = max(1, min(slots // (bsz * hkv * row_tiles), -(-max(1, n_items) // 2), 64))
  if num_splits < 1:
    raise ValueError(f"num_splits must be positive, got {num_splits}")
  return Plan(wg_rows=wg_rows, num_wgs=num_wgs, row_tiles=row_tiles,
              rows_pad=row_tiles * per_prog, num_splits=int(num_splits), num_stages=num_stages,
              kv_blocks=kv_blocks,
              smem_bytes=smem, consumer_regs=consumer, producer_regs=producer,
              programs_per_sm=per_sm, pingpong=bool(pingpong),
              mask_full_steps=bool(mask_full_steps))


_PLAN_KNOBS = tuple(k for k, v in inspect.signature(plan).parameters.items()
                    if v.kind is v.KEYWORD_ONLY and k != "sms")  # the tiling knobs


def default_config(bsz: int, hkv: int, rows: int, n_sel: int, n_resp_max: int, *, d: int = 128,
                   block_size: int = 64, **overrides) -> dict:
  """Keyword arguments of `sparse_partial` for these shapes: the tiling `plan` derives around
  the given `overrides` (4 consumers get the splits and the steps that fit them), plus the
  overrides themselves (other keys, e.g. `semantics`, pass through).

  Reasoned from the hardware and from JAX's FA3 kernel, then swept and A/B-timed on an H100
  for Dream-7B's layout (see the module docstring; benchmarks/kernels.py --phases mgpu_sparse,
  parts `sweep` and `ab`)."""
  p = plan(bsz, hkv, rows, d, block_size, n_sel + n_resp_max,
           **{k: v for k, v in overrides.items() if k in _PLAN_KNOBS})
  return dict(dict(wg_rows=p.wg_rows, num_wgs=p.num_wgs, num_splits=p.num_splits,
                   num_stages=p.num_stages, kv_blocks=p.kv_blocks), **overrides)


# ----------------------------------------------------------------------------------------------
# The kernel.

def _mma_transforms(itemsize: int = 2):
  """SMEM layout wgmma reads: rows of 128-byte swizzled (8, 64) tiles (for 16-bit elements)."""
  swizzle = 128
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(idx_ref, meta_ref, q_ref, k_ref, v_ref, *refs, hkv: int, per_head: bool, n_sel: int,
            seq_len: int, block_size: int, n_extra: int, scale: float, p: Plan, dtype,
            interpreting: bool):
  if n_extra:  # the extra tiles' K and V ([B, n_extra * block_size, Hkv, D]) and score bias
    xk_ref, xv_ref, xbias_ref, *refs = refs
  (acc_ref, m_ref, l_ref, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_free, v_free,
   sched) = refs
  bs = block_size
  nw, wg_rows, stages, kb = p.num_wgs, p.wg_rows, p.num_stages, p.kv_blocks
  d = q_smem.shape[-1]
  bh = lax.axis_index("bh")
  rt = lax.axis_index("rt")
  sp = lax.axis_index("sp")
  wg = lax.axis_index("wg")
  b = lax.div(bh, jnp.int32(hkv))
  h = lax.rem(bh, jnp.int32(hkv))
  g = h if per_head else jnp.int32(0)

  # Runtime metadata of this (batch, kv head) (`common.kernel_meta`): count of selected blocks,
  # the three ranges and the live query rows.
  count = meta_ref[b, g, 0]
  ps = meta_ref[b, g, 1]
  rs = meta_ref[b, g, 2]
  re = meta_ref[b, g, 3]
  resp_first = lax.div(rs, jnp.int32(bs))
  n_resp = jnp.where(re > rs, lax.div(re - 1, jnp.int32(bs)) - resp_first + 1, 0)
  total = n_extra + count + n_resp  # items: the extra tiles, the selected blocks, the response
  # Row-tile slots past the live query rows work for the live tiles, as extra KV splits.
  row_tile, split, n_splits = common.tile_plan(meta_ref[b, g, 4], p.rows_per_program,
                                                p.row_tiles, rt, sp, p.num_splits)
  per = lax.div(total + (n_splits - 1), n_splits)
  per = lax.div(per + (kb - 1), jnp.int32(kb)) * kb  # whole steps: only the last split pads
  lo_item = jnp.minimum(split * per, total)
  n_local = jnp.minimum(lo_item + per, total) - lo_item
  n_steps = lax.div(n_local + (kb - 1), jnp.int32(kb))  # kb items per step

  def tile(j):
    """Local item -> (tile start row, first and last+1 key of the item inside the tile, whether
    the tile comes from the extra rows, whose keys the score bias masks per row)."""
    i = lo_item + j
    i_c = i - n_extra  # index among the cache's items
    is_sel = i_c < count
    sel_blk = idx_ref[b, g, jnp.clip(i_c, 0, n_sel - 1)]
    blk = jnp.where(is_sel, sel_blk, resp_first + (i_c - count))
    start = blk * bs
    lo = jnp.maximum(start, jnp.where(is_sel, ps, rs))
    hi = jnp.minimum(start + bs, jnp.where(is_sel, rs, re))
    w = jnp.minimum(start, seq_len - bs)  # the tile stays inside the cache when S % bs != 0
    if not n_extra:
      return w, lo, hi, None
    is_x = i < n_extra
    x_row = i * bs
    return (jnp.where(is_x, x_row, w), jnp.where(is_x, x_row, lo),
            jnp.where(is_x, x_row + bs, hi), is_x)

  def step_tiles(j):
    """Step -> the kb (w, lo, hi) of its items; past the split's last item, that item again with
    an empty key range (a real tile, so no stale SMEM reaches P V, masked out entirely)."""
    out = []
    for h in range(kb):
      jj = j * kb + h
      w, lo, hi, is_x = tile(jnp.minimum(jj, n_local - 1))
      out.append((w, lo, jnp.where(jj < n_local, hi, lo), is_x))
    return out

  # FA3's ping-pong: the two consumers meet at `sched` twice a step, so that one's wgmmas run
  # while the other computes its softmax. It orders work and changes no value, so the
  # interpreter skips it: its warpgroups are XLA:CPU executions, and on a 2-core host the one
  # that has not started waits for a worker that the other two hold, blocked at a barrier.
  pingpong = p.pingpong and not interpreting

  def schedule():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < nw)
  def _consumer():
    if p.consumer_regs:
      plgpu.set_max_registers(p.consumer_regs, action="increase")
    q_row0 = row_tile * p.rows_per_program + wg * wg_rows  # the rows this program works for
    q_tile = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(q_row0, wg_rows)], q_tile, q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    c = scale * LOG2E  # m in log2 units: p = exp2(s * c - m), one FMA per score
    # Key offsets within a tile, in the scores' layout. (The interpreter of jax 0.10 has no
    # layout_cast, which plgpu.broadcasted_iota binds; layouts do not exist there anyway.)
    if interpreting:
      iota = lambda shape: lax.broadcasted_iota(jnp.int32, shape, 1)
      cast = lambda x, _: x
      load_cols = lambda ref: ref[...]
    else:
      iota = lambda shape: plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
      cast = plgpu.layout_cast
      load_cols = lambda ref: plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0),
                                         optimized=False)  # plain loads: GMEM (L2), 2 a thread

    def mask(s, tiles):
      """-inf outside each column block's key range (edge blocks, the split's padding step), and
      the extra tiles' score bias (-inf on rows not valid for this head)."""
      col = iota((wg_rows, kb * bs))
      w, lo, hi, is_x = tiles[0]
      pos = w + col
      for hb in range(1, kb):  # column block hb holds item hb of the step
        w_h, lo_h, hi_h, _ = tiles[hb]
        in_h = col >= hb * bs
        pos = jnp.where(in_h, w_h - hb * bs + col, pos)
        lo = jnp.where(in_h, lo_h, lo)
        hi = jnp.where(in_h, hi_h, hi)
      s = jnp.where((pos >= lo) & (pos < hi), s, -jnp.inf)
      if n_extra:  # extra items come first, so a step's extra blocks start at column 0 and
        # their bias rows are consecutive from the first one's (the bias is padded for kb > 1)
        bias = load_cols(xbias_ref.at[b, h, pl.ds(jnp.where(is_x, w, 0), kb * bs)])
        x_cols = is_x & (pos >= 0)  # column block 0 is extra, or no block is
        for hb in range(1, kb):
          x_cols = jnp.where(col >= hb * bs, tiles[hb][3], x_cols)
        s = jnp.where(x_cols, s + lax.broadcast_in_dim(bias, s.shape, [1]), s)
      return s

    @pl.when(n_steps > 0)
    def _():
      plgpu.barrier_wait(k_ready.at[0])
    if pingpong:
      pl.when(wg == 1)(schedule)

    def body(j, carry):
      acc, m, l = carry
      slot = lax.rem(j, jnp.int32(stages))
      tiles = step_tiles(j)

      if interpreting:  # see `_dot`; a generic-proxy read must be fenced before the TMA refill
        s = _dot(q_tile[...], k_smem.at[slot][...], transpose_b=True)
        plgpu.commit_smem()
      else:
        def qk(s_ref):
          plgpu.wgmma(s_ref, q_tile, _transpose(k_smem.at[slot]))
          if pingpong:
            schedule()
          return s_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((wg_rows, kb * bs), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if p.mask_full_steps:
        s = mask(s, tiles)
      else:  # most steps are whole blocks inside their ranges: no mask to compute
        full = functools.reduce(jnp.logical_and,
                                [(lo == w) & (hi == w + bs) & (True if is_x is None else ~is_x)
                                 for w, lo, hi, is_x in tiles])
        s = lax.cond(full, lambda s: s, lambda s: mask(s, tiles), s)
      m_new = jnp.maximum(m, s.max(axis=1) * c)
      alpha = jnp.exp2(m - m_new)
      pr = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + pr.sum(axis=1)
      p16 = pr.astype(dtype)
      if pingpong:  # JAX's FA3 orders the softmax's results before its barriers this way
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        plgpu.barrier_arrive(sched)  # softmax done
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(sched)  # the other consumer's wgmmas are issued
      else:
        plgpu.barrier_wait(v_ready.at[slot])

      def wait_next_k():  # overlaps the P V wgmma; the next step's scores need it
        pl.when(j + 1 < n_steps)(
            lambda: plgpu.barrier_wait(k_ready.at[lax.rem(j + 1, jnp.int32(stages))]))
      if interpreting:
        acc = acc + _dot(p16, v_smem.at[slot][...])
        plgpu.commit_smem()
        wait_next_k()
      else:  # accumulate in place: the wgmma adds P V to the rescaled registers
        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          wait_next_k()
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    # m starts finite: a row whose keys are all masked in a tile keeps m and gains p = 0.
    m0 = cast(jnp.full((wg_rows,), common.NEG_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l0 = cast(jnp.full((wg_rows,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    a0 = cast(jnp.full((wg_rows, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    acc, m, l = lax.fori_loop(0, n_steps, body, (a0, m0, l0))
    if pingpong:
      pl.when(wg == 0)(schedule)
    rows = pl.ds(rt * p.rows_per_program + wg * wg_rows, wg_rows)  # the slot's copy of them
    acc_ref.at[b, h, sp, rows][...] = acc
    # m back to natural-log units (NEG_INIT where no key was seen), as the merges expect.
    m_ref.at[b, h, sp, rows][...] = jnp.where(l > 0, m * LN2, common.NEG_INIT)
    l_ref.at[b, h, sp, rows][...] = l

  @pl.when(wg == nw)
  def _producer():
    if p.producer_regs:
      plgpu.set_max_registers(p.producer_regs, action="decrease")

    def fetch(j, slot):
      for hb, (w, _, _, is_x) in enumerate(step_tiles(j)):  # kb copies, kb arrivals a barrier
        src = (b, pl.ds(w, bs), h)
        dst = (slot, pl.ds(hb * bs, bs)) if kb > 1 else slot

        def copy(k_src, v_src, src=src, dst=dst):
          plgpu.copy_gmem_to_smem(k_src.at[src], k_smem.at[dst], k_ready.at[slot])
          plgpu.copy_gmem_to_smem(v_src.at[src], v_smem.at[dst], v_ready.at[slot])
        if n_extra:
          pl.when(is_x)(lambda: copy(xk_ref, xv_ref))
          pl.when(~is_x)(lambda: copy(k_ref, v_ref))
        else:
          copy(k_ref, v_ref)

    for j in range(stages):  # fill the ring
      pl.when(j < n_steps)(functools.partial(fetch, jnp.int32(j), j))

    def refill(j, _):
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      fetch(j, slot)
      return _
    lax.fori_loop(jnp.int32(stages), jnp.maximum(n_steps, stages), refill, None)

    def drain(j, _):  # await the last releases: every barrier completion is observed once
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      return _
    lax.fori_loop(jnp.maximum(n_steps - stages, 0), n_steps, drain, None)


def _dot(a: jax.Array, b: jax.Array, transpose_b: bool = False) -> jax.Array:
  """a @ b (or a @ b.T) in float32 on values loaded from SMEM: the interpreter's stand-in for
  wgmma. Mosaic GPU's CPU interpreters (jax 0.10 and 0.11) cannot run the wgmma forms the GPU
  path uses (a transposed B in 0.10, an A operand in registers, `pl.run_state` accumulators),
  so under `interpret` the two matmuls are plain dots and everything else (block ids, TMA
  addresses, the barrier protocol, splits, masks, the online softmax, the stores) is the
  kernel's own code. Plain loads read SMEM through the generic proxy, so each is followed by
  `commit_smem` (a proxy fence) before the slot is released to the TMA; wgmma reads through the
  async proxy, as the TMA writes, and needs none (FA3 releases its slots the same way)."""
  dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _transpose(ref):
  """ref.T as wgmma's B operand (a transposed view: the tensor core reads K^T from K's tiles).
  `TransformedRef.transpose` in jax 0.10 and 0.11 (0.11 deprecates plgpu.transpose_ref)."""
  return ref.transpose((1, 0))


def gpu_interpret_params(**kwargs: Any) -> Any:
  """Mosaic GPU interpret-mode parameters (e.g. detect_races=True), on jax 0.10 and 0.11."""
  cls = getattr(plgpu, "InterpretGPUParams", None)
  if cls is None:  # jax 0.10 has the interpreter but does not export its parameters
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
  return cls(**kwargs)


def interpret_params(interpret: bool | object) -> Any:
  """`interpret` as plgpu.kernel wants it: None, or GPU interpret-mode parameters."""
  if interpret is False or interpret is None:
    return None
  return gpu_interpret_params() if interpret is True else interpret


def sparse_partial(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection,
                   **kwargs) -> common.Partial:
  """qg [B, Hkv, R, D] (rows of one kv head), k/v [B, S, Hkv, D] -> partial over the selection
  and the `extra` tiles (see `split_partials`).

  The output of `gpu.sparse_partial` (whose extra keys come as `extra_positions`, where these
  come as `extra` tiles): acc [B, Hkv, R, D], m and l [B, Hkv, R], float32, m in natural-log
  units (NEG_INIT and l = 0 for rows that saw no key); the splits and row-tile slots are merged
  in XLA, for callers that merge further segments on top. Rows at and past `row_counts` [B] are
  not computed (their partial is unspecified)."""
  (acc, m, l), live, block_m = split_partials(qg, k, v, sel, **kwargs)
  return _merge_tile_slots(acc, m, l, live, block_m).first_rows(qg.shape[2])


def sparse_attention(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection, *,
                     t: int, hq: int, dtype, return_lse: bool = False,
                     interpret: bool | object = False, **kwargs):
  """The whole attention: out [B, T, Hq, D] in `dtype` (and the lse [B, T, Hq] float32), the
  splits merged, normalised and laid out by the Triton kernel's merge (`gpu.merge_to_output`).
  The XLA form of that tail (split merge, m's units, normalise, ungroup, cast: about six small
  kernels) made a Dream-7B 32K layer 29.0 us against 25.4 (H100, one process). Rows at and past
  `row_counts` [B] come back as zeros (lse -inf)."""
  (acc, m, l), live, block_m = split_partials(qg, k, v, sel, interpret=interpret, **kwargs)
  return _merge_to_output(acc, m, l, live, block_m=block_m, rows=qg.shape[2], t=t, hq=hq,
                          dtype=dtype, return_lse=return_lse,  # Triton's: plain interpret mode
                          interpret=interpret_params(interpret) is not None)


def split_partials(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection, *,
                   block_size: int, scale: float, wg_rows: int = 64, num_wgs: int | None = None,
                   num_splits: int | None = None, num_stages: int = 3,
                   kv_blocks: int | None = None, producer_regs: int | None = None,
                   pingpong: bool | None = None,
                   mask_full_steps: bool = False, semantics: str | None = None,
                   approx_math: bool = True, row_counts: jax.Array | None = None,
                   extra: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                   interpret: bool | object = False):
  """The kernel's unmerged partials ((acc [B, Hkv, splits, rows_pad, D], m and l
  [B, Hkv, splits, rows_pad] float32), live rows [B], rows per program), m in natural-log units
  (NEG_INIT and l = 0 for rows that saw no key), rows padded to whole row tiles (zero queries).
  Row-tile slot j holds the partial of live tile j mod n_live (`common.tile_plan`): the slots of
  rows at and past `row_counts` [B] (padded query slots) work as extra KV splits of the live
  tiles, as in the Triton kernel; `gpu.merge_to_output` and `gpu.merge_tile_slots` merge them.
  `extra` (xk, xv [B, E_pad, Hkv, D], bias [B, Hkv, E_pad] float32; `common.extra_tiles`): more
  keys, walked as E_pad / block_size more items, whose scores get the bias (-inf masks a row).
  Knobs: see `plan`; `semantics` picks Mosaic GPU's lowering ("lane": explicit layouts, the
  default of jax 0.10; "warpgroup": layouts inferred, the default of jax 0.11; None: the
  installed jax's default, as JAX's own FA3 kernel does); `interpret` runs Mosaic GPU's
  interpreter (True or an InterpretGPUParams) on the CPU.
  """
  chex.assert_rank([qg, k, v], 4)
  chex.assert_equal_shape([k, v])
  bsz, hkv, rows, d = qg.shape
  chex.assert_shape(k, (bsz, None, hkv, d))
  chex.assert_rank(sel.indices, 3)
  g, n = sel.indices.shape[1:]
  chex.assert_shape(sel.indices, (bsz, g, n))
  chex.assert_shape(sel.counts, (bsz, g))
  if g not in (1, hkv):
    raise ValueError(f"selection groups must be 1 or Hkv={hkv}, got {g}")
  if qg.dtype != k.dtype or qg.dtype != v.dtype:
    raise ValueError(f"q, k and v must share a dtype, got {qg.dtype}, {k.dtype}, {v.dtype}")
  s_len = k.shape[1]
  why = supported((bsz, 1, hkv, d), k.shape, qg.dtype, block_size)
  if why:
    raise ValueError(f"mosaic_gpu cannot run this: {why}")
  if not scale > 0:  # the row max is taken before scaling (one FMA a score): a sign would flip it
    raise ValueError(f"mosaic_gpu needs a positive softmax scale, got {scale}")
  nb = common.num_blocks(s_len, block_size)
  n_extra = 0
  if extra is not None:
    xk, xv, x_bias = extra
    chex.assert_shape([xk, xv], (bsz, None, hkv, d))
    chex.assert_shape(x_bias, (bsz, hkv, xk.shape[1]))
    if xk.shape[1] % block_size or xk.dtype != k.dtype or xv.dtype != k.dtype:
      raise ValueError(f"extra tiles must be whole blocks of {block_size} rows in {k.dtype}, "
                       f"got {xk.shape} {xk.dtype} (see common.extra_tiles)")
    n_extra = xk.shape[1] // block_size
  p = plan(bsz, hkv, rows, d, block_size, n + nb + n_extra, wg_rows=wg_rows, num_wgs=num_wgs,
           num_splits=num_splits, num_stages=num_stages, kv_blocks=kv_blocks,
           producer_regs=producer_regs, pingpong=pingpong, mask_full_steps=mask_full_steps)
  qg = common.pad_query_rows(qg, p.rows_per_program)  # zero queries: finite, dropped later
  idx = sel.indices.astype(jnp.int32)
  counts = sel.counts.astype(jnp.int32)
  if n == 0:
    idx = jnp.zeros((bsz, g, 1), jnp.int32)
    counts = jnp.zeros_like(counts)
  live = common.live_rows(row_counts, bsz, rows)
  meta = common.kernel_meta(counts, sel, live)  # [B, G, 8]
  if n_extra:  # a step's bias load reads kv_blocks tiles from its first extra one
    x_bias = jnp.pad(x_bias.astype(jnp.float32),
                     ((0, 0), (0, 0), (0, (p.kv_blocks - 1) * block_size)),
                     constant_values=-jnp.inf)

  mma = _mma_transforms(jnp.dtype(qg.dtype).itemsize)
  stages = p.num_stages
  scratch = [
      plgpu.SMEM((p.num_wgs, p.wg_rows, d), qg.dtype, transforms=mma),
      plgpu.SMEM((stages, p.kv_blocks * block_size, d), k.dtype, transforms=mma),
      plgpu.SMEM((stages, p.kv_blocks * block_size, d), v.dtype, transforms=mma),
      plgpu.Barrier(num_barriers=p.num_wgs),
      plgpu.Barrier(num_arrivals=p.kv_blocks, num_barriers=stages),  # one per TMA copy
      plgpu.Barrier(num_arrivals=p.kv_blocks, num_barriers=stages),
      plgpu.Barrier(num_arrivals=p.num_wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=p.num_wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=p.num_wgs),  # the ping-pong schedule (unused without it)
  ]
  params = dict(approx_math=approx_math)
  if semantics is not None:
    params["lowering_semantics"] = {"lane": plgpu.LoweringSemantics.Lane,
                                    "warpgroup": plgpu.LoweringSemantics.Warpgroup}[semantics]
  out_type = (
      jax.ShapeDtypeStruct((bsz, hkv, p.num_splits, p.rows_pad, d), jnp.float32),
      jax.ShapeDtypeStruct((bsz, hkv, p.num_splits, p.rows_pad), jnp.float32),
      jax.ShapeDtypeStruct((bsz, hkv, p.num_splits, p.rows_pad), jnp.float32),
  )
  interp = interpret_params(interpret)
  body = functools.partial(_kernel, hkv=hkv, per_head=g > 1, n_sel=max(1, n), seq_len=s_len,
                           block_size=block_size, n_extra=n_extra, scale=float(scale), p=p,
                           dtype=qg.dtype, interpreting=interp is not None)
  parts = plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch,
      grid=(bsz * hkv, p.row_tiles, p.num_splits),
      grid_names=("bh", "rt", "sp"),
      num_threads=p.num_wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(**params),
      interpret=interp,
  )(idx, meta, qg, k, v, *((xk, xv, x_bias) if n_extra else ()))
  return parts, live, p.rows_per_program
