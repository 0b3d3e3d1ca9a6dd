"""Shared pieces of the block-sparse attention kernels: selection metadata, references, merges.

The selection is normalised once, outside the kernel bodies (as splash attention keeps its block
metadata apart): the kernels then walk a sorted, duplicate-free list of in-range blocks that each
intersect the prompt range, plus the blocks covering the response range.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import lax

# Running max of an empty softmax row: finite, so merges never compute inf - inf.
NEG_INIT = -1e30


class Selection(NamedTuple):
  """Normalised selection: what the fast kernels rely on.

  indices: [B, G, N] int32, the distinct selected block ids, each in range and intersecting
    [prompt_start, response_start) (`normalize_selection` sorts them; no kernel relies on the
    order); entries at and beyond `counts` repeat the last valid id (0 when there is none), so a
    pipelined kernel re-uses the block it already holds.
  counts: [B, G] int32, number of valid leading entries.
  prompt_start, response_start, response_end: [B] int32, clipped so that
    0 <= prompt_start <= response_start <= response_end <= S.
  """
  indices: jax.Array
  counts: jax.Array
  prompt_start: jax.Array
  response_start: jax.Array
  response_end: jax.Array


def num_blocks(seq_len: int, block_size: int) -> int:
  return -(-seq_len // block_size)


def clip_ranges(prompt_start, response_start, response_end, seq_len: int):
  """Clips the runtime ranges into 0 <= ps <= rs <= re <= S (a kernel cannot raise on values)."""
  rs = jnp.clip(response_start.astype(jnp.int32), 0, seq_len)
  re = jnp.clip(response_end.astype(jnp.int32), rs, seq_len)
  ps = jnp.clip(prompt_start.astype(jnp.int32), 0, rs)
  return ps, rs, re


def normalize_selection(block_indices: jax.Array, block_counts: jax.Array,
                        prompt_start: jax.Array, response_start: jax.Array,
                        response_end: jax.Array, *, block_size: int, seq_len: int) -> Selection:
  """Dedups and sorts the ids, drops out-of-range and out-of-prompt ones, counts what is left."""
  chex.assert_rank(block_indices, 3)
  bsz, g, n = block_indices.shape
  chex.assert_shape(block_counts, (bsz, g))
  chex.assert_shape([prompt_start, response_start, response_end], (bsz,))
  nb = num_blocks(seq_len, block_size)
  ps, rs, re = clip_ranges(prompt_start, response_start, response_end, seq_len)
  idx = block_indices.astype(jnp.int32)
  pos = jnp.arange(n, dtype=jnp.int32)
  first = (ps // block_size)[:, None, None]
  stop = jnp.where(rs > ps, -(-rs // block_size), 0)[:, None, None]  # exclusive
  valid = ((pos < block_counts.astype(jnp.int32)[..., None]) & (idx >= 0) & (idx < nb)
           & (idx >= first) & (idx < stop))
  # A block bitmap instead of sorting: O(N + nb) scatters, and the compaction comes out sorted.
  bi = jnp.arange(bsz)[:, None, None]
  gi = jnp.arange(g)[None, :, None]
  hit = jnp.zeros((bsz, g, nb + 1), bool).at[bi, gi, jnp.where(valid, idx, nb)].set(True)
  hit = hit[..., :nb]
  counts = jnp.sum(hit, axis=-1, dtype=jnp.int32)
  rank = jnp.cumsum(hit, axis=-1, dtype=jnp.int32) - 1
  slot = jnp.where(hit, rank, n)  # slot n is out of range: dropped
  ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (bsz, g, nb))
  key = jnp.zeros((bsz, g, n), jnp.int32).at[bi, gi, slot].set(ids, mode="drop")
  return Selection(_pad_with_last(key, counts), counts, ps, rs, re)


def _pad_with_last(ids: jax.Array, counts: jax.Array) -> jax.Array:
  """ids [B, G, N] with the entries at and past `counts` replaced by the last valid id (0 when
  there is none): a pipelined kernel then re-uses the block it already holds."""
  last = jnp.take_along_axis(ids, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  pos = jnp.arange(ids.shape[-1], dtype=jnp.int32)
  return jnp.where(pos < counts[..., None], ids, last)


def selection_of_distinct(block_indices: jax.Array, block_counts: jax.Array,
                          prompt_start: jax.Array, response_start: jax.Array,
                          response_end: jax.Array, *, block_size: int,
                          seq_len: int) -> Selection:
  """The Selection of ids the caller guarantees distinct and inside the prompt range in their
  first `block_counts` entries (a top-k over the valid prompt blocks is): `normalize_selection`
  without its dedup and compaction (a scatter, a cumsum and a second scatter per call). The
  order is kept; entries past the count are replaced by the last valid id. Counts are clipped
  into [0, N] and ids into the cache's blocks, so a broken promise cannot make a kernel read
  outside the cache or walk past its list (a count above N would repeat the last block, a
  negative one would skip response blocks)."""
  chex.assert_rank(block_indices, 3)
  ps, rs, re = clip_ranges(prompt_start, response_start, response_end, seq_len)
  counts = jnp.clip(block_counts.astype(jnp.int32), 0, block_indices.shape[-1])
  ids = jnp.clip(block_indices.astype(jnp.int32), 0, num_blocks(seq_len, block_size) - 1)
  return Selection(_pad_with_last(ids, counts), counts, ps, rs, re)


def response_blocks(rs: jax.Array, re: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """First block id and number of blocks covering keys [rs, re)."""
  first = rs // block_size
  n = jnp.where(re > rs, (re - 1) // block_size - first + 1, 0)
  return first, n.astype(jnp.int32)


def check_inputs(q, k, v, block_indices, block_counts, prompt_start, response_start, response_end,
                 extra_k, extra_v, extra_valid, block_size, extra_positions=None,
                 query_counts=None, dedup_extra=False):
  """Shape checks at the public boundary; raises early with a readable message."""
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  bsz, _, hq, d = q.shape
  _, _, hkv, dk = k.shape
  if k.shape[0] != bsz or dk != d:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
  if hq % hkv:
    raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
  chex.assert_rank(block_indices, 3)
  g = block_indices.shape[1]
  if block_indices.shape[0] != bsz or g not in (1, hkv):
    raise ValueError(f"block_indices must be [B, 1 or Hkv={hkv}, N], got {block_indices.shape}")
  chex.assert_shape(block_counts, (bsz, g))
  chex.assert_shape([prompt_start, response_start, response_end], (bsz,))
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise TypeError(f"block_indices must be integer, got {block_indices.dtype}")
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if query_counts is not None and (query_counts.shape != (bsz,)
                                   or not jnp.issubdtype(query_counts.dtype, jnp.integer)):
    raise ValueError(f"query_counts must be integer [B={bsz}], got "
                     f"{query_counts.dtype}{list(query_counts.shape)}")
  check_dedup_extra(dedup_extra, extra_positions)
  if extra_positions is not None:
    if extra_k is not None or extra_v is not None:
      raise ValueError("give the extra keys as extra_k/extra_v or as extra_positions, not both")
    if extra_valid is None:
      raise ValueError("extra_positions needs extra_valid")
    chex.assert_rank(extra_positions, 2)
    if extra_positions.shape[0] != bsz or not jnp.issubdtype(extra_positions.dtype, jnp.integer):
      raise ValueError(f"extra_positions must be integer [B={bsz}, E], got "
                       f"{extra_positions.dtype}{list(extra_positions.shape)}")
    e = extra_positions.shape[1]
    if extra_valid.shape not in ((bsz, e), (bsz, e, hkv)):
      raise ValueError(f"extra_valid must be [B, E] or per kv head [B, E, Hkv] = "
                       f"{(bsz, e, hkv)}, got {extra_valid.shape}")
    return
  if (extra_k is None) != (extra_v is None) or (extra_k is None) != (extra_valid is None):
    raise ValueError("extra_k, extra_v and extra_valid come together or not at all")
  if extra_k is not None:
    chex.assert_rank([extra_k, extra_v], 4)
    chex.assert_equal_shape([extra_k, extra_v])
    if extra_k.shape[0] != bsz or extra_k.shape[2:] != (hkv, d):
      raise ValueError(f"extra_k must be [B, E, Hkv, D], got {extra_k.shape}")
    if extra_valid.shape not in (extra_k.shape[:2], extra_k.shape[:3]):
      raise ValueError(f"extra_valid must be [B, E] or per kv head [B, E, Hkv] = "
                       f"{extra_k.shape[:3]}, got {extra_valid.shape}")


def check_dedup_extra(dedup_extra: bool, extra_positions) -> None:
  if dedup_extra and extra_positions is None:
    raise ValueError("dedup_extra needs the extra keys as extra_positions (rows of the cache)")


def in_cache_extra(positions: jax.Array, valid: jax.Array | None, seq_len: int) -> jax.Array:
  """Extra keys' validity ([B, E] or [B, E, Hkv]; None: all) with positions outside the cache's
  rows [0, seq_len) made invalid: every path clips positions into the cache to read them, so an
  out-of-range sink would otherwise attend row 0 or the last row."""
  inside = (positions >= 0) & (positions < seq_len)
  if valid is None:
    return inside
  valid = valid.astype(bool)
  return valid & (inside if valid.ndim == 2 else inside[..., None])


def clip_rows(positions: jax.Array, seq_len: int) -> jax.Array:
  """Extra-key positions as every path reads them: int32, clipped into the cache's rows."""
  return jnp.clip(positions.astype(jnp.int32), 0, seq_len - 1)


