"""The denoising loop shared by every sampler and decoding mode: one `lax.while_loop`.

The canvas is [prompt | MASK x gen_length], decoded block by block (semi-autoregressive). An outer
loop walks the blocks; each block runs its entry step (where caches refresh), then an inner
loop of steps until no masked position is left in the block. Each step:
  1. the `Denoiser` computes the block's logits (full forward, cached, or Focus-sparse);
  2. the sampler's `UnmaskRule` picks tokens and which masked positions to commit.
Moving on when the block is empty (rather than after a fixed step count) is what the fixed
schedules reach anyway, and it is what threshold parallel decoding needs. Everything is carried
functionally in `LoopState`; there is no host sync inside.
"""

from __future__ import annotations

from typing import Any, Protocol

import chex
import flax.struct
import jax
import jax.numpy as jnp

from focus_jax.decoding.base import Canvas, Denoiser, StepContext
from focus_jax.sampling.common import NEG_INF, set_window, window


class UnmaskRule(Protocol):
  """A sampler's policy: which tokens to write where, given the block's logits."""

  steps_per_block: int

  def block_schedule(self, masked: jax.Array) -> jax.Array:
    """Per-block schedule state computed at block entry from the block's mask [B, W]."""
    ...

  def planned_unmask(self, schedule: jax.Array, step: jax.Array, masked: jax.Array) -> jax.Array:
    """[B] int32: how many tokens this step is expected to unmask (Focus's k)."""
    ...

  def max_planned_unmask(self, block_length: int) -> int:
    """The most `planned_unmask` gives while a block's schedule lasts (a static bound; a block
    that outlives its schedule plans every mask left). Optional: a rule without it gives Focus
    no bound, and its relevance then scores every query slot."""
    ...

  def apply(self, rng: jax.Array, logits: jax.Array, tokens: jax.Array, masked: jax.Array,
            schedule: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (new block tokens [B, W], confidence [B, W] of masked positions, -inf elsewhere)."""
    ...


@flax.struct.dataclass
class LoopState:
  tokens: jax.Array  # [B, L] the canvas
  block: jax.Array  # int32 scalar
  step_in_block: jax.Array  # int32 scalar
  schedule: jax.Array  # rule-specific per-block schedule
  confidence: jax.Array  # [B, W] confidences of the last step (Focus's past-confidence input)
  rng: jax.Array
  num_steps: jax.Array  # int32: denoising steps (forward passes) taken
  denoiser_state: Any


def make_canvas(prompt: jax.Array, prompt_mask: jax.Array | None, gen_length: int,
                block_length: int, mask_token_id: int) -> Canvas:
  """[prompt | MASK x gen_length]; the prompt is left-padded, `prompt_mask` False on pads."""
  chex.assert_rank(prompt, 2)
  b, p = prompt.shape
  if gen_length % block_length:
    raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length "
                     f"({block_length})")
  tokens = jnp.concatenate(
      [prompt.astype(jnp.int32), jnp.full((b, gen_length), mask_token_id, jnp.int32)], axis=1)
  mask = None
  if prompt_mask is not None:
    chex.assert_equal_shape([prompt, prompt_mask])
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, gen_length), bool)], axis=1)
  return Canvas(tokens=tokens, attention_mask=mask, prompt_length=p, block_length=block_length)


def unconditional_canvas(canvas: Canvas, mask_token_id: int) -> Canvas:
  """Classifier-free guidance: the same canvas with every prompt token masked."""
  prompt_region = jnp.arange(canvas.length) < canvas.prompt_length
  tokens = jnp.where(prompt_region[None, :], mask_token_id, canvas.tokens)
  return canvas.replace(tokens=tokens)


def stack_canvases(a: Canvas, b: Canvas) -> Canvas:
  mask = None
  if a.attention_mask is not None:
    mask = jnp.concatenate([a.attention_mask, b.attention_mask], axis=0)
  return a.replace(tokens=jnp.concatenate([a.tokens, b.tokens], axis=0), attention_mask=mask)


def run(params: Any, canvas: Canvas, denoiser: Denoiser, rule: UnmaskRule, rng: jax.Array,
        mask_token_id: int, cfg_scale: float = 0.0) -> LoopState:
  """Denoises every block of `canvas`; returns the final loop state (tokens in `.tokens`)."""
  b, length = canvas.tokens.shape
  w = canvas.block_length
  num_blocks = (length - canvas.prompt_length) // w
  # Every step unmasks at least one token per row that has masks, except where the model
  # predicts the mask token, which is forbidden past a block's schedule (`one_step`); so a block
  # takes at most its schedule and one step more, and this bound only guards against a rule
  # that unmasks nothing.
  max_steps = num_blocks * (max(rule.steps_per_block, w) + 1)
  use_cfg = cfg_scale > 0
  params = denoiser.prepare_params(params)

  def model_canvas(tokens):
    c = canvas.replace(tokens=tokens)
    return stack_canvases(c, unconditional_canvas(c, mask_token_id)) if use_cfg else c

  first_masked = window(canvas.tokens, canvas.prompt_length, w) == mask_token_id
  state = LoopState(
      tokens=canvas.tokens, block=jnp.int32(0), step_in_block=jnp.int32(0),
      schedule=rule.block_schedule(first_masked),
      confidence=jnp.full((b, w), NEG_INF, jnp.float32), rng=rng, num_steps=jnp.int32(0),
      denoiser_state=denoiser.init_state(params, model_canvas(canvas.tokens)))

  max_planned = (rule.max_planned_unmask(w) if hasattr(rule, "max_planned_unmask") else None)

  def one_step(s: LoopState, entry: bool) -> LoopState:
    """One denoising step of the current block; `entry` (static) marks the block's first."""
    start = canvas.prompt_length + s.block * w
    block_tokens = window(s.tokens, start, w)
    masked = block_tokens == mask_token_id
    schedule = rule.block_schedule(masked) if entry else s.schedule
    step = jnp.int32(0) if entry else s.step_in_block
    planned = rule.planned_unmask(schedule, step, masked)
    prev_confidence = jnp.full((b, w), NEG_INF, jnp.float32) if entry else s.confidence
    ctx = StepContext(block_start=start, block_entry=entry, block_index=s.block, masked=masked,
                      prev_confidence=prev_confidence, planned_unmask=planned,
                      max_planned_unmask=max_planned)
    c = model_canvas(s.tokens)
    if use_cfg:
      ctx = ctx.replace(masked=jnp.concatenate([masked, masked]),
                        prev_confidence=jnp.concatenate([prev_confidence] * 2),
                        planned_unmask=jnp.concatenate([planned, planned]))
    logits, computed, dstate = denoiser.window_logits(params, c, s.denoiser_state, ctx)
    if use_cfg:
      cond_logits, uncond_logits = jnp.split(logits, 2, axis=0)
      logits = uncond_logits + (cfg_scale + 1.0) * (cond_logits - uncond_logits)
      computed = None if computed is None else computed[:b] & computed[b:]
    rng, step_rng = jax.random.split(s.rng)
    # Only positions whose logits were recomputed may be committed (Focus runs a subset).
    candidates = masked if computed is None else masked & computed
    # A predicted mask token leaves its position masked. Within the block's schedule that is
    # the reference samplers' behaviour (the position is predicted again later); past it, the
    # block (which runs until it has no mask) would spend every later block's steps, so there
    # the mask token is not predicted.
    past_schedule = step >= rule.steps_per_block
    logits = logits.at[..., mask_token_id].set(
        jnp.where(past_schedule, NEG_INF, logits[..., mask_token_id]))
    new_block, confidence = rule.apply(step_rng, logits, block_tokens, candidates, schedule, step)
    if computed is not None:  # keep the last known confidence where nothing was recomputed
      confidence = jnp.where(computed, confidence, jnp.where(masked, prev_confidence, NEG_INF))
    committed = new_block != block_tokens
    dstate = denoiser.after_step(dstate, ctx, jnp.concatenate([committed] * 2)
                                 if use_cfg else committed)
    return LoopState(
        tokens=set_window(s.tokens, start, new_block), block=s.block, step_in_block=step + 1,
        schedule=schedule, confidence=confidence, rng=rng, num_steps=s.num_steps + 1,
        denoiser_state=dstate)

  def block_masked(s: LoopState) -> jax.Array:
    start = canvas.prompt_length + s.block * w
    return jnp.any(window(s.tokens, start, w) == mask_token_id)

  def block_body(s: LoopState) -> LoopState:
    # The entry step (where caches refresh) is straight-line code and the block's other steps
    # an inner loop: a conditional choosing between them would take the KV cache as an operand
    # of each branch, and XLA then copies the whole cache on every step.
    s = one_step(s, entry=True)
    s = jax.lax.while_loop(lambda s: block_masked(s) & (s.num_steps < max_steps),
                           lambda s: one_step(s, entry=False), s)
    return s.replace(block=s.block + 1, step_in_block=jnp.int32(0))

  return jax.lax.while_loop(lambda s: (s.block < num_blocks) & (s.num_steps < max_steps),
                            block_body, state)
