"""The decoding-mode interface: how a denoising step gets its logits.

A sampler (LLaDA's or Dream's) decides *which* tokens to unmask; a `Denoiser` decides *how* the
logits of the current block are computed: a full forward (vanilla), a prefix or dual KV cache
(Fast-dLLM), or Focus-dLLM's sparse step. The sampler loop calls `window_logits` once per step
inside one `lax.while_loop`; the denoiser's state (its KV cache) is part of the loop carry.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax

from focus_jax.models.config import ModelConfig


@flax.struct.dataclass
class Canvas:
  """The canvas [prompt | MASK x gen_length] and what the model needs to run it.

  prompt_length, gen_length and block_length are static; tokens and attention_mask are traced.
  """

  tokens: jax.Array  # [B, L] int32
  attention_mask: jax.Array | None  # [B, L] bool (False on left-padding) or None
  prompt_length: int = flax.struct.field(pytree_node=False)
  block_length: int = flax.struct.field(pytree_node=False)

  @property
  def length(self) -> int:
    return self.tokens.shape[1]


@flax.struct.dataclass
class StepContext:
  """What a denoiser may know about the step it serves."""

  block_start: jax.Array  # int32 scalar: canvas index of the current block's first position
  block_index: jax.Array  # int32 scalar: which block of the generation region
  masked: jax.Array  # [B, W] bool: still-masked positions of the block window
  prev_confidence: jax.Array  # [B, W] float32: last step's confidences (-inf where unknown)
  planned_unmask: jax.Array  # [B] int32: tokens the sampler plans to unmask this step (k)
  # Static: the block's first step (caches refresh here), traced separately from the others.
  block_entry: bool = flax.struct.field(pytree_node=False, default=False)
  # Static: the most tokens the rule's schedule plans for one step (None: no bound known), so
  # that a denoiser can size what depends on `planned_unmask` (Focus's relevance queries).
  max_planned_unmask: int | None = flax.struct.field(pytree_node=False, default=None)


class Denoiser(Protocol):
  """Computes the logits of the block window for one denoising step."""

  config: ModelConfig

  def prepare_params(self, params: Any) -> Any:
    """The params as the denoising loop reads them, made once before it (e.g. the refresh's
    e4m3 weights); the other methods take what this returns."""
    ...

  def init_state(self, params: Any, canvas: Canvas) -> Any:
    """Initial denoiser state (e.g. an empty KV cache) for this canvas; a pytree."""
    ...

  def window_logits(self, params: Any, canvas: Canvas, state: Any,
                    ctx: StepContext) -> tuple[jax.Array, jax.Array | None, Any]:
    """(logits, computed, new state).

    logits: float32 [B, W, V] for canvas positions [block_start, block_start + W), aligned to the
    tokens they predict (Dream's shift already applied). computed: [B, W] bool, the positions
    whose logits were recomputed this step (None: all); the sampler only commits those.
    """
    ...

  def after_step(self, state: Any, ctx: StepContext, committed: jax.Array) -> Any:
    """Sees which window positions the sampler committed (diagnostics); returns the state."""
    ...
