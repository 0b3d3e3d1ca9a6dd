"""The single attention interface of the transformer core.

The core computes q, k, v (RoPE applied) and hands them to an `Attention` object, which decides
*what* they attend to: the fresh keys of the same call (a plain forward), a KV cache written and
read in place (the cached decoding modes), or a sparse selection (Focus). The models know nothing
beyond this interface, so new decoding policies and kernels plug in without touching them.

Per-layer state (a KV cache) is passed in and returned functionally; `carry` is threaded through
the layers for state that one layer hands to the next (Focus's sink set, found at layer l_dense
and reused above it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import chex
import jax
import jax.numpy as jnp

from focus_jax.kernels import dense_attention

LayerState = Any
Carry = Any


class Attention(Protocol):
  """What a transformer layer calls once it has q, k, v."""

  def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
               layer_state: LayerState, carry: Carry,
               query_rows: jax.Array | None = None) -> tuple[jax.Array, LayerState, Carry]:
    """Returns (attention output [B, T, Hq, D], new layer state, new carry).

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] for the T positions the forward runs. `layer` is a
    static Python int. With `query_rows` [R] (the last layer of a forward whose caller needs
    only R output rows), q is [B, R, Hq, D], those rows of the T positions, and so is the output.
    """
    ...


@dataclasses.dataclass(frozen=True)
class SelfAttention:
  """Plain bidirectional attention over the positions of the call itself.

  `key_valid` [B, T] masks pad keys; `query_valid` [B, T] (Dream) additionally masks pad query
  rows. With `return_kv`, each layer's (k, v) is returned as its layer state, which is what a
  cache refresh stores.
  """

  key_valid: jax.Array | None = None
  query_valid: jax.Array | None = None
  return_kv: bool = False
  implementation: str = "auto"

  def __call__(self, layer, q, k, v, layer_state, carry, query_rows=None):
    del layer, layer_state
    out = dense_attention.attention(q, k, v, key_valid=self.key_valid,
                                    query_valid=rows_of(self.query_valid, query_rows),
                                    implementation=self.implementation)
    return out, ((k, v) if self.return_kv else None), carry


def rows_of(mask: jax.Array | None, query_rows: jax.Array | None) -> jax.Array | None:
  """A per-position [B, T] mask restricted to `query_rows` (as q is), or as it is."""
  if mask is None or query_rows is None:
    return mask
  return jnp.take(mask, query_rows, axis=1)


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, query_rows: jax.Array | None = None):
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  if query_rows is None:
    chex.assert_equal_shape_prefix([q, k], 2)
  else:
    chex.assert_shape(query_rows, (q.shape[1],))
    chex.assert_equal_shape_prefix([q, k], 1)
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
