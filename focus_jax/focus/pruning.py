"""Sink-aware block pruning of the prompt (Focus-dLLM, mechanism 3).

The prompt is cut into aligned blocks of `block_size` keys; each block has one representative
key (computed at the cache refresh, since prompt keys do not change between refreshes). In a
sparse layer, block relevance is the attention of the focus queries over the representative keys;
the top alpha fraction of prompt blocks is kept.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from focus_jax.kernels import block_relevance as relevance_kernel
from focus_jax.kernels.sparse.common import group_queries


def num_prompt_blocks(prompt_length: int, block_size: int) -> int:
  return -(-prompt_length // block_size)


def representative_keys(k: jax.Array, key_valid: jax.Array | None, prompt_length: int,
                        block_size: int, kind: str):
  """k [B, L, Hkv, D] -> (representatives [B, Hkv, NB, D or 2D], block_valid [B, NB]): the
  prompt's blocks of `block_size` keys as `block_relevance.block_representatives` of `kind`
  ("mean", "max" or "bound"), computed once per refresh. Only valid prompt keys count (left
  padding and the response region are excluded).

  Head-major, so that every sparse layer's relevance is a batched GEMM over (batch, kv head)
  with no transpose: at batch 8 XLA otherwise transposed them in every sparse layer (0.26 ms of
  LLaDA-8B's 8K Focus step on an H200, `profile_step_h200_8k_batch8_cached_r3.json`).
  """
  b, length, hkv, d = k.shape
  nb = num_prompt_blocks(prompt_length, block_size)
  span = nb * block_size
  pos = jnp.arange(span)
  valid = jnp.broadcast_to(pos < prompt_length, (b, span))
  keys = k[:, :min(span, length)]
  if span > length:
    keys = jnp.pad(keys, ((0, 0), (0, span - length), (0, 0), (0, 0)))
  if key_valid is not None:
    kv_valid = key_valid[:, :min(span, length)]
    if span > length:
      kv_valid = jnp.pad(kv_valid, ((0, 0), (0, span - length)))
    valid = valid & kv_valid
  return relevance_kernel.block_representatives(keys.reshape(b, nb, block_size, hkv, d),
                                                valid.reshape(b, nb, block_size), kind)


def focus_weights(focus: jax.Array) -> tuple[jax.Array, jax.Array]:
  """focus [B, A] (query slots holding I_focus) -> (weight [B, A]: 1 / |I_focus| on them, 0
  elsewhere; live [B] int32: slots past the last focus slot weigh nothing). The indicator packs
  focus slots first, so the selection kernel scores |I_focus| slots, not all A."""
  weight = focus.astype(jnp.float32) / jnp.maximum(jnp.sum(focus, axis=1, keepdims=True), 1)
  live = jnp.max(jnp.where(focus, jnp.arange(focus.shape[1]) + 1, 0), axis=1).astype(jnp.int32)
  return weight, live


def block_relevance(q: jax.Array, focus: jax.Array, representatives: jax.Array,
                    block_valid: jax.Array, selection: str, kind: str) -> jax.Array:
  """Relevance of every prompt block to the focus queries: [B, G, NB] (G = Hkv or 1).

  Per query head, a softmax over blocks of q . r_b / sqrt(d) (for kind "bound", whose
  representatives hold [centre, radius], the box bound q . centre + |q| . radius); averaged
  over the query heads of a KV group (and over all heads for a shared selection) and over the
  focus queries. Computed by `kernels.block_relevance` in XLA.
  """
  hq, hkv = q.shape[2], representatives.shape[1]  # shapes checked by the relevance kernel
  weight, _ = focus_weights(focus)
  relevance = relevance_kernel.block_relevance(
      group_queries(q, hkv), relevance_kernel.row_weights(weight, hq // hkv), representatives,
      block_valid, bound=kind == "bound")  # [B, Hkv, NB]
  if selection == "shared":
    relevance = jnp.mean(relevance, axis=1, keepdims=True)
  return jnp.where(block_valid[:, None, :], relevance, -jnp.inf)


def kept_blocks(num_blocks: int, alpha: float) -> int:
  """Static number of prompt blocks a sparse layer keeps."""
  return max(1, min(num_blocks, math.ceil(alpha * num_blocks)))


def kept_per_row(block_valid: jax.Array, alpha: float) -> jax.Array:
  """[B] int32: the blocks each row keeps, `kept_blocks` of its own valid prompt blocks. A
  left-padded row thus keeps alpha of its prompt, as it would alone, not alpha of the batch's
  longest (the static capacity `kept_blocks(NB, alpha)`, which unpadded rows get exactly)."""
  return relevance_kernel.budget_per_row(block_valid,
                                         lambda n: kept_blocks(n, alpha) if n else 0)


def select_blocks(relevance: jax.Array, block_valid: jax.Array, alpha: float,
                  row_keep: jax.Array):
  """Top alpha of each row's valid blocks (`row_keep` [B], `kept_per_row`): (indices
  [B, G, C] int32, counts [B, G] int32).

  The first `counts` ids are distinct valid blocks (invalid ones score -inf and come last),
  which is what lets the sparse layer skip `normalize_selection`."""
  return relevance_kernel.top_blocks(relevance, block_valid,
                                    kept_blocks(relevance.shape[-1], alpha), row_keep)


def check_selection_impl(implementation: str, selection: str, q_shape, n_blocks: int) -> None:
  """Raises early where the fused kernel ("pallas_gpu") cannot serve this selection."""
  if implementation != "pallas_gpu":
    return
  why = relevance_kernel.supported(q_shape, n_blocks)
  if selection != "per_kv_head":
    why = why or f"the fused kernel selects per kv head, not {selection!r}"
  if why:
    raise ValueError(f"relevance_impl='pallas_gpu' cannot run this: {why}")


def select_prompt_blocks(q: jax.Array, focus: jax.Array, representatives: jax.Array,
                         block_valid: jax.Array, *, alpha: float, selection: str, kind: str,
                         implementation: str = "xla", row_keep: jax.Array | None = None):
  """The prompt blocks a sparse layer keeps: the top alpha of the row's valid blocks by
  relevance to the focus queries (C = alpha of all NB blocks is the static capacity).

  q [B, A, Hq, D] (the step's query slots), focus [B, A] (slots holding I_focus) ->
  (indices [B, G, C] int32, counts [B, G] int32): the first `counts` ids are distinct valid
  blocks (in an order the implementation chooses), as the sparse attention's
  `distinct_selection` expects. "xla" (the default): `block_relevance` then `lax.top_k`;
  "pallas_gpu": one fused kernel (`kernels.block_relevance.select_top_blocks`) scoring only the
  focus slots, measured slower (see that module). `row_keep` [B]: `kept_per_row(block_valid,
  alpha)`, which a step's sparse layers share (computed here when not given).
  """
  check_selection_impl(implementation, selection, q.shape, block_valid.shape[1])
  if row_keep is None:
    row_keep = kept_per_row(block_valid, alpha)
  if implementation == "xla":
    relevance = block_relevance(q, focus, representatives, block_valid, selection, kind)
    return select_blocks(relevance, block_valid, alpha, row_keep)
  weight, live = focus_weights(focus)
  return relevance_kernel.select_top_blocks(
      q, weight, representatives, block_valid, keep=kept_blocks(block_valid.shape[1], alpha),
      bound=kind == "bound", live_queries=live, implementation=implementation,
      row_keep=row_keep, interpret=jax.default_backend() != "gpu")  # off a GPU (tests) the kernel is interpreted
