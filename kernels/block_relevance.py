"""Relevance of key blocks to a weighted set of query rows, and the top blocks by it.

    relevance[b, h, n] = sum_r w[b, r] * softmax over valid n' of (score(q[b, h, r], rep[b, h, n']) * scale)[n]

`score` is q . rep (`bound=False`), or, for representatives stored as [centre, radius] (`bound=True`,
Quest's box), the upper bound q . centre + |q| . radius of the block's largest logit. Invalid
blocks get relevance 0 and take no share of any row's softmax; a row with no valid block adds
nothing.

`block_relevance` is the definition in XLA. `select_top_blocks` keeps the `keep` most relevant
valid blocks of every (batch, kv head) (fewer where `row_keep` caps a row: Focus keeps alpha of
each row's own blocks), ties to the lower id, as `lax.top_k` breaks them:
  "xla" (what Focus uses): `block_relevance`, then `lax.top_k` (ids in relevance order);
  "pallas_gpu": one Pallas kernel (Triton lowering) per call, one program per (batch, kv head):
    the scores, the softmax and the weighted sum over the live rows, then an exact top-k by
    bisection on the relevance's bits and a compaction of the kept ids (ascending). It reads the
    query rows in place from [B, T, Hq, D] and skips the 16-row tiles past `live_queries` slots,
    so a Focus step scores its I_focus rows (rounded up to a tile), not all slots: about 8 XLA
    kernels (a transpose, a concatenation, the GEMM, the softmax, reductions and a sort) become
    one launch. Weights must be >= 0 and scores finite (as Focus's are). Under a multi-device
    mesh it runs per device on its rows and kv heads (`kernels/partition.py`).

**The Pallas kernel is not adopted: it is slower** (H100, 2026-12-06, 32 query slots of which 4
hold I_focus, per sparse layer inside a loop; `benchmarks/kernels.py --phases relevance`,
`benchmarks/results/kernels_h100_selection.json`): LLaDA-8B 32K 33.8 us against XLA's 22.9,
Dream-7B 32K 40.6 against 13.4, LLaDA-8B 8K batch 8 18.4 against 17.1; end to end the Focus step
went 10.41 -> 10.80 ms (LLaDA-8B 32K) and 7.19 / 7.32 -> 7.68 ms (Dream-7B 32K); at 8K batch 8
(one 128-block tile, the draft kernel) about even, 15.78 -> 15.66 ms in one run. Taking parts
out of the kernel (scratch runs, same H100) put about 17 us (LLaDA) and 28 us (Dream) in the
relevance loop, 4-6 us in the bisection and 13.6 us in what is left (launch, loads, compaction,
stores): one program per (batch, kv head) walks its 512 blocks' scores twice, serially, where
XLA spreads the GEMM and the softmax over the GPU (Dream has 4 kv heads: 4 programs). A version
that splits the blocks over programs (per-tile softmax statistics, merged) is what could win.
"""

from __future__ import annotations

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from focus_jax.kernels import partition
from focus_jax.kernels.sparse.common import group_queries

IMPLEMENTATIONS = ("xla", "pallas_gpu")
NEG_INIT = -1e30  # finite running max of an empty row: no inf - inf
ROW_TILE = 16  # query rows per dot in the selection kernel (a Triton dot's smallest M)
MAX_CHUNK = 128  # blocks per score tile
BISECT_STEPS = 31  # halvings of [0, inf bits): down to one key value


def check_inputs(qg, row_weight, representatives, block_valid, bound: bool) -> None:
  """Shape checks at the public boundary of `block_relevance`."""
  chex.assert_rank([qg, representatives], 4)
  b, hkv, rows, d = qg.shape
  chex.assert_shape(row_weight, (b, rows))
  chex.assert_shape(representatives, (b, hkv, None, 2 * d if bound else d))
  chex.assert_shape(block_valid, (b, representatives.shape[2]))


