"""Approximate KV cache machinery shared by the cached decoding modes.

A *refresh* is a full forward over the canvas that stores every layer's K/V ([B, L, Hkv, D] per
layer, one buffer per layer so each is updated in place). A *cached step* runs only a query set
(canvas positions, fixed size, with a validity mask): each layer writes the fresh K/V of the
query positions it is told to write into its buffer and attends over the buffer. Prefix cache,
dual cache and Focus differ only in which positions they run and how they attend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from focus_jax.decoding.base import Canvas
from focus_jax.kernels import dense_attention
from focus_jax.models import family
from focus_jax.models.attention import SelfAttention
from focus_jax.models.config import ModelConfig
from focus_jax.models.transformer import Transformer


@flax.struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, L, Hkv, D]
  v: tuple[jax.Array, ...]

  @classmethod
  def empty(cls, config: ModelConfig, batch: int, length: int) -> KVCache:
    shape = (batch, length, config.n_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.n_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.n_layers)))


@flax.struct.dataclass
class QuerySet:
  """Canvas positions a cached step runs: [B, A], with validity (invalid slots are padding)."""

  positions: jax.Array
  valid: jax.Array
  write: jax.Array  # [B, A] bool: store this slot's fresh K/V in the cache


def canvas_masks(config: ModelConfig, canvas: Canvas):
  """(positions [B, L], key_valid [B, L] or None) of the canvas under the family's semantics."""
  positions, key_valid, _ = family.positions_and_masks(config, canvas.attention_mask,
                                                        canvas.tokens.shape)
  return positions, key_valid


def refresh(config: ModelConfig, params, canvas: Canvas, window_start: jax.Array, window: int,
            attention_impl: str = "auto"):
  """Full forward: (window logits [B, W, V], KVCache of every position, final hidden [B, L, D])."""
  positions, key_valid, query_valid = family.positions_and_masks(
      config, canvas.attention_mask, canvas.tokens.shape)
  model = Transformer(config)
  attention = SelfAttention(key_valid=key_valid, query_valid=query_valid, return_kv=True,
                            implementation=attention_impl)
  hidden, kv, _ = model.apply({"params": params}, canvas.tokens, positions, attention)
  logits = window_logits_from_hidden(config, params, hidden, window_start, window)
  return logits, KVCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv))


def window_logits_from_hidden(config: ModelConfig, params, hidden: jax.Array,
                              window_start: jax.Array, window: int) -> jax.Array:
  """LM head over the hidden states that predict canvas positions [start, start+W)."""
  rows = jnp.take(hidden, family.source_positions(config, window_start, window), axis=1)
  return Transformer(config).apply({"params": params}, rows, method=Transformer.logits)


def write_rows(buffer: jax.Array, positions: jax.Array, values: jax.Array,
               write: jax.Array) -> jax.Array:
  """buffer[b, positions[b, a]] = values[b, a] where write[b, a]; other slots are dropped."""
  b, length = buffer.shape[:2]
  target = jnp.where(write, positions, length)  # out of bounds -> dropped
  rows = jnp.arange(b)[:, None]
  return buffer.at[rows, target].set(values, mode="drop")


@dataclasses.dataclass(frozen=True)
class CachedAttention:
  """Writes the query slots' K/V into the layer's cache, then attends densely over the cache.

  `attend` may replace the dense attention for some layers (Focus's sparse layers); it gets
  (layer, q, k_cache, v_cache, carry) and returns (out, carry).
  """

  queries: QuerySet
  key_valid: jax.Array | None
  attention_impl: str = "auto"
  attend: Callable[..., Any] | None = None

  def __call__(self, layer, q, k, v, layer_state, carry):
    k_cache, v_cache = layer_state
    k_cache = write_rows(k_cache, self.queries.positions, k, self.queries.write)
    v_cache = write_rows(v_cache, self.queries.positions, v, self.queries.write)
    if self.attend is not None:
      out, carry = self.attend(layer, q, k_cache, v_cache, carry)
    else:
      out = dense_attention.attention(q, k_cache, v_cache, key_valid=self.key_valid,
                                      implementation=self.attention_impl)
    return out, (k_cache, v_cache), carry


def cached_forward(config: ModelConfig, params, canvas: Canvas, cache: KVCache,
                   queries: QuerySet, attention_impl: str = "auto",
                   attend: Callable[..., Any] | None = None, carry: Any = None):
  """Runs the query set against the cache: (final hidden [B, A, D], new cache, carry)."""
  chex.assert_equal_shape([queries.positions, queries.valid, queries.write])
  positions, key_valid = canvas_masks(config, canvas)
  safe = jnp.clip(queries.positions, 0, canvas.length - 1)
  tokens = jnp.take_along_axis(canvas.tokens, safe, axis=1)
  query_positions = jnp.take_along_axis(positions, safe, axis=1)
  attention = CachedAttention(queries, key_valid, attention_impl, attend)
  hidden, kv, carry = Transformer(config).apply(
      {"params": params}, tokens, query_positions, attention,
      tuple(zip(cache.k, cache.v)), carry)
  return hidden, KVCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv)), carry


def logits_at(config: ModelConfig, params, hidden: jax.Array) -> jax.Array:
  return Transformer(config).apply({"params": params}, hidden, method=Transformer.logits)