def gather_rows(k: jax.Array, v: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows `positions` [B, E] (clipped into the cache) of k/v [B, S, Hkv, D] -> [B, E, Hkv, D]."""
  rows = clip_rows(positions, k.shape[1])[:, :, None, None]
  return jnp.take_along_axis(k, rows, axis=1), jnp.take_along_axis(v, rows, axis=1)


def extra_attended(sel: Selection, positions: jax.Array, block_size: int,
                   seq_len: int) -> jax.Array:
  """[B, G, E] bool: whether the selection already attends the cache row at each extra position
  (inside a selected block and the prompt range, or inside the response range)."""
  pos = clip_rows(positions, seq_len)  # as gather_rows reads them
  live = jnp.arange(sel.indices.shape[2]) < sel.counts[..., None]  # [B, G, N]
  in_sel = jnp.any((sel.indices[:, :, None, :] == (pos // block_size)[:, None, :, None])
                   & live[:, :, None, :], axis=-1)  # [B, G, E]
  in_prompt = (pos >= sel.prompt_start[:, None]) & (pos < sel.response_start[:, None])
  in_resp = (pos >= sel.response_start[:, None]) & (pos < sel.response_end[:, None])
  return (in_sel & in_prompt[:, None]) | in_resp[:, None]


def drop_attended_extra(extra_valid: jax.Array, attended: jax.Array, hkv: int) -> jax.Array:
  """extra_valid [B, E] or [B, E, Hkv], attended [B, G, E] -> validity [B, E, Hkv]."""
  keep = ~jnp.swapaxes(attended, 1, 2)  # [B, E, G]
  valid = extra_valid[:, :, None] if extra_valid.ndim == 2 else extra_valid
  return jnp.broadcast_to(valid & keep, keep.shape[:2] + (hkv,))


def extra_valid_per_head(extra_valid: jax.Array, hkv: int) -> jax.Array:
  """[B, E] or [B, E, Hkv] -> [B, Hkv, E]: a sink may be valid for some heads only (a head that
  already attends to it inside a kept block must not count it twice)."""
  if extra_valid.ndim == 2:
    return jnp.broadcast_to(extra_valid[:, None, :], (extra_valid.shape[0], hkv,
                                                      extra_valid.shape[1]))
  return jnp.swapaxes(extra_valid, 1, 2)


def default_scale(scale: float | None, d: int) -> float:
  return 1.0 / math.sqrt(d) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# Partial softmax results, layout [B, Hkv, R, ...] with R = T*G rows ordered (t, g).

class Partial(NamedTuple):
  """An unnormalised softmax partial: out = acc / l, with running max m."""
  acc: jax.Array  # [B, Hkv, R, D] float32
  m: jax.Array    # [B, Hkv, R] float32 (NEG_INIT where no key was seen)
  l: jax.Array    # [B, Hkv, R] float32 (0 where no key was seen)

  def first_rows(self, rows: int) -> "Partial":
    """The first `rows` rows (a kernel's partials carry padded row tiles)."""
    return Partial(self.acc[:, :, :rows], self.m[:, :, :rows], self.l[:, :, :rows])


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> Partial:
  """A split-KV kernel's partials [B, Hkv, splits, R, ...] merged by log-sum-exp over the split
  axis: a reduction over a major axis, which XLA fuses into one pass without transposing."""
  mx = jnp.max(m, axis=2)
  w = jnp.exp(m - mx[:, :, None])
  return Partial(jnp.sum(w[..., None] * acc, axis=2), mx, jnp.sum(w * l, axis=2))


def group_queries(q: jax.Array, hkv: int) -> jax.Array:
  """q [B, T, Hq, D] -> [B, Hkv, T*G, D], rows (t, g): the G query heads of one kv head together,
  query-major, so that the rows of the first n queries are the first n*G rows (a kernel can skip
  the row tiles of padded query slots)."""
  b, t, hq, d = q.shape
  g = hq // hkv
  return q.reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)


def ungroup_rows(o: jax.Array, t: int, query_counts: jax.Array | None = None,
                 fill: float = 0.0) -> jax.Array:
  """[B, Hkv, T*G, D] -> [B, T, Hq, D]; with `query_counts` [B], queries t >= count are `fill`
  (zeros for outputs, -inf for a row statistic such as the lse, given with D = 1)."""
  b, hkv, r, d = o.shape
  g = r // t
  out = o.reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hkv * g, d)
  if query_counts is None:
    return out
  live = jnp.arange(t)[None, :] < query_counts[:, None]
  return jnp.where(live[:, :, None, None], out, fill)


