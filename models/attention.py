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

from focus_jax.kernels import dense_attention

LayerState = Any
Carry = Any


class Attention(Protocol):
  """What a transformer layer calls once it has q, k, v."""

  def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
               layer_state: LayerState, carry: Carry) -> tuple[jax.Array, LayerState, Carry]:
    """Returns (attention output [B, T, Hq, D], new layer state, new carry).

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] for the T positions the forward runs. `layer` is a
    static Python int.
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

  def __call__(self, layer, q, k, v, layer_state, carry):
    del layer, layer_state
    out = dense_attention.attention(q, k, v, key_valid=self.key_valid,
                                    query_valid=self.query_valid,
                                    implementation=self.implementation)
    return out, ((k, v) if self.return_kv else None), carry


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  chex.assert_equal_shape_prefix([q, k], 2)
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
