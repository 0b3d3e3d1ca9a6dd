"""Dense attention whose first `prefix` query rows see only selected blocks of the prefix's keys.

    rows j <  prefix, in chunks of C rows: `keep` of the prefix's blocks of `block` keys
               + the prefix's last partial block + every key from `prefix` on (the tail)
    rows j >= prefix: every key

Each (sequence, chunk, kv head) keeps `keep` of its sequence's blocks: the same static number
unpadded; a left-padded sequence keeps what it would alone (`kept_per_row`: `keep` of its own
usable blocks, or all of them where it would stay dense), the static number being the capacity.
Always kept: the blocks holding the row's first `n_global` valid keys (attention sinks: with
left pads, where its prompt begins) and the blocks holding the chunk's own rows, with one block
either side, unless they hold only pads. The other kept blocks are the chunk's best by Quest's bound on q . k over a
block (`block_relevance.bound_logits` over the box of `block_representatives`, as Focus's
sparse layers score their blocks): each row softmaxes its bounds over the blocks (as logits),
and a block scores the largest share any row of the chunk and any query head of the kv head
gives it. A block that stands out for a single
row (a question token's needle) ranks above blocks that many rows rate only as well as the
rest; rows that are pads (invalid queries, or invalid keys when no query mask is given) do not
vote. The chunks go through one batched dense attention call with kv heads folded into the
batch, so keys may differ per head. Unpadded, each (sequence, kv head, chunk) reads its kept
blocks and the tail as pages of one pool, the K/V laid out head-major once
(`dense_attention.paged_attention`: cuDNN's paged flash attention reads them in place on a GPU;
other backends gather them). With pad keys they are gathered key by key into one key
sequence per (sequence, kv head, chunk), its valid keys first, and attention takes each row's
valid count (cuDNN's padding mask; a per-head key mask would be a 16-bit bias of about 0.5 GB a
chunk for LLaDA-8B at 32K). Chunks go in balanced groups (`lax.map`) so the bounds, and the
gathered keys where there are any, stay under `max_group_bytes` (a 128K prompt would otherwise
gather tens of GB).

Why: a diffusion LLM's cache refresh is compute-bound attention over the whole canvas, ~99% of
it the prompt's rows (focus_jax.decoding.cache.RefreshPolicy.prompt_keep). A local window
(`local_attention`) cuts that work but loses lookups whose key lies far from the query; choosing
blocks per query chunk keeps them. A gather would cost one write and one read of the kept K/V
per chunk (at C = 1024, a 32K prompt and keep 0.25, ~4 GB a layer); the pages cost one
head-major copy of K and V. Kernels know nothing of models: the prefix is any leading run of
query rows.

Measured (H100, jax 0.11.2, 2026-12-07, `benchmarks/kernels.py --phases selected_prompt`): one
32K layer, chunk 1024, keep 0.25: LLaDA-8B 10.48 ms against cuDNN's dense 28.17 (2.69x; 26% of
the score FLOPs, so 1.42x the ideal share; 12.38 ms with the gather it replaced), Dream-7B
8.89 against 24.51 ms (2.76x; 8.75 with the gather).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from focus_jax.kernels import block_relevance, dense_attention, local_attention

# Score of an unusable block or row (finite: differences stay finite) and of a forced block.
_EXCLUDED = -1e30
_FORCED = 1e30
# A row's sink block: forced too, but below its chunk's own blocks, which win where pads spread
# a row's sinks over more blocks than the static count (`forced_blocks`) budgets for.
_SINK = 1e29
# Chunks per group are bounded by this many bytes of gathered K/V, bounds and masks. (Groups
# were once padded to whole groups of chunks, 64 chunks as 2 x 49: 1.5x the work, measured as
# 23.1 against 14.8 ms on an H200, `kernels_h200_selected_groups.json`; now balanced.)
DEFAULT_GROUP_BYTES = 8 << 30
_SAVES_NOTHING = "selection would not pay here, so the call stays dense"


def check_selected(prefix: int, seq_len: int, chunk: int, block: int, keep: float,
                   n_global: int) -> str | None:
  """None when block selection applies, else why not: invalid arguments (the call raises), or
  lengths where selection would save nothing or keep no chosen block (prefixed by
  _SAVES_NOTHING; the call stays dense)."""
  if chunk < 1 or block < 1:
    return f"chunk {chunk} and block {block} must be >= 1"
  if not 0.0 < keep <= 1.0:
    return f"keep {keep} must lie in (0, 1]"
  if n_global < 0:
    return f"n_global {n_global} must be >= 0"
  if not 0 < prefix <= seq_len:
    return f"prefix {prefix} must lie in (0, {seq_len}]"
  n_blocks = prefix // block
  n_keep = kept_blocks(prefix, chunk, block, keep, n_global)
  if n_keep >= n_blocks:
    return (f"{_SAVES_NOTHING}: a chunk would keep all {n_blocks} blocks of {block} prompt keys "
            f"(keep {keep}, chunk {chunk}, n_global {n_global})")
  if n_keep <= most_forced(prefix, chunk, block, n_global):
    # (Measured on the demo model: a budget that only holds the forced blocks loses its lookups
    # as the local window does, 58% against 96% at 1K.)
    return (f"{_SAVES_NOTHING}: the {n_keep} blocks a chunk keeps (keep {keep} of {n_blocks}) "
            "are all forced (sinks, its own and neighbouring blocks), and a local window "
            "without chosen blocks loses far lookups")
  return None


def forced_blocks(prefix: int, chunk: int, block: int, n_global: int) -> np.ndarray:
  """[n_chunks, n_blocks] bool (static): the blocks every chunk keeps, its sinks (unpadded: the
  leading blocks) and its own rows' blocks with one neighbour either side."""
  forced = own_blocks(prefix, chunk, block)
  forced[:, :-(-n_global // block)] = True
  return forced


def own_blocks(prefix: int, chunk: int, block: int) -> np.ndarray:
  """[n_chunks, n_blocks] bool (static): each chunk's own rows' blocks, one neighbour either
  side."""
  n_blocks, n_chunks = prefix // block, -(-prefix // chunk)
  own = np.zeros((n_chunks, n_blocks), bool)
  for c in range(n_chunks):
    lo = c * chunk // block - 1
    hi = -(-min((c + 1) * chunk, prefix) // block) + 1
    own[c, max(lo, 0):max(min(hi, n_blocks), 0)] = True
  return own


def most_forced(prefix: int, chunk: int, block: int, n_global: int) -> int:
  """The most blocks any chunk is forced to keep (`forced_blocks`)."""
  return int(forced_blocks(prefix, chunk, block, n_global).sum(axis=1).max())


def kept_blocks(prefix: int, chunk: int, block: int, keep: float, n_global: int) -> int:
  """Blocks each chunk keeps: `keep` of the prefix's blocks, at least the forced ones."""
  n_blocks = prefix // block
  if n_blocks == 0:
    return 0
  return min(n_blocks, max(math.ceil(keep * n_blocks), most_forced(prefix, chunk, block,
                                                                    n_global)))


def kept_per_row(blocks_ok: jax.Array, prefix: int, chunk: int, block: int, keep: float,
                 n_global: int) -> jax.Array:
  """[B] int32: the blocks a chunk of each row keeps (at most the static `kept_blocks`), so that a
  left-padded row keeps what it would alone, not keep of the batch's longest prompt: `keep` of
  its own usable blocks where that leaves blocks to choose beyond the forced ones; else every
  usable block, as a prompt that short stays dense (`check_selected`) rather than keep only its
  local window. Unpadded rows get exactly the static count."""
  n_keep = kept_blocks(prefix, chunk, block, keep, n_global)
  forced = most_forced(prefix, chunk, block, n_global)
  share = lambda n: math.ceil(keep * n)
  return block_relevance.budget_per_row(
      blocks_ok, lambda n: min(n_keep, share(n) if share(n) > forced else n))


def sink_blocks(key_valid: jax.Array | None, batch: int, n_blocks: int, block: int,
                n_global: int) -> jax.Array:
  """[B, n_blocks] bool: the blocks holding each row's first `n_global` valid keys, its
  attention sinks. Unpadded these are the leading blocks (as `forced_blocks` has them); with
  left pads they move to where the row's prompt begins, past blocks that hold only pads. At
  most the ceil(n_global / block) blocks the static budget counts (`kept_blocks`): where pads
  spread the sinks over more, the first ones (the rest may still be chosen by score)."""
  n_sink_blocks = -(-n_global // block)
  if key_valid is None:
    return jnp.broadcast_to(jnp.arange(n_blocks) < n_sink_blocks, (batch, n_blocks))
  sinks = local_attention.global_keys(key_valid, n_blocks * block, n_global)
  sinks = jnp.any(sinks[:, :n_blocks * block].reshape(batch, n_blocks, block), axis=2)
  return sinks & (jnp.cumsum(sinks, axis=1) <= n_sink_blocks)


def select_blocks(q_rows: jax.Array, rows_ok: jax.Array, representatives: jax.Array,
                  blocks_ok: jax.Array, own: jax.Array, sinks: jax.Array,
                  n_keep: int, row_keep: jax.Array | None = None) -> jax.Array:
  """Kept block ids [B, n, Hkv, n_keep] of n chunks: q_rows [B, n, C, Hkv, G, D], rows_ok
  [B, n, C], representatives / blocks_ok of `block_relevance.block_representatives` ("bound"),
  each chunk's own blocks [n, n_blocks] (`own_blocks`) and each row's sinks [B, n_blocks]
  (`sink_blocks`), forced in that order of priority (module docstring). A block that holds no
  valid key (a pad block) is not forced. Where `row_keep` [B] caps a row below n_keep
  (`kept_per_row`), its ids past the cap are -1 (no block)."""
  b, n, c, hkv, g, d = q_rows.shape
  qg = jnp.moveaxis(q_rows, 3, 1).reshape(b, hkv, n * c * g, d)
  logits = block_relevance.bound_logits(qg, representatives, blocks_ok, bound=True,
                                        scale=d ** -0.5)
  # Each row's share of the bounds under a softmax (log space): a block that stands out for one
  # row scores near 0 (log 1), a row whose bounds are flat gives each block about -log(n).
  share = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  share = jnp.where(blocks_ok[:, None, None, :], share, _EXCLUDED).reshape(b, hkv, n, c, g, -1)
  share = jnp.where(rows_ok[:, None, :, :, None, None], share, _EXCLUDED)
  score = jnp.moveaxis(jnp.max(share, axis=(3, 4)), 1, 2)  # [B, n, Hkv, n_blocks]
  usable = blocks_ok[:, None, None, :]
  score = jnp.where(sinks[:, None, None, :] & usable, _SINK, score)
  score = jnp.where(own[None, :, None, :] & usable, _FORCED, score)
  ids = jax.lax.top_k(score, n_keep)[1].astype(jnp.int32)  # forced first, then by score
  if row_keep is None:
    return ids
  return jnp.where(jnp.arange(n_keep) < row_keep[:, None, None, None], ids, -1)


def key_mask(ids: np.ndarray, prefix: int, chunk: int, block: int, seq_len: int) -> np.ndarray:
  """[B, Hkv, S, S] bool: the keys each query row of each kv head sees, given the kept block ids
  [B, n_chunks, Hkv, n_keep] (-1: no block; the definition, for tests and diagnostics)."""
  ids = np.asarray(ids)
  b, n_chunks, hkv, _ = ids.shape
  tail_start = prefix // block * block
  mask = np.zeros((b, hkv, seq_len, seq_len), bool)
  mask[:, :, prefix:] = True
  mask[:, :, :prefix, tail_start:] = True
  for bi in range(b):
    for h in range(hkv):
      for c in range(n_chunks):
        rows = slice(c * chunk, min((c + 1) * chunk, prefix))
        for blk in ids[bi, c, h][ids[bi, c, h] >= 0]:
          mask[bi, h, rows, blk * block:(blk + 1) * block] = True
  return mask


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static shape of one `selected_prefix_attention` call, and the bytes it holds beyond
  dense attention's (shared with `extra_bytes`, so the memory estimate counts what runs)."""
  n_blocks: int  # whole blocks of the prefix
  n_keep: int  # blocks each (sequence, chunk, kv head) keeps
  n_tail: int  # keys from the last whole block on, which every chunk reads
  n_chunks: int
  n_keys: int  # keys a chunk attends to
  paged: bool  # unpadded: the kept blocks are pages of one pool (else gathered, valid first)
  n_pages: int  # pages of one (sequence, kv head) in the pool: the blocks, then the tail's
  n_groups: int  # chunk groups (lax.map), each under max_group_bytes
  per_group: int  # chunks a group
  layout_bytes: int  # K and V laid out head-major once, the prompt's padded queries and outputs
  group_bytes: int  # one group's bounds, shares, gathered keys and positions, and scores


def _plan(q, k, *, prefix: int, chunk: int, block: int, keep: float, n_global: int,
          padded: bool, implementation: str, max_group_bytes: int) -> _Plan:
  """q [B, S, Hq, D], k [B, S, Hkv, D] (arrays or shape structs)."""
  b, s, hq, d = q.shape
  hkv, itemsize = k.shape[2], jnp.dtype(k.dtype).itemsize
  in_place = not padded and dense_attention.reads_pages_in_place(implementation, q, k)
  scores_in_memory = dense_attention.resolve(implementation, q, k) == "xla"
  n_blocks, n_keep = prefix // block, kept_blocks(prefix, chunk, block, keep, n_global)
  n_tail = s - n_blocks * block
  n_chunks = -(-prefix // chunk)
  n_keys = n_keep * block + n_tail
  # Unpadded, the chunks read their kept blocks as pages of one pool (read in place by cuDNN);
  # with pad keys they gather them key by key, valid keys first.
  paged = not padded
  per_chunk = b * chunk * hq * n_blocks * 4 * 2  # the bounds and their shares
  if not in_place:  # gathered K and V
    per_chunk += b * hkv * n_keys * d * 2 * itemsize
  if not paged:  # each row's key positions, validity, ranks and partitioned positions
    per_chunk += b * hkv * n_keys * 13
  if scores_in_memory:  # XLA's float32 scores and probabilities
    per_chunk += b * hq * chunk * n_keys * 4 * 2
  n_groups = -(-n_chunks // max(1, min(n_chunks, max_group_bytes // per_chunk)))
  per_group = -(-n_chunks // n_groups)  # (balanced: padding stays under one chunk a group)
  n_pages = n_blocks + -(-n_tail // block)
  layout = 2 * b * hkv * (n_pages * block if paged else s) * d * itemsize
  layout += 2 * b * n_groups * per_group * chunk * hq * d * itemsize
  return _Plan(n_blocks, n_keep, n_tail, n_chunks, n_keys, paged, n_pages, n_groups, per_group,
               layout, per_group * per_chunk)


def extra_bytes(b: int, s: int, hq: int, hkv: int, d: int, dtype: jnp.dtype, *, prefix: int,
                chunk: int, block: int, keep: float, n_global: int, padded: bool,
                implementation: str = "auto",
                max_group_bytes: int = DEFAULT_GROUP_BYTES) -> int:
  """Device bytes a `selected_prefix_attention` call over q [b, s, hq, d], k/v [b, s, hkv, d]
  holds beyond dense attention's (0 where it stays dense): the head-major K/V and one group of
  chunks. `padded`: a key or query mask is given."""
  if check_selected(prefix, s, chunk, block, keep, n_global) is not None:
    return 0
  q = jax.ShapeDtypeStruct((b, s, hq, d), dtype)
  k = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
  plan = _plan(q, k, prefix=prefix, chunk=chunk, block=block, keep=keep, n_global=n_global,
               padded=padded, implementation=implementation, max_group_bytes=max_group_bytes)
  return plan.layout_bytes + plan.group_bytes


def selected_prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix: int,
                              chunk: int, block: int, keep: float, n_global: int,
                              key_valid: jax.Array | None = None,
                              query_valid: jax.Array | None = None,
                              implementation: str = "auto",
                              max_group_bytes: int = DEFAULT_GROUP_BYTES,
                              return_ids: bool = False):
  """q [B, S, Hq, D] (row j is position j), k/v [B, S, Hkv, D] -> [B, S, Hq, D] (and, with
  `return_ids`, the kept block ids [B, n_chunks, Hkv, n_keep], None when it stays dense).

  `key_valid` / `query_valid` [B, S] as for `dense_attention.attention`. When the lengths do not
  suit block selection (`check_selected`), this is plain dense attention.
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  b, s, hq, d = q.shape
  chex.assert_shape(k, (b, s, None, d))
  hkv = k.shape[2]
  g = hq // hkv
  attend = lambda qq, kk, vv, kv_ok, q_ok: dense_attention.attention(
      qq, kk, vv, key_valid=kv_ok, query_valid=q_ok, implementation=implementation)
  if hq % hkv:
    raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
  reason = check_selected(prefix, s, chunk, block, keep, n_global)
  if reason is not None and not reason.startswith(_SAVES_NOTHING):
    raise ValueError(f"selected_prefix_attention: {reason}")
  if reason is not None:
    out = attend(q, k, v, key_valid, query_valid)
    return (out, None) if return_ids else out
  plan = _plan(q, k, prefix=prefix, chunk=chunk, block=block, keep=keep, n_global=n_global,
               padded=key_valid is not None or query_valid is not None,
               implementation=implementation, max_group_bytes=max_group_bytes)
  n_blocks, n_keep, n_tail, n_chunks = plan.n_blocks, plan.n_keep, plan.n_tail, plan.n_chunks
  n_keys, n_groups, per_group, paged = plan.n_keys, plan.n_groups, plan.per_group, plan.paged
  n_pages = plan.n_pages
  tail_start = n_blocks * block
  rows_pad = n_groups * per_group * chunk

  ok_blocks = (jnp.ones((b, n_blocks, block), bool) if key_valid is None
               else key_valid[:, :tail_start].reshape(b, n_blocks, block))
  representatives, blocks_ok = block_relevance.block_representatives(
      k[:, :tail_start].reshape(b, n_blocks, block, hkv, d), ok_blocks, "bound")
  own = np.zeros((n_groups * per_group, n_blocks), bool)
  own[:n_chunks] = own_blocks(prefix, chunk, block)
  sinks = sink_blocks(key_valid, b, n_blocks, block, n_global)
  # Padded rows keep what they would alone (the pages serve unpadded batches only).
  row_keep = None if paged else kept_per_row(blocks_ok, prefix, chunk, block, keep, n_global)
  rows_ok = jnp.arange(rows_pad) < prefix
  rows_ok = jnp.broadcast_to(rows_ok, (b, rows_pad))
  voters = query_valid if query_valid is not None else key_valid  # pads do not vote
  if voters is not None:
    rows_ok = rows_ok & jnp.pad(voters[:, :prefix], ((0, 0), (0, rows_pad - prefix)))
  # Head-major, so one gathered row (one page) is a whole block of one kv head.
  head_major = lambda x: jnp.moveaxis(x, 2, 1)  # [B, L, Hkv, D] -> [B, Hkv, L, D]
  if paged:  # the pool: every (sequence, kv head)'s blocks then its tail, padded to whole pages
    to_pages = lambda x: head_major(jnp.pad(x, ((0, 0), (0, n_pages * block - s), (0, 0),
                                                (0, 0)))).reshape(b * hkv * n_pages, block, 1, d)
    k_pool, v_pool = to_pages(k), to_pages(v)
    first_page = (jnp.arange(b * hkv, dtype=jnp.int32) * n_pages).reshape(b, 1, hkv, 1)
    tail_pages = jnp.arange(n_blocks, n_pages, dtype=jnp.int32)
  else:
    k_keys, v_keys = head_major(k), head_major(v)  # [B, Hkv, S, D]
    valid = jnp.ones((b, s), bool) if key_valid is None else key_valid
    key_offsets = jnp.arange(block, dtype=jnp.int32)
    tail_positions = jnp.arange(tail_start, s, dtype=jnp.int32)

  def gathered_attention(q_heads, ids, n):
    """Attention over each chunk's kept blocks and the tail gathered into one key sequence per
    (sequence, kv head, chunk), its valid keys first, so that cuDNN masks the pads by a length
    per row (a [rows, 1, C, keys] mask would be a 16-bit bias of about 0.5 GB a chunk for
    LLaDA-8B at 32K, written and read in every layer): [B * Hkv * n, C, G, D]. Pad query rows
    attend too (their outputs are unspecified)."""
    kept = (jnp.maximum(ids, 0)[..., None] * block + key_offsets).reshape(b, n, hkv, -1)
    positions = jnp.concatenate(
        [kept, jnp.broadcast_to(tail_positions, (b, n, hkv, n_tail))], axis=-1)
    positions = jnp.moveaxis(positions, 2, 1)  # [B, Hkv, n, n_keys]
    ok = jnp.take_along_axis(valid[:, None], positions.reshape(b, 1, -1), axis=2)
    in_cap = jnp.repeat(jnp.moveaxis(ids, 2, 1) >= 0, block, axis=-1)  # blocks past a row's cap
    ok = ok.reshape(positions.shape) & jnp.pad(in_cap, ((0, 0),) * 3 + ((0, n_tail),),
                                               constant_values=True)
    positions, lengths = dense_attention.valid_first(positions, ok)
    lengths = lengths.reshape(b * hkv * n)
    gather = lambda x: jnp.take_along_axis(x, positions.reshape(b, hkv, -1, 1), axis=2).reshape(
        b * hkv * n, n_keys, 1, d)
    return dense_attention.attention(q_heads, gather(k_keys), gather(v_keys),
                                     implementation=implementation, key_lengths=lengths)

  def group(operands):
    """One group of n chunks: select, attend -> ([B, n * C, Hq, D], ids)."""
    q_rows, ok_rows, own_rows = operands  # [B, n*C, Hq, D], [B, n*C], [n, n_blocks]
    n = own_rows.shape[0]
    q_rows = q_rows.reshape(b, n, chunk, hkv, g, d)
    ids = select_blocks(q_rows, ok_rows.reshape(b, n, chunk), representatives, blocks_ok,
                        own_rows, sinks, n_keep, row_keep)
    q_heads = jnp.moveaxis(q_rows, 3, 1).reshape(b * hkv * n, chunk, g, d)
    if paged:  # page table: the chunk's kept blocks, then the tail's pages
      table = jnp.concatenate([ids, jnp.broadcast_to(tail_pages, (b, n, hkv, len(tail_pages)))],
                              axis=-1) + first_page
      out = dense_attention.paged_attention(
          q_heads, k_pool, v_pool, jnp.moveaxis(table, 2, 1).reshape(b * hkv * n, -1), n_keys,
          implementation)
    else:
      out = gathered_attention(q_heads, ids, n)
    out = jnp.moveaxis(out.reshape(b, hkv, n, chunk, g, d), 1, 3)
    return out.reshape(b, n * chunk, hq, d), ids

  q_prefix = jnp.pad(q[:, :prefix], ((0, 0), (0, rows_pad - prefix), (0, 0), (0, 0)))
  own = jnp.asarray(own)
  if n_groups == 1:
    local, ids = group((q_prefix, rows_ok, own))
  else:
    split = lambda x: jnp.moveaxis(x.reshape(b, n_groups, -1, *x.shape[2:]), 1, 0)
    local, ids = jax.lax.map(group, (split(q_prefix), split(rows_ok),
                                     own.reshape(n_groups, per_group, n_blocks)))
    local = jnp.moveaxis(local, 0, 1).reshape(b, rows_pad, hq, d)
    ids = jnp.moveaxis(ids, 0, 1).reshape(b, n_groups * per_group, hkv, n_keep)
  out = local_attention.with_dense_tail(local[:, :prefix], q, k, v, key_valid, query_valid,
                                       implementation)
  return (out, ids[:, :n_chunks]) if return_ids else out
