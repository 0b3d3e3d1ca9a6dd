"""The per-layer attention of a Focus step, read as the paper's algorithm.

For each layer of a sparse step (after the layer's fresh K/V for I_active went into the cache):
  dense layer          -> Q_active attends to the whole cache;
  last leading dense   -> ... and the sink set is chosen from its attention (then reused);
  sparse layer         -> keep the top-alpha prompt blocks by relevance to Q_focus, attend to
                          them, the sinks and the whole response region.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from focus_jax.decoding import cache as kv
from focus_jax.focus import pruning, sinks
from focus_jax.focus.config import FocusConfig
from focus_jax.kernels.sparse_attention import block_sparse_attention
from focus_jax.kernels.sparse.common import selection_key_mask


@flax.struct.dataclass
class LayerCarry:
  """Threaded through the layers of one step."""

  sink_positions: jax.Array  # [B, N] int32
  sink_valid: jax.Array  # [B, N] bool
  retained_mass: jax.Array  # [n_layers] float32 (diagnostics)
  kv_tokens: jax.Array  # [n_layers] float32 (diagnostics)

  @classmethod
  def initial(cls, batch: int, n_sink: int, n_layers: int) -> LayerCarry:
    return cls(jnp.zeros((batch, n_sink), jnp.int32), jnp.zeros((batch, n_sink), bool),
               jnp.zeros((n_layers,), jnp.float32), jnp.zeros((n_layers,), jnp.float32))


@dataclasses.dataclass(frozen=True)
class FocusAttend:
  """`attend` hook of `CachedAttention` for a Focus sparse step (see module docstring)."""

  focus: FocusConfig
  n_layers: int
  query_valid: jax.Array  # [B, A], valid slots first (indicator.active_slots packs them)
  query_focus: jax.Array  # [B, A]: slots holding I_focus (un-widened) queries
  key_valid: jax.Array | None  # [B, L]
  prompt_start: jax.Array  # [B] first non-pad key
  prompt_length: int  # static: the response region starts here
  representatives: tuple[Any, ...]  # per layer: [B, Hkv, NB, D or 2D] for sparse layers, else None
  block_valid: jax.Array  # [B, NB]
  row_keep: jax.Array  # [B] blocks each row keeps (`pruning.kept_per_row`), once a step
  attention_impl: str = "auto"
  # The leading slots that can hold I_focus (`indicator.active_slots` packs them first): the
  # block relevance scores these, not every slot. None: all slots.
  focus_slots: int | None = None

  @property
  def query_counts(self) -> jax.Array:
    """[B] live query slots: the kernels skip the padded ones (their outputs are dropped)."""
    return jnp.sum(self.query_valid, axis=1, dtype=jnp.int32)

  def __call__(self, layer: int, q, k_cache, v_cache, carry: LayerCarry):
    if self.focus.is_dense(layer, self.n_layers):
      if layer == self.focus.sink_layer(self.n_layers):
        out, scores = sinks.attention_with_sink_scores(
            q, k_cache, v_cache, self.key_valid, self.query_valid, self.prompt_start,
            self.prompt_length, self.attention_impl, split_kv_impl=self.focus.sparse_impl)
        positions, valid = sinks.select_sinks(scores, self.prompt_start, self.prompt_length,
                                              self.focus.n_sink)
        carry = carry.replace(sink_positions=positions, sink_valid=valid)
      else:
        out = kv.dense_over_cache(q, k_cache, v_cache, self.key_valid, self.prompt_start,
                                  self.prompt_length, self.attention_impl,
                                  query_counts=self.query_counts,
                                  split_kv_impl=self.focus.sparse_impl)
      if self.focus.diagnostics:
        n_keys = k_cache.shape[1] if self.key_valid is None else jnp.mean(
            jnp.sum(self.key_valid, axis=1))
        carry = carry.replace(retained_mass=carry.retained_mass.at[layer].set(1.0),
                              kv_tokens=carry.kv_tokens.at[layer].set(n_keys))
      return out, carry
    return self._sparse(layer, q, k_cache, v_cache, carry)

  def _sparse(self, layer, q, k_cache, v_cache, carry: LayerCarry):
    cfg = self.focus
    b, length = k_cache.shape[:2]
    f = self.focus_slots  # (None: every slot)
    indices, counts = pruning.select_prompt_blocks(
        q[:, :f], self.query_focus[:, :f], self.representatives[layer], self.block_valid,
        alpha=cfg.alpha,
        selection=cfg.selection, kind=cfg.representative, implementation=cfg.relevance_impl,
        row_keep=self.row_keep)
    response_start = jnp.full((b,), self.prompt_length, jnp.int32)
    response_end = jnp.full((b,), length, jnp.int32)
    extra = {}
    if cfg.n_sink:
      # The sinks are rows of this layer's cache (the GPU kernel gathers them itself); one inside
      # a kept block is already attended there, so the kernel counts each key once.
      extra = dict(extra_positions=carry.sink_positions, extra_valid=carry.sink_valid,
                   dedup_extra=True)
    # The kept ids are distinct valid prompt blocks: the selection needs no normalising.
    out = block_sparse_attention(
        q, k_cache, v_cache, indices, counts, self.prompt_start, response_start, response_end,
        **extra, block_size=cfg.prompt_block_size, implementation=cfg.sparse_impl,
        max_response_len=length - self.prompt_length, distinct_selection=True,
        query_counts=self.query_counts)
    if cfg.diagnostics:
      carry = self._record(layer, q, k_cache, indices, counts, response_start, response_end,
                           extra.get("extra_valid"), carry)
    return out, carry

  def _record(self, layer, q, k_cache, indices, counts, response_start, response_end,
              sink_valid, carry: LayerCarry):
    """Attention mass the sparse set keeps (vs dense over the cache) and keys it attends."""
    b, a, hq, d = q.shape
    length, hkv = k_cache.shape[1], k_cache.shape[2]
    attended = selection_key_mask(indices, counts, self.prompt_start, response_start,
                                  response_end, block_size=self.focus.prompt_block_size,
                                  seq_len=length)  # [B, G, L]
    attended = jnp.broadcast_to(attended, (b, hkv, length)).astype(jnp.int32)
    if sink_valid is not None:
      sv = sink_valid if sink_valid.ndim == 3 else jnp.broadcast_to(sink_valid[..., None],
                                                                     sink_valid.shape + (hkv,))
      rows = jnp.arange(b)[:, None, None]
      heads = jnp.arange(hkv)[None, None, :]
      attended = attended.at[rows, heads, carry.sink_positions[:, :, None]].max(
          sv.astype(jnp.int32))
    attended = attended > 0
    qg = q.reshape(b, a, hkv, hq // hkv, d)
    logits = jnp.einsum("bahgd,bshd->bhgas", qg, k_cache, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(d))
    if self.key_valid is not None:
      logits = jnp.where(self.key_valid[:, None, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    kept = jnp.sum(jnp.where(attended[:, :, None, None, :], probs, 0.0), axis=-1)  # [B,Hkv,G,A]
    weight = self.query_valid.astype(jnp.float32)[:, None, None, :]
    mass = jnp.sum(kept * weight) / jnp.maximum(jnp.sum(weight) * hq, 1.0)
    tokens = jnp.mean(jnp.sum(attended, axis=-1))
    return carry.replace(retained_mass=carry.retained_mass.at[layer].set(mass),
                         kv_tokens=carry.kv_tokens.at[layer].set(tokens))
