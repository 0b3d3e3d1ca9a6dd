"""Past-confidence indicator (Focus-dLLM, mechanism 1).

Confidences from step t-1 predict which masked positions step t unmasks: I_focus is the top
rho*k still-masked positions of the block by c^(t-1); I_active widens I_focus by a local window
and is what the step runs through the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focus_jax.sampling.common import NEG_INF, rank_descending


def focus_set(prev_confidence: jax.Array, masked: jax.Array, k: jax.Array, rho: int) -> jax.Array:
  """[B, W] bool: the rho*k masked positions with the highest past confidence.

  A masked position with no confidence yet (-inf: never computed since the block began, as in
  a block entered by a cached step) still ranks above every decoded one, in position order;
  else decoded positions would tie with it and could take every slot, and the step commit
  nothing."""
  unknown = jnp.finfo(jnp.float32).min
  scores = jnp.where(masked, jnp.maximum(prev_confidence.astype(jnp.float32), unknown), NEG_INF)
  return masked & (rank_descending(scores) < (rho * k)[:, None])


def widen(focus: jax.Array, window: int) -> jax.Array:
  """[B, W] bool: positions within the window i-(w-1)//2 .. i+w//2 of a focus position."""
  w = focus.shape[1]
  offset = jnp.arange(w)[None, :] - jnp.arange(w)[:, None]  # [i, j] = j - i
  band = (offset >= -((window - 1) // 2)) & (offset <= window // 2)
  return jnp.any(focus[:, :, None] & band[None], axis=1)


def active_slots(active: jax.Array, focus: jax.Array, masked: jax.Array, capacity: int):
  """Packs the active positions into `capacity` slots: (window index [B, A], valid [B, A]).

  If more positions are active than slots, focus positions are kept first, then the other
  masked ones, then decoded neighbours (each tier in position order). The valid slots come
  first, and among them the focus positions (each group in position order): the block
  selection then scores a prefix of the slots, not all of them.
  """
  w = active.shape[1]
  tier = focus.astype(jnp.int32) * 2 + (masked & ~focus).astype(jnp.int32)
  priority = jnp.where(active, (tier * (w + 1) - jnp.arange(w)[None, :]).astype(jnp.float32),
                       NEG_INF)
  chosen = active & (rank_descending(priority) < capacity)
  group = (~chosen).astype(jnp.int32) * 2 + (~focus).astype(jnp.int32)  # chosen focus: 0
  order = jnp.argsort(group, axis=1, stable=True)[:, :capacity]
  valid = jnp.take_along_axis(chosen, order, axis=1)
  return order.astype(jnp.int32), valid
