"""Block-sparse attention on GPU: a Pallas kernel with the Triton lowering (Ampere and Hopper).

Decode-style split-KV. The grid is (batch * kv head, query-row tile, KV split). A program walks its
share of the work items of its (batch, kv head): the normalised selected prompt blocks, then the
blocks covering the response range; each item is one [block_size, D] tile of K and of V, read in
place from the [B, S, Hkv, D] cache (the G query heads of a kv head share it: GQA without repeats).
It writes an unnormalised partial (acc, m, l); a small XLA step merges the splits by log-sum-exp.
Block ids are runtime inputs loaded inside the kernel (the GPU lowerings have no scalar prefetch).

Query rows past `row_counts` (padded query slots; the rows are query-major, see
`common.group_queries`) are not computed: a program whose row tile holds none of them works for a
tile that does, as extra KV splits of it (`common.tile_plan`), so the row tiles of a step that
runs few queries split the keys finer instead of idling. Compute-bound layouts gain (Dream's
7-head groups: 32 query slots make 4 tiles of 64 rows, 7 active queries make 1).

Extra keys given as cache rows (`extra_positions`: Focus's sinks) are gathered inside the kernel
by split 0 of each (batch * kv head, row tile), which starts its softmax from them: no XLA gather,
no separate partial and no extra merge input (about 6 small kernels per sparse layer fewer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from focus_jax.kernels.sparse import common

NUM_SMS_FALLBACK = 132  # H100/H200, when the device does not say (only steers the splits)
PROGRAMS_PER_SM = 2  # resident at once with 4 warps and 3 stages of 64 x 128 bf16 K and V tiles


@functools.cache
def num_sms() -> int:
  """Streaming multiprocessors of the default device (jax reports them as `core_count`)."""
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or NUM_SMS_FALLBACK
  except RuntimeError:
    return NUM_SMS_FALLBACK


def supported(q_shape, k_shape, block_size: int) -> str | None:
  """None when the kernel handles these shapes, else why not."""
  d = q_shape[-1]
  s_len = k_shape[1]
  if d < 16 or d & (d - 1):
    return f"head dim {d} is not a power of two >= 16"
  if block_size < 16 or block_size & (block_size - 1):
    return f"block_size {block_size} is not a power of two >= 16"
  if s_len < block_size:
    return f"cache length {s_len} is shorter than a block"
  return None


def default_config(bsz: int, hkv: int, rows: int, n_sel: int, n_resp_max: int) -> dict:
  """Tile sizes from the H100 tuning at 32K (benchmarks/results/kernels_*.json, "tune").

  Rows per program up to 64 (a GQA group of 28 heads x 32 queries takes 4 row tiles), 3
  pipeline stages, and as many KV splits as fit in **one wave** of two resident programs per SM:
  one split more spills a tail wave that runs with most SMs idle. At 32K, alpha 0.5 on the H100,
  LLaDA's 32 heads ran 9 splits (288 programs) in 136.5 us against 108.0 us for 8 (256);
  Dream's 16 row tiles, compute-bound, ran 38.4 us with 17 splits and 38.9 us with 16
  (benchmarks/results/kernels_h100_waves.json).
  """
  rows_p2 = max(16, pl.next_power_of_2(rows))
  block_m = min(rows_p2, 64)
  m_tiles = -(-rows // block_m)
  items = max(1, n_sel + n_resp_max)
  slots = PROGRAMS_PER_SM * num_sms()
  splits = max(1, min(slots // (bsz * hkv * m_tiles), -(-items // 4), 64))
  return dict(block_m=block_m, num_splits=splits, num_warps=4, num_stages=3)


def extra_rows(positions: jax.Array, valid: jax.Array,
               seq_len: int) -> tuple[jax.Array, jax.Array]:
  """(positions [B, E'] clipped into the cache, validity [B, 1 or Hkv, E'] int32), E' = E padded
  to a power of two >= 16 (a Triton dot's smallest side) with invalid rows."""
  e = positions.shape[1]
  e_pad = max(16, pl.next_power_of_2(e))
  pos = common.clip_rows(positions, seq_len)
  ok = (valid[:, None, :] if valid.ndim == 2 else jnp.swapaxes(valid, 1, 2)).astype(jnp.int32)
  if e_pad != e:
    pos = jnp.pad(pos, ((0, 0), (0, e_pad - e)))
    ok = jnp.pad(ok, ((0, 0), (0, 0), (0, e_pad - e)))
  return pos, ok


def merge_tile_slots(acc, m, l, live_rows, block_m: int) -> common.Partial:
  """The kernel's partials [B, Hkv, splits, m_tiles * block_m, ...] (slot j's rows hold tile
  j mod n_live's) merged by log-sum-exp into [B, Hkv, m_tiles * block_m, ...].

  Two stages: the splits first (`common.merge_splits`, one pass over the large partials), then the
  slots into their tiles over the small per-slot results. One masked reduction over both made
  XLA transpose the partials first (kernels/README.md has the numbers)."""
  per_slot = common.merge_splits(acc, m, l)  # [B, Hkv, slot * block_m, ...]
  bsz, hkv, rows_pad, d = per_slot.acc.shape
  mt = rows_pad // block_m
  n_live = common.live_tiles(live_rows, block_m, mt)  # [B]
  owner = jnp.arange(mt)[None, :] % n_live[:, None]  # [B, slot]
  assign = owner[:, :, None] == jnp.arange(mt)[None, None, :]  # [B, slot, tile]
  assign = assign[:, None, :, :, None]  # [B, 1, slot, tile, 1]
  m4 = per_slot.m.reshape(bsz, hkv, mt, 1, block_m)
  mx = jnp.max(jnp.where(assign, m4, common.NEG_INIT), axis=2)  # [B, Hkv, tile, block_m]
  w = jnp.where(assign, jnp.exp(m4 - mx[:, :, None]), 0.0)  # [B, Hkv, slot, tile, block_m]
  l_tot = jnp.sum(w * per_slot.l.reshape(bsz, hkv, mt, 1, block_m), axis=2)
  acc_tot = jnp.sum(w[..., None] * per_slot.acc.reshape(bsz, hkv, mt, 1, block_m, d), axis=2)
  return common.Partial(acc_tot.reshape(bsz, hkv, rows_pad, d), mx.reshape(bsz, hkv, rows_pad),
                        l_tot.reshape(bsz, hkv, rows_pad))


MERGE_ROWS = 8  # rows of one merge program
MERGE_D = 64  # head-dim chunk of one merge program: [splits, rows, d] float32 in registers


def _power_of_two_runs(n: int) -> list[tuple[int, int]]:
  """(start, size) runs of power-of-two sizes covering range(n), largest first (17 = 16 + 1):
  each run is one [run, rows, d] load, as Triton tiles need power-of-two shapes."""
  runs, s0 = [], 0
  for bit in reversed(range(n.bit_length())):
    if n >> bit & 1:
      runs.append((s0, 1 << bit))
      s0 += 1 << bit
  return runs


def _merge_kernel(live_ref, acc_ref, m_ref, l_ref, *out_refs, block_m: int, m_tiles: int,
                  rows: int, g: int, hq: int, hkv: int, n_splits: int, d_chunk: int,
                  merge_rows: int):
  """One program: merge_rows rows x d_chunk of one (batch, kv head). It merges, by log-sum-exp,
  every split of every slot that worked for the rows' tile, normalises, and writes the rows in
  the public [T * Hq, D] order (row t*G + g of kv head h is query t, head h*G + g)."""
  out_ref = out_refs[0]
  h = pl.program_id(0) % hkv
  r0 = pl.program_id(1) * merge_rows
  d0 = pl.program_id(2) * d_chunk
  live_rows = live_ref[0]
  n_live = common.live_tiles(live_rows, block_m, m_tiles)
  tile = r0 // block_m
  n_slots = jnp.where(tile < n_live, common.slots_of_tile(tile, n_live, m_tiles), 0)
  runs = _power_of_two_runs(n_splits)

  def merge_slot(i, carry):
    row = (tile + i * n_live) * block_m + r0 % block_m  # the slot's copy of these rows
    for start, size in runs:
      mx, l, acc = carry
      at = (pl.ds(start, size), pl.ds(row, merge_rows))
      m_s, l_s = m_ref[at], l_ref[at]  # [run, rows]
      a_s = acc_ref[at + (pl.ds(d0, d_chunk),)]  # [run, rows, d]
      mx_new = jnp.maximum(mx, jnp.max(m_s, axis=0))
      w = jnp.exp(m_s - mx_new[None, :])
      corr = jnp.exp(mx - mx_new)
      carry = (mx_new, l * corr + jnp.sum(w * l_s, axis=0),
               acc * corr[:, None] + jnp.sum(w[:, :, None] * a_s, axis=0))
    return carry

  init = (jnp.full((merge_rows,), common.NEG_INIT, jnp.float32),
          jnp.zeros((merge_rows,), jnp.float32), jnp.zeros((merge_rows, d_chunk), jnp.float32))
  mx, l, acc = lax.fori_loop(0, n_slots, merge_slot, init)
  r = r0 + jnp.arange(merge_rows, dtype=jnp.int32)
  seen = (l > 0) & (r < live_rows)  # padded query slots come back as zeros
  out = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
  dest = (r // g) * hq + h * g + r % g
  in_range = r < rows
  cols = d0 + jnp.arange(d_chunk, dtype=jnp.int32)
  plgpu.store(out_ref.at[dest[:, None], cols[None, :]], out.astype(out_ref.dtype),
              mask=in_range[:, None])  # a scatter of rows; array indices on both axes
  if len(out_refs) > 1:
    @pl.when(pl.program_id(2) == 0)
    def _():
      lse = jnp.where(seen, mx + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
      plgpu.store(out_refs[1].at[dest], lse, mask=in_range)


def merge_to_output(acc, m, l, live_rows, *, block_m: int, rows: int, t: int, hq: int, dtype,
                    return_lse: bool, merge_rows: int = MERGE_ROWS, merge_d: int = MERGE_D,
                    interpret: bool = False):
  """The kernel's partials [B, Hkv, splits, m_tiles * block_m, ...] -> the public output
  [B, T, Hq, D] in `dtype` (and the lse [B, T, Hq] float32), in one Pallas kernel.

  The XLA form of the same merge (`merge_tile_slots`, then normalise, ungroup and cast) ran as
  five kernels per sparse layer, about 0.27 ms of a Dream-7B 32K step (H200 trace,
  `profile_step_h200_dream_cached_r4.json`). Rows >= live_rows[b] are zeros (lse -inf)."""
  bsz, hkv, n_splits, rows_pad, d = acc.shape
  m_tiles = rows_pad // block_m
  g = hq // hkv
  d_chunk = min(merge_d, d)
  merge_rows = min(merge_rows, block_m)
  pow2 = lambda x: x >= 1 and not x & (x - 1)
  if not (pow2(merge_rows) and pow2(d_chunk) and block_m % merge_rows == 0 and d % d_chunk == 0):
    raise ValueError(f"merge tiling: merge_rows ({merge_rows}) and merge_d ({d_chunk}) must be "
                     f"powers of two dividing block_m ({block_m}) and the head dim ({d})")
  if rows != t * g:
    raise ValueError(f"merge: {rows} rows per kv head, expected T * Hq / Hkv = {t * g}")
  kernel = functools.partial(_merge_kernel, block_m=block_m, m_tiles=m_tiles, rows=rows, g=g,
                             hq=hq, hkv=hkv, n_splits=n_splits, d_chunk=d_chunk,
                             merge_rows=merge_rows)
  part_spec = lambda *tail: pl.BlockSpec((None, None, n_splits, rows_pad) + tail,
                                         lambda bh, r, dc: (bh // hkv, bh % hkv, 0, 0)
                                         + (0,) * len(tail))
  out_shape = [jax.ShapeDtypeStruct((bsz, t * hq, d), dtype)]
  out_specs = [pl.BlockSpec((None, t * hq, d), lambda bh, r, dc: (bh // hkv, 0, 0))]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((bsz, t * hq), jnp.float32))
    out_specs.append(pl.BlockSpec((None, t * hq), lambda bh, r, dc: (bh // hkv, 0)))
  outs = pl.pallas_call(
      kernel,
      grid=(bsz * hkv, rows_pad // merge_rows, d // d_chunk),
      in_specs=[pl.BlockSpec((None, 1), lambda bh, r, dc: (bh // hkv, 0)),
                part_spec(d), part_spec(), part_spec()],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="block_sparse_attention_merge",
  )(live_rows.astype(jnp.int32)[:, None], acc, m, l)
  out = outs[0].reshape(bsz, t, hq, d)
  if not return_lse:
    return out
  return out, outs[1].reshape(bsz, t, hq)


def _kernel(sel_ref, meta_ref, q_ref, k_ref, v_ref, *refs, block_size: int, num_splits: int,
            seq_len: int, scale: float, n_sel: int, static_items: int, prefetch: bool,
            extra: bool, block_m: int, m_tiles: int, dedup_extra: bool):
  if extra:
    xpos_ref, xvalid_ref, acc_ref, m_ref, l_ref = refs
  else:
    acc_ref, m_ref, l_ref = refs
  bs = block_size
  split = pl.program_id(2)
  count = meta_ref[0]
  ps = meta_ref[1]
  rs = meta_ref[2]
  re = meta_ref[3]
  resp_first = rs // bs
  n_resp = jnp.where(re > rs, (re - 1) // bs - resp_first + 1, 0)
  total = count + n_resp
  tile, split, splits = common.tile_plan(meta_ref[4], block_m, m_tiles, pl.program_id(1),
                                         split, num_splits)
  # Static loops walk `static_items` slots (enough for num_splits splits), masked past hi_item.
  per = (total + splits - 1) // splits
  lo_item = jnp.minimum(split * per, total)
  hi_item = jnp.minimum(lo_item + per, total)

  q = q_ref[pl.ds(tile * block_m, block_m), :]  # [block_m, D]
  d = q.shape[1]
  offs = jnp.arange(bs, dtype=jnp.int32)

  def slot(j):
    """Loop counter -> (item index, clamped to a real tile; whether the slot holds an item)."""
    i = lo_item + j if static_items else j
    live = i < hi_item
    return jnp.minimum(i, jnp.maximum(total - 1, 0)), live

  def tile(i):
    """Item -> (tile start, first and last+1 key of the item inside the tile)."""
    is_sel = i < count
    blk = jnp.where(is_sel, sel_ref[jnp.minimum(i, n_sel - 1)], resp_first + (i - count))
    start = blk * bs
    lo = jnp.where(is_sel, jnp.maximum(start, ps), jnp.maximum(start, rs))
    hi = jnp.where(is_sel, jnp.minimum(start + bs, rs), jnp.minimum(start + bs, re))
    w = jnp.minimum(start, seq_len - bs)  # the tile stays inside the cache when S % bs != 0
    return w, lo, hi

  def load(w):
    return k_ref[pl.ds(w, bs), :], v_ref[pl.ds(w, bs), :]

  def attend(acc, m, l, k, v, w, lo, hi, live):
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    pos = w + offs
    ok = (pos >= lo) & (pos < hi) & live
    s = jnp.where(ok[None, :], s * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * corr + jnp.sum(p, axis=1)
    acc = acc * corr[:, None] + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((block_m, d), jnp.float32), jnp.full((block_m,), common.NEG_INIT, jnp.float32),
          jnp.zeros((block_m,), jnp.float32))
  if extra:
    def extra_partial():
      """The extra keys (cache rows at xpos, masked by xvalid): the start of split 0's softmax."""
      pos = xpos_ref[...]
      ok = xvalid_ref[...] != 0
      if dedup_extra:  # a row a selected block (or the response) already attends counts once
        blk = pos // bs
        chunk = min(64, n_sel)

        def scan(j, hit):
          ids = sel_ref[pl.ds(j * chunk, chunk)]
          live = (j * chunk + jnp.arange(chunk, dtype=jnp.int32)) < count
          match = (blk[:, None] == ids[None, :]) & live[None, :]
          return jnp.maximum(hit, jnp.max(match.astype(jnp.int32), axis=1))
        hit = lax.fori_loop(0, (count + chunk - 1) // chunk, scan,
                            jnp.zeros(pos.shape, jnp.int32))
        ok = ok & ~((hit > 0) & (pos >= ps) & (pos < rs)) & ~((pos >= rs) & (pos < re))
      k, v = k_ref[pos, :], v_ref[pos, :]  # [E, D] gathers
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      s = jnp.where(ok[None, :], s * scale, -jnp.inf)
      m = jnp.maximum(jnp.max(s, axis=1), common.NEG_INIT)
      p = jnp.exp(s - m[:, None])
      acc = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
      return acc, m, jnp.sum(p, axis=1)
    init = lax.cond(split == 0, extra_partial, lambda: init)
  j_lo, j_hi = (0, static_items) if static_items else (lo_item, hi_item)

  if not prefetch:
    def body(j, carry):
      i, live = slot(j)
      w, lo, hi = tile(i)
      k, v = load(w)
      return attend(*carry, k, v, w, lo, hi, live)
    acc, m, l = lax.fori_loop(j_lo, j_hi, body, init)
  else:
    # Register double-buffering: the next item's K/V loads are issued before this item's math,
    # so a dependent (index -> address -> tile) load chain never stalls the loop.
    def body(j, carry):
      acc, m, l, k, v, w, lo, hi, live = carry
      i_n, live_n = slot(j + 1)
      w_n, lo_n, hi_n = tile(i_n)
      k_n, v_n = load(w_n)
      acc, m, l = attend(acc, m, l, k, v, w, lo, hi, live)
      return acc, m, l, k_n, v_n, w_n, lo_n, hi_n, live_n
    i0, live0 = slot(j_lo)
    w0, lo0, hi0 = tile(i0)
    k0, v0 = load(w0)
    acc, m, l, *_ = lax.fori_loop(j_lo, j_hi, body, (*init, k0, v0, w0, lo0, hi0, live0))
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def sparse_partial(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection, *,
                   row_counts: jax.Array | None = None, **kwargs) -> common.Partial:
  """qg [B, Hkv, R, D] (rows of one kv head), k/v [B, S, Hkv, D] -> partial over the selection,
  and over the cache rows `extra_positions` [B, E] where `extra_valid` ([B, E] or [B, E, Hkv]).
  Rows at and past `row_counts` [B] are not computed (their partial is empty); with
  `dedup_extra`, an extra row the selection already attends is skipped. The splits are merged
  in XLA: for callers that merge further segments on top (see `sparse_attention`)."""
  (acc, m, l), live_rows = split_partials(qg, k, v, sel, row_counts=row_counts, **kwargs)
  rows, block_m = qg.shape[2], kwargs["block_m"]
  if acc.shape[3] > block_m and row_counts is not None:
    return merge_tile_slots(acc, m, l, live_rows, block_m).first_rows(rows)
  return common.merge_splits(acc, m, l).first_rows(rows)


def sparse_attention(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection, *,
                     t: int, hq: int, dtype, return_lse: bool = False,
                     row_counts: jax.Array | None = None, interpret: bool = False,
                     merge_rows: int = MERGE_ROWS, merge_d: int = MERGE_D, **kwargs):
  """The whole attention of `sparse_partial`'s contract, merged and laid out by one Pallas
  kernel (`merge_to_output`, tiled by merge_rows / merge_d): out [B, T, Hq, D] in
  `dtype` (and the lse [B, T, Hq] float32). Rows at and past `row_counts` come back as zeros
  (lse -inf), as padded query slots do."""
  (acc, m, l), live_rows = split_partials(qg, k, v, sel, row_counts=row_counts,
                                          interpret=interpret, **kwargs)
  return merge_to_output(acc, m, l, live_rows, block_m=kwargs["block_m"], rows=qg.shape[2], t=t,
                         hq=hq, dtype=dtype, return_lse=return_lse, merge_rows=merge_rows,
                         merge_d=merge_d, interpret=interpret)


def split_partials(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection, *,
                   block_size: int, scale: float, block_m: int, num_splits: int, num_warps: int,
                   num_stages: int, static_loop: bool = False, prefetch: bool = False,
                   n_resp_max: int = 0, extra_positions: jax.Array | None = None,
                   extra_valid: jax.Array | None = None, row_counts: jax.Array | None = None,
                   dedup_extra: bool = False, interpret: bool = False):
  """The split-KV kernel itself: ((acc [B, Hkv, splits, R_pad, D], m, l [B, Hkv, splits,
  R_pad]) float32, live rows [B] int32). R_pad is R padded to row tiles; a slot's rows hold the
  partial of live tile `slot mod n_live` (`common.tile_plan`)."""
  bsz, hkv, rows, d = qg.shape
  s_len = k.shape[1]
  g, n = sel.indices.shape[1:]
  qg = common.pad_query_rows(qg, block_m)
  rows_pad = qg.shape[2]
  m_tiles = rows_pad // block_m
  n_pad = max(2, pl.next_power_of_2(n))  # power-of-two refs are what Triton likes
  idx = sel.indices
  if n_pad != n:  # (an empty list pads with block 0, which its count of 0 never reads)
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, n_pad - n)), mode="edge" if n else "constant")
  live_rows = common.live_rows(row_counts, bsz, rows)
  meta = common.kernel_meta(sel.counts, sel, live_rows)  # [B, G, 8]
  per_head = g > 1

  def gsel(bh):
    return bh % hkv if per_head else 0

  static_items = -(-(n + n_resp_max) // num_splits) if static_loop else 0
  extra = extra_positions is not None
  kernel = functools.partial(_kernel, block_size=block_size, num_splits=num_splits,
                             seq_len=s_len, scale=scale, n_sel=n_pad, static_items=static_items,
                             prefetch=prefetch, extra=extra, block_m=block_m, m_tiles=m_tiles,
                             dedup_extra=dedup_extra)
  grid = (bsz * hkv, m_tiles, num_splits)
  in_specs = [
      pl.BlockSpec((None, None, n_pad), lambda bh, mt, sp: (bh // hkv, gsel(bh), 0)),
      pl.BlockSpec((None, None, 8), lambda bh, mt, sp: (bh // hkv, gsel(bh), 0)),
      pl.BlockSpec((None, None, rows_pad, d), lambda bh, mt, sp: (bh // hkv, bh % hkv, 0, 0)),
      pl.BlockSpec((None, s_len, None, d), lambda bh, mt, sp: (bh // hkv, 0, bh % hkv, 0)),
      pl.BlockSpec((None, s_len, None, d), lambda bh, mt, sp: (bh // hkv, 0, bh % hkv, 0)),
  ]
  operands = [idx, meta, qg, k, v]
  if extra:
    xpos, xvalid = extra_rows(extra_positions, extra_valid, s_len)
    e_pad = xpos.shape[1]
    valid_per_head = xvalid.shape[1] > 1
    in_specs += [pl.BlockSpec((None, e_pad), lambda bh, mt, sp: (bh // hkv, 0)),
                 pl.BlockSpec((None, None, e_pad), lambda bh, mt, sp: (
                     bh // hkv, bh % hkv if valid_per_head else 0, 0))]
    operands += [xpos, xvalid]
  acc, m, l = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, None, block_m, d),
                       lambda bh, mt, sp: (bh // hkv, bh % hkv, sp, mt, 0)),
          pl.BlockSpec((None, None, None, block_m), lambda bh, mt, sp: (bh // hkv, bh % hkv, sp, mt)),
          pl.BlockSpec((None, None, None, block_m), lambda bh, mt, sp: (bh // hkv, bh % hkv, sp, mt)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((bsz, hkv, num_splits, rows_pad, d), jnp.float32),
          jax.ShapeDtypeStruct((bsz, hkv, num_splits, rows_pad), jnp.float32),
          jax.ShapeDtypeStruct((bsz, hkv, num_splits, rows_pad), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="block_sparse_attention_split_kv",
  )(*operands)
  return (acc, m, l), live_rows
