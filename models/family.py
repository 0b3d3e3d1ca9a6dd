"""What LLaDA and Dream do differently around the shared core: padding and the logit shift.

Everything a caller needs to run a whole canvas lives here, so samplers and tests never
re-derive positions or masks.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from focus_jax.models.attention import SelfAttention
from focus_jax.models.config import ModelConfig
from focus_jax.models.transformer import Transformer


def positions_and_masks(config: ModelConfig, attention_mask: jax.Array | None,
                        shape: tuple[int, int]):
  """(positions [B,L], key_valid [B,L] or None, query_valid [B,L] or None) for a canvas.

  LLaDA: positions stay arange(L); only pad keys are masked.
  Dream: positions are cumsum(mask) - 1 (pads get 1, as the reference does); pad keys and pad
  queries are masked.
  """
  b, l = shape
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)), None, None
  chex.assert_shape(attention_mask, (b, l))
  valid = attention_mask.astype(bool)
  if config.padding == "key_only":
    return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)), valid, None
  positions = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
  positions = jnp.where(valid, positions, 1)
  return positions, valid, valid


def align_logits(config: ModelConfig, logits: jax.Array) -> jax.Array:
  """Dream predicts token j from position j-1: logits = [logits[:, :1], logits[:, :-1]]."""
  if not config.logit_shift:
    return logits
  return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def source_positions(config: ModelConfig, start: jax.Array, length: int) -> jax.Array:
  """Canvas positions whose hidden states predict tokens [start, start+length) (the shift)."""
  shift = 1 if config.logit_shift else 0
  return jnp.maximum(jnp.arange(length, dtype=jnp.int32) + start - shift, 0)


def forward_logits(config: ModelConfig, params, tokens: jax.Array,
                   attention_mask: jax.Array | None = None, implementation: str = "auto",
                   logits_window: tuple[jax.Array | int, int] | None = None) -> jax.Array:
  """Full bidirectional forward over a canvas: float32 logits aligned to the tokens.

  Returns [B, L, V], or [B, W, V] for `logits_window=(start, W)` (start may be traced): only
  those rows leave the last layer and go through the LM head.
  """
  positions, key_valid, query_valid = positions_and_masks(config, attention_mask, tokens.shape)
  model = Transformer(config)
  attention = SelfAttention(key_valid=key_valid, query_valid=query_valid,
                            implementation=implementation)
  rows = None if logits_window is None else source_positions(config, *logits_window)
  hidden, _, _ = model.apply({"params": params}, tokens, positions, attention, output_rows=rows)
  logits = model.apply({"params": params}, hidden, method=Transformer.logits)
  return align_logits(config, logits) if logits_window is None else logits