def block_representatives(keys: jax.Array, valid: jax.Array, kind: str):
  """keys [B, NB, bs, Hkv, D] in blocks, valid [B, NB, bs] -> (representatives [B, Hkv, NB, D
  or 2D] in keys' dtype, block_valid [B, NB]).

  kind "mean": the block's mean key; "max": its channel-wise max; "bound": Quest's box, stored
  as [centre, radius] of the channel-wise [min, max] (2D channels), so that
  q . centre + |q| . radius = sum_d max(q_d min_d, q_d max_d) >= max_j q . k_j: a block holding
  one strongly matching key scores at least that key's logit (the mean dilutes it by the block
  size). Only valid keys count; a block with no valid key is invalid. Head-major, so a
  relevance is a batched GEMM over (batch, kv head) with no transpose."""
  dtype = keys.dtype
  keys = keys.astype(jnp.float32)
  count = jnp.sum(valid, axis=2)
  if kind == "mean":
    rep = jnp.sum(jnp.where(valid[..., None, None], keys, 0.0), axis=2)
    rep = rep / jnp.maximum(count, 1)[..., None, None]
  else:
    hi = jnp.max(jnp.where(valid[..., None, None], keys, -jnp.inf), axis=2)
    hi = jnp.where(count[..., None, None] > 0, hi, 0.0)
    rep = hi
    if kind == "bound":
      lo = jnp.min(jnp.where(valid[..., None, None], keys, jnp.inf), axis=2)
      lo = jnp.where(count[..., None, None] > 0, lo, 0.0)
      rep = jnp.concatenate([(hi + lo) / 2, (hi - lo) / 2], axis=-1)
  return jnp.swapaxes(rep, 1, 2).astype(dtype), count > 0


def bound_logits(qg, representatives, block_valid, *, bound: bool, scale: float) -> jax.Array:
  """qg [B, Hkv, R, D] rows -> their scaled scores [B, Hkv, R, NB] float32 against the blocks'
  representatives (Quest's upper bound with `bound`), -inf at invalid blocks."""
  if bound:  # q . centre + |q| . radius as one product over 2D channels: one GEMM, not two
    qg = jnp.concatenate([qg, jnp.abs(qg)], axis=-1)
  logits = jnp.einsum("bhrd,bhnd->bhrn", qg, representatives, preferred_element_type=jnp.float32)
  return jnp.where(block_valid[:, None, None, :], logits * scale, -jnp.inf)


def block_relevance_xla(qg, row_weight, representatives, block_valid, *, bound: bool,
                        scale: float) -> jax.Array:
  """The definition, in XLA: [B, Hkv, R, D] rows -> [B, Hkv, NB] float32."""
  logits = bound_logits(qg, representatives, block_valid, bound=bound, scale=scale)
  valid = block_valid[:, None, None, :]
  probs = jnp.where(valid, jax.nn.softmax(logits, axis=-1), 0.0)  # rows of all -inf: 0, not nan
  return jnp.einsum("bhrn,br->bhn", probs, row_weight.astype(jnp.float32))


def block_relevance(qg: jax.Array, row_weight: jax.Array, representatives: jax.Array,
                    block_valid: jax.Array, *, bound: bool,
                    scale: float | None = None) -> jax.Array:
  """qg [B, Hkv, R, D], row_weight [B, R], representatives [B, Hkv, NB, D or 2D (bound)],
  block_valid [B, NB] -> relevance [B, Hkv, NB] float32 (0 at invalid blocks)."""
  check_inputs(qg, row_weight, representatives, block_valid, bound)
  scale = qg.shape[-1] ** -0.5 if scale is None else float(scale)
  return block_relevance_xla(qg, row_weight, representatives, block_valid, bound=bound,
                             scale=scale)


# ----------------------------------------------------------------------------------------------
# Top blocks.

def row_weights(query_weight: jax.Array, group: int) -> jax.Array:
  """[B, T] per query -> [B, T*G] per (t, g) row of `group_queries`: the G heads of a group
  share the query's weight equally."""
  return jnp.repeat(query_weight.astype(jnp.float32), group, axis=1) / group