def merge_partials(parts: list[Partial], with_lse: bool = False):
  """Log-sum-exp merge of partials; rows that saw no key at all become zeros. With `with_lse`,
  also each row's log-sum-exp of its scaled logits ([B, Hkv, R] float32, -inf where no key)."""
  m = parts[0].m
  for p in parts[1:]:
    m = jnp.maximum(m, p.m)
  l = jnp.zeros_like(m)
  acc = jnp.zeros_like(parts[0].acc)
  for p in parts:
    w = jnp.exp(p.m - m)
    l = l + w * p.l
    acc = acc + w[..., None] * p.acc
  out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
  if not with_lse:
    return out
  return out, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def ungroup_lse(lse: jax.Array, t: int, query_counts: jax.Array | None = None) -> jax.Array:
  """Row log-sum-exps [B, Hkv, T*G] -> [B, T, Hq]; queries t >= count get -inf (saw no key)."""
  return ungroup_rows(lse[..., None], t, query_counts, fill=-jnp.inf)[..., 0]


def finish(parts: list[Partial], t: int, query_counts, dtype, return_lse: bool):
  """Merged partials as the public output [B, T, Hq, D] in `dtype` (and the lse [B, T, Hq])."""
  if not return_lse:
    return ungroup_rows(merge_partials(parts), t, query_counts).astype(dtype)
  out, lse = merge_partials(parts, with_lse=True)
  return ungroup_rows(out, t, query_counts).astype(dtype), ungroup_lse(lse, t, query_counts)


