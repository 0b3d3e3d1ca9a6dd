"""Vanilla decoding: a full bidirectional forward over the whole canvas at every step."""

from __future__ import annotations

import dataclasses

from focus_jax.decoding.base import Canvas, StepContext
from focus_jax.models import family
from focus_jax.models.config import ModelConfig
from focus_jax.sampling.common import window


@dataclasses.dataclass(frozen=True)
class VanillaDenoiser:
  config: ModelConfig
  attention_impl: str = "auto"

  def prepare_params(self, params):
    return params

  def init_state(self, params, canvas: Canvas):
    del params, canvas
    return ()

  def window_logits(self, params, canvas: Canvas, state, ctx: StepContext):
    # Logits are projected for the window only: the LM head over a long canvas would not fit.
    logits = family.forward_logits(self.config, params, canvas.tokens, canvas.attention_mask,
                                   implementation=self.attention_impl,
                                   logits_window=(ctx.block_start, ctx.masked.shape[1]))
    return logits, None, state

  def after_step(self, state, ctx, committed):
    return state