def top_blocks(relevance: jax.Array, block_valid: jax.Array, keep: int,
               row_keep: jax.Array | None = None):
  """relevance [B, G, NB], block_valid [B, NB] -> (ids [B, G, keep] int32 by `lax.top_k`,
  counts [B, G] int32 = min(keep, row_keep, valid blocks)): invalid blocks score -inf and come
  last. `row_keep` [B] (None: `keep`) caps each row's count below the static `keep`."""
  _, ids = lax.top_k(jnp.where(block_valid[:, None, :], relevance, -jnp.inf), keep)
  n_valid = jnp.sum(block_valid, axis=1, dtype=jnp.int32)
  cap = _row_cap(row_keep, keep, n_valid.shape[0])
  counts = jnp.broadcast_to(jnp.minimum(cap, n_valid)[:, None], relevance.shape[:2])
  return ids.astype(jnp.int32), counts


def budget_per_row(block_valid: jax.Array, budget: Callable[[int], int]) -> jax.Array:
  """[B] int32: `budget(n)` for each row's count n of valid blocks (block_valid [B, NB]): a
  static table over n = 0..NB read by the count, so every row gets exactly the rounding the
  static count gets (callers' caps for left-padded rows, `row_keep`)."""
  table = jnp.asarray([budget(n) for n in range(block_valid.shape[1] + 1)], jnp.int32)
  return table[jnp.sum(block_valid, axis=1, dtype=jnp.int32)]


def _row_cap(row_keep: jax.Array | None, keep: int, bsz: int) -> jax.Array:
  """Each row's most kept blocks, [B] int32 in [0, keep]."""
  if row_keep is None:
    return jnp.full((bsz,), keep, jnp.int32)
  row_keep = jnp.asarray(row_keep, jnp.int32)
  chex.assert_shape(row_keep, (bsz,))
  return jnp.clip(row_keep, 0, keep)