def dense_partial(qg: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
                  scale: float) -> Partial:
  """Partial over a small dense key segment: qg [B, Hkv, R, D], k/v [B, E, Hkv, D],
  valid [B, E] or [B, E, Hkv]."""
  s = jnp.einsum("bhrd,behd->bhre", qg, k, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(extra_valid_per_head(valid, k.shape[2])[:, :, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, initial=NEG_INIT)  # (initial: an empty segment is no error)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("bhre,behd->bhrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
  return Partial(acc, m, l)


# ----------------------------------------------------------------------------------------------
def selection_key_mask(block_indices, block_counts, prompt_start, response_start, response_end, *,
                       block_size: int, seq_len: int) -> jax.Array:
  """[B, G, S] bool: the keys the contract says a query attends to (extra keys aside)."""
  bsz, g, n = block_indices.shape
  nb = num_blocks(seq_len, block_size)
  ps, rs, re = clip_ranges(prompt_start, response_start, response_end, seq_len)
  idx = block_indices.astype(jnp.int32)
  ok = (jnp.arange(n) < block_counts[..., None]) & (idx >= 0) & (idx < nb)
  onehot = (idx[..., None] == jnp.arange(nb)) & ok[..., None]  # [B, G, N, nb]
  chosen = jnp.any(onehot, axis=2)  # [B, G, nb]: a set, so duplicates count once
  pos = jnp.arange(seq_len)
  in_block = jnp.take(chosen, pos // block_size, axis=-1)  # [B, G, S]
  prompt = (pos >= ps[:, None]) & (pos < rs[:, None])
  resp = (pos >= rs[:, None]) & (pos < re[:, None])
  return (in_block & prompt[:, None]) | resp[:, None]


def reference_block_sparse_attention(q, k, v, block_indices, block_counts, prompt_start,
                                     response_start, response_end, extra_k=None, extra_v=None,
                                     extra_valid=None, *, block_size: int,
                                     scale: float | None = None,
                                     extra_positions=None, query_counts=None,
                                     dedup_extra=False, return_lse: bool = False):
  """The semantics, by a dense mask over the whole cache, in float32 (for tests; O(S) memory).
  With `return_lse`, (out, lse [B, T, Hq]) as `block_sparse_attention` returns them."""
  check_inputs(q, k, v, block_indices, block_counts, prompt_start, response_start, response_end,
               extra_k, extra_v, extra_valid, block_size, extra_positions, query_counts,
               dedup_extra)
  bsz, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  scale = default_scale(scale, d)
  mask = selection_key_mask(block_indices, block_counts, prompt_start, response_start,
                            response_end, block_size=block_size, seq_len=s_len)
  if extra_positions is not None:
    extra_valid = in_cache_extra(extra_positions, extra_valid, s_len)
    extra_k, extra_v = gather_rows(k, v, extra_positions)
    if dedup_extra:  # rows the mask already holds: read off the mask itself
      rows = jnp.clip(extra_positions.astype(jnp.int32), 0, s_len - 1)[:, None, :]
      attended = jnp.take_along_axis(mask, jnp.broadcast_to(rows, mask.shape[:2] + rows.shape[2:]),
                                     axis=-1)
      extra_valid = drop_attended_extra(extra_valid, attended, hkv)
  mask = jnp.broadcast_to(mask, (bsz, hkv, s_len))
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  if extra_k is not None:
    kf = jnp.concatenate([kf, extra_k.astype(jnp.float32)], axis=1)
    vf = jnp.concatenate([vf, extra_v.astype(jnp.float32)], axis=1)
    ev = extra_valid_per_head(extra_valid, hkv)
    mask = jnp.concatenate([mask, ev], axis=-1)
  qg = group_queries(q.astype(jnp.float32), hkv)  # [B, Hkv, R, D]
  s = jnp.einsum("bhrd,bshd->bhrs", qg, kf, precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhrs,bshd->bhrd", p, vf, precision=jax.lax.Precision.HIGHEST)
  o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
  out = ungroup_rows(o, t, query_counts).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(l > 0, l, 1.0)),
                  -jnp.inf)[..., 0]
  return out, ungroup_lse(lse, t, query_counts)


def live_rows(row_counts: jax.Array | None, bsz: int, rows: int) -> jax.Array:
  """Rows of each batch row that a kernel's output keeps, [B] int32: all (`row_counts` None) or
  the counts clipped into [0, rows]; the merges zero the rows past them."""
  if row_counts is None:
    return jnp.full((bsz,), rows, jnp.int32)
  return jnp.clip(row_counts.astype(jnp.int32), 0, rows)


def pad_query_rows(qg: jax.Array, block_m: int) -> jax.Array:
  """Pads the row axis of qg [B, Hkv, R, D] to a multiple of the kernels' row tile."""
  rows = qg.shape[2]
  rows_pad = max(block_m, -(-rows // block_m) * block_m)
  if rows_pad == rows:
    return qg
  return jnp.pad(qg, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))


def kernel_meta(counts: jax.Array, sel: Selection, live: jax.Array) -> jax.Array:
  """[B, G, 8] int32, what the GPU kernels read at run time per (batch, selection group):
  0 the selected-block count (`counts` [B, G]), 1-3 prompt_start, response_start, response_end,
  4 the live query rows (`live` [B]), 5-7 zero (8 columns: 32-byte rows)."""
  bsz, g = counts.shape
  per_b = lambda x: jnp.broadcast_to(x.astype(jnp.int32)[:, None], (bsz, g))
  zero = jnp.zeros((bsz, g), jnp.int32)
  return jnp.stack([counts.astype(jnp.int32), per_b(sel.prompt_start), per_b(sel.response_start),
                    per_b(sel.response_end), per_b(live), zero, zero, zero], axis=-1)


def live_tiles(live_rows, block_m: int, m_tiles: int):
  """Row tiles holding live rows: the first ceil(live_rows / block_m), at least one."""
  return jnp.clip(lax.div(live_rows + (block_m - 1), jnp.int32(block_m)), 1, m_tiles)


def tile_plan(live_rows, block_m: int, m_tiles: int, tile_slot, split, num_splits: int):
  """Program (row-tile slot, split) -> (the row tile it works for, its split among that tile's
  splits, how many splits the tile has). Live tiles are the first ceil(live_rows / block_m);
  slot j works for tile j mod n_live, so each live tile gets every slot congruent to it, and the
  slots of padded query rows become extra KV splits of the live ones. Integer division of
  non-negative scalars (lax.div / lax.rem), which Triton and Mosaic GPU both lower."""
  n_live = live_tiles(live_rows, block_m, m_tiles)
  tile = lax.rem(tile_slot, n_live)
  return (tile, lax.div(tile_slot, n_live) * num_splits + split,
          slots_of_tile(tile, n_live, m_tiles) * num_splits)


def slots_of_tile(tile, n_live, m_tiles: int):
  """How many of the m_tiles row-tile slots work for live tile `tile` (< n_live): those
  congruent to it mod n_live (`tile_plan`); the merges walk them."""
  return lax.div(m_tiles - 1 - tile, n_live) + 1


def extra_tiles(k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array,
                tile_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Extra keys given as cache rows (Focus's sinks) -> arrays a TMA kernel reads in whole tiles:
  xk, xv [B, E_pad, Hkv, D], the rows at `positions` [B, E] in their order (E_pad: E rounded up
  to a multiple of `tile_rows`; padding rows read row 0), and bias [B, Hkv, E_pad] float32: 0
  where a row is valid for that kv head, -inf elsewhere (padding included), which the kernel
  adds to the scores of its extra columns. `valid` [B, E] or [B, E, Hkv]. One gather per array
  and one small fusion: no sort to put the valid rows first."""
  e = positions.shape[1]
  hkv = k.shape[2]
  e_pad = -(-e // tile_rows) * tile_rows
  xk, xv = gather_rows(k, v, jnp.pad(positions, ((0, 0), (0, e_pad - e))))
  ok = extra_valid_per_head(valid, hkv)  # [B, Hkv, E]
  bias = jnp.where(ok, 0.0, -jnp.inf).astype(jnp.float32)
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, e_pad - e)), constant_values=-jnp.inf)
  return xk, xv, bias