def select_top_blocks_xla(q, query_weight, representatives, block_valid, *, keep: int,
                          bound: bool, scale: float, return_relevance: bool = False,
                          row_keep: jax.Array | None = None):
  """`block_relevance` over the (t, g) rows, then `top_blocks` (ids in relevance order)."""
  hkv = representatives.shape[1]
  relevance = block_relevance_xla(group_queries(q, hkv),
                                  row_weights(query_weight, q.shape[2] // hkv), representatives,
                                  block_valid, bound=bound, scale=scale)
  out = top_blocks(relevance, block_valid, keep, row_keep)
  return out + (relevance,) if return_relevance else out


def supported(q_shape, n_blocks: int) -> str | None:
  """None when the Pallas selection kernel handles these shapes, else why not."""
  d = q_shape[-1]
  if d < 16 or d & (d - 1):
    return f"head dim {d} is not a power of two >= 16"
  if n_blocks < 1:
    return "no prompt block to select from"
  return None


def _select_kernel(row_ref, q_ref, w_ref, rep_ref, valid_ref, idx_ref, cnt_ref, *rel_ref,
                   n_blocks: int, keep: int, chunk: int, group: int, bound: bool, scale: float):
  """One program: one (batch, kv head). row_ref [2] (the row's live query slots and the most
  blocks it keeps, <= keep), q_ref [T, Hq, D] (the batch row), w_ref [T],
  rep_ref [NB, D or 2D], valid_ref [NB]; writes idx_ref [keep + 1] (the last entry is where
  masked-off lanes point), cnt_ref [1] (and rel_ref [tiles * chunk]).

  Blocks are handled as a [tiles, chunk] grid (tiles a power of two); the scores of one
  [ROW_TILE, chunk] tile at a time, in loops, so shared memory holds one dot's operands."""
  h = pl.program_id(0) % (q_ref.shape[1] // group)
  t_len, d = q_ref.shape[0], q_ref.shape[2]
  n_chunks = -(-n_blocks // chunk)
  tiles = pl.next_power_of_2(n_chunks)
  lane = jnp.arange(chunk, dtype=jnp.int32)
  tile_of = lax.broadcasted_iota(jnp.int32, (tiles, chunk), 0)
  ids = tile_of * chunk + lane[None, :]  # [tiles, chunk] block ids
  valid = plgpu.load(valid_ref.at[jnp.minimum(ids, n_blocks - 1)], mask=ids < n_blocks,
                     other=0) != 0
  cols = jnp.arange(d, dtype=jnp.int32)
  dims = (((1,), (1,)), ((), ()))

  def scores(c, q, q_abs):
    """Scaled scores [ROW_TILE, chunk] of tile c's blocks, -inf at invalid ones."""
    rows = pl.ds(c * chunk, chunk)  # the last tile may run past NB: its lanes there are masked
    ok = c * chunk + lane < n_blocks
    s = lax.dot_general(q, plgpu.load(rep_ref.at[rows, pl.ds(0, d)], mask=ok[:, None],
                                      other=0.0), dims, preferred_element_type=jnp.float32)
    if bound:
      s += lax.dot_general(q_abs, plgpu.load(rep_ref.at[rows, pl.ds(d, d)], mask=ok[:, None],
                                             other=0.0), dims, preferred_element_type=jnp.float32)
    ok &= plgpu.load(valid_ref.at[rows], mask=ok, other=0) != 0
    return jnp.where(ok[None, :], s * scale, -jnp.inf)

  def row_tile(i, rel):
    """Adds one tile of (t, g) rows' weighted block softmaxes to the relevance grid."""
    r = i * ROW_TILE + jnp.arange(ROW_TILE, dtype=jnp.int32)
    t = jnp.minimum(r // group, t_len - 1)
    live = r // group < t_len
    q = plgpu.load(q_ref.at[t[:, None], (h * group + r % group)[:, None], cols[None, :]],
                   mask=live[:, None], other=0.0)
    w = jnp.where(live, plgpu.load(w_ref.at[t]), 0.0) / group
    q_abs = jnp.abs(q) if bound else None

    def stats(c, carry):  # pass 1: each row's softmax max and denominator (online)
      m, l = carry
      s = scores(c, q, q_abs)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      return m_new, l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)

    m, l = lax.fori_loop(0, n_chunks, stats, (jnp.full((ROW_TILE,), NEG_INIT, jnp.float32),
                                              jnp.zeros((ROW_TILE,), jnp.float32)))
    row_scale = jnp.where(l > 0, w / jnp.where(l > 0, l, 1.0), 0.0)

    def emit(c, rel):  # pass 2: probabilities, weighted, summed over the rows, into tile c
      p = jnp.exp(scores(c, q, q_abs) - m[:, None]) * row_scale[:, None]
      return rel + jnp.where(tile_of == c, jnp.sum(p, axis=0)[None, :], 0.0)

    return lax.fori_loop(0, n_chunks, emit, rel)

  n_tiles = (jnp.clip(row_ref[0], 0, t_len) * group + ROW_TILE - 1) // ROW_TILE
  rel = lax.fori_loop(0, n_tiles, row_tile, jnp.zeros((tiles, chunk), jnp.float32))
  if rel_ref:
    rel_ref[0][...] = rel.reshape(tiles * chunk)

  # Top `row_keep` by bisection: relevances are finite and >= 0, so their float32 bits order as
  # int32 do; invalid blocks get key -1, below every valid one.
  keys = jnp.where(valid, lax.bitcast_convert_type(rel, jnp.int32), -1)
  row_keep = row_ref[1]

  def count(pred: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sum(pred.astype(jnp.int32), axis=1))

  def bisect(_, bounds):  # invariant: count(key >= hi) < row_keep <= count(key >= lo) if any
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = count(keys >= mid) >= row_keep
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  inf_bits = 0x7F800000  # no finite relevance reaches it
  tau, _ = lax.fori_loop(0, BISECT_STEPS, bisect, (jnp.int32(0), jnp.int32(inf_bits)))
  # The row_keep-th largest key is tau (or, with fewer valid blocks, every valid one is kept:
  # tau = 0). Blocks above it are kept; of those equal to it, the lowest ids.
  need = row_keep - count(keys > tau)
  tie = keys == tau
  chosen = (keys > tau) | (tie & (_running_count(tie) <= need))
  slot = _running_count(chosen) - 1  # ascending ids
  chosen &= slot < row_keep  # only non-finite scores could choose more: never write past it
  plgpu.store(idx_ref.at[jnp.where(chosen, slot, keep)], ids, mask=chosen)
  total = count(chosen)
  # Entries past the count repeat the last kept id (0 when none), as the sparse kernels expect.
  last = jnp.maximum(jnp.max(jnp.max(jnp.where(chosen, ids, -1), axis=1)), 0)
  pad_lane = jnp.arange(min(MAX_CHUNK, pl.next_power_of_2(keep)), dtype=jnp.int32)
  for s0 in range(0, keep, pad_lane.shape[0]):
    slot = s0 + pad_lane
    pad = (slot >= total) & (slot < keep)
    plgpu.store(idx_ref.at[jnp.where(pad, slot, keep)], jnp.broadcast_to(last, pad_lane.shape),
                mask=pad)
  cnt_ref[...] = jnp.broadcast_to(total, (1,))


def _running_count(x: jax.Array) -> jax.Array:
  """Inclusive running count of True over a [tiles, chunk] grid read row by row."""
  x = x.astype(jnp.int32)
  per_tile = jnp.sum(x, axis=1)
  return jnp.cumsum(x, axis=1) + (jnp.cumsum(per_tile) - per_tile)[:, None]


def select_top_blocks_pallas(q, query_weight, row_limits, representatives, block_valid, *,
                             keep: int, bound: bool, scale: float, chunk: int | None = None,
                             num_warps: int = 4, return_relevance: bool = False,
                             interpret: bool = False):
  """Grid (batch * kv head,): see the module docstring. `row_limits` [B, 2] int32: each row's
  live query slots and the most blocks it keeps (<= keep). Ids come out ascending."""
  b, t, hq, d = q.shape
  hkv, n_blocks, width = representatives.shape[1:]
  why = supported(q.shape, n_blocks)
  if why:
    raise ValueError(f"pallas_gpu block selection cannot run this: {why}")
  chunk = chunk or min(MAX_CHUNK, max(16, pl.next_power_of_2(n_blocks)))
  if chunk < 16 or chunk & (chunk - 1):
    raise ValueError(f"chunk = {chunk} must be a power of two >= 16 (a Triton tile side)")
  padded = pl.next_power_of_2(-(-n_blocks // chunk)) * chunk
  kernel = functools.partial(_select_kernel, n_blocks=n_blocks, keep=keep, chunk=chunk,
                             group=hq // hkv, bound=bound, scale=scale)
  head = lambda bh: (bh // hkv, bh % hkv, 0)
  # One entry past `keep`: where the stores' masked-off lanes point (never written on a GPU;
  # interpret mode writes back what it read there, which must not land on a kept id).
  out_specs = [pl.BlockSpec((None, None, keep + 1), head), pl.BlockSpec((None, None, 1), head)]
  out_shape = [jax.ShapeDtypeStruct((b, hkv, keep + 1), jnp.int32),
               jax.ShapeDtypeStruct((b, hkv, 1), jnp.int32)]
  if return_relevance:
    out_specs.append(pl.BlockSpec((None, None, padded), head))
    out_shape.append(jax.ShapeDtypeStruct((b, hkv, padded), jnp.float32))
  out = pl.pallas_call(
      kernel,
      grid=(b * hkv,),
      in_specs=[
          pl.BlockSpec((None, 2), lambda bh: (bh // hkv, 0)),
          pl.BlockSpec((None, t, hq, d), lambda bh: (bh // hkv, 0, 0, 0)),
          pl.BlockSpec((None, t), lambda bh: (bh // hkv, 0)),
          pl.BlockSpec((None, None, n_blocks, width), lambda bh: (bh // hkv, bh % hkv, 0, 0)),
          pl.BlockSpec((None, n_blocks), lambda bh: (bh // hkv, 0)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="block_select",
  )(row_limits.astype(jnp.int32), q, query_weight.astype(jnp.float32),
    representatives, block_valid.astype(jnp.int32))
  ids, counts = out[0][..., :keep], out[1][..., 0]
  return (ids, counts, out[2][..., :n_blocks]) if return_relevance else (ids, counts)


def select_top_blocks(q: jax.Array, query_weight: jax.Array, representatives: jax.Array,
                      block_valid: jax.Array, *, keep: int, bound: bool,
                      live_queries: jax.Array | None = None, scale: float | None = None,
                      implementation: str = "xla", interpret: bool = False,
                      return_relevance: bool = False, chunk: int | None = None,
                      row_keep: jax.Array | None = None):
  """The `keep` most relevant valid blocks per (batch, kv head), or fewer where `row_keep` [B]
  (int32, None: `keep` for every row) caps a row (Focus: alpha of the row's own valid blocks).

  q [B, T, Hq, D] (query slots; a kv head's rows are its G query heads of every slot),
  query_weight [B, T] (each slot's weight >= 0, shared by the G heads of a group: w / G a row),
  representatives [B, Hkv, NB, D or 2D (bound)], block_valid [B, NB]; `live_queries` [B]: slots
  at and past it have zero weight (the Pallas kernel skips them; None: all slots).

  Returns (ids [B, Hkv, keep] int32, counts [B, Hkv] int32 = min(keep, row_keep, valid
  blocks)): the first `counts` ids are the kept blocks, distinct and valid, ties to the lower id
  (their order is the implementation's: by relevance for "xla", ascending for "pallas_gpu";
  entries past the count are unspecified ids); with `return_relevance`, also relevance
  [B, Hkv, NB] float32.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  chex.assert_rank([q, representatives], 4)
  b, t, hq, d = q.shape
  hkv, n_blocks = representatives.shape[1], representatives.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads {hq} not a multiple of the representatives' kv heads {hkv}")
  chex.assert_shape(query_weight, (b, t))
  chex.assert_shape(representatives, (b, hkv, n_blocks, 2 * d if bound else d))
  chex.assert_shape(block_valid, (b, n_blocks))
  if not 1 <= keep <= n_blocks:
    raise ValueError(f"keep = {keep} must be in [1, {n_blocks}] (the number of blocks)")
  scale = d ** -0.5 if scale is None else float(scale)
  if implementation == "xla":
    return select_top_blocks_xla(q, query_weight, representatives, block_valid, keep=keep,
                                 bound=bound, scale=scale, return_relevance=return_relevance,
                                 row_keep=row_keep)
  if live_queries is None:
    live_queries = jnp.full((b,), t, jnp.int32)
  chex.assert_shape(live_queries, (b,))
  row_limits = jnp.stack([live_queries.astype(jnp.int32), _row_cap(row_keep, keep, b)], axis=1)
  mesh = partition.active_mesh()
  if mesh is not None:  # each device selects for its own rows and kv heads
    spec = partition.specs(mesh, batch=b, kv_heads=hkv)
    per_head = spec("rows", "heads", None)
    outs = (per_head, spec("rows", "heads")) + ((per_head,) if return_relevance else ())
    return partition.per_device(
        functools.partial(select_top_blocks_pallas, keep=keep, bound=bound, scale=scale,
                          chunk=chunk, return_relevance=return_relevance, interpret=interpret),
        mesh, (spec("rows", None, "heads", None), spec("rows", None), spec("rows", None),
               spec("rows", "heads", None, None), spec("rows", None)), outs)(
                   q, query_weight, row_limits, representatives, block_valid)
  return select_top_blocks_pallas(q, query_weight, row_limits, representatives, block_valid,
                                  keep=keep, bound=bound, scale=scale, chunk=chunk,
                                  return_relevance=return_relevance, interpret=interpret)
