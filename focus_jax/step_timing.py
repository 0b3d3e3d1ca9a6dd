"""Time single denoising steps alone: a block-entry step (refresh) and a cached step.

The jitted generation runs every step inside one `lax.while_loop`, where no host clock can see
them. Entry steps (a refresh: a second at 32K) are jitted by themselves, with the denoiser state
donated and threaded through as the loop does. A cached step (~10 ms) is timed inside a loop of
its own, as the difference between runs of 1 and 1 + n steps: a call of its own would add the
dispatch of a few hundred buffers (about 3 ms at 32K on an H100: 15.0 against 12.2 ms), which the generation loop never
pays. Used by the Focus diagnostics of `main.py` and by the benchmarks.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from focus_jax.decoding.base import Canvas, Denoiser, StepContext
from focus_jax.models.transformer import compiler_options


def entry_context(canvas: Canvas, batch: int, max_planned_unmask: int = 1) -> StepContext:
  """The entry step of the first block (all positions masked, confidences spread), planning
  one token; `max_planned_unmask`: the sampler rule's bound (`UnmaskRule.max_planned_unmask`),
  which sizes Focus's relevance queries as the generation does (Dream's schedule: 2)."""
  w = canvas.block_length
  return StepContext(block_start=jnp.int32(canvas.prompt_length), block_index=jnp.int32(0),
                     masked=jnp.ones((batch, w), bool),
                     prev_confidence=jnp.broadcast_to(jnp.linspace(0.0, 1.0, w), (batch, w)),
                     planned_unmask=jnp.ones((batch,), jnp.int32), block_entry=True,
                     max_planned_unmask=max_planned_unmask)


def _jit_donating_state(fn: Callable[..., Any], denoiser: Denoiser,
                        canvas: Canvas) -> Callable[..., Any]:
  """fn jitted as the generation compiles it (the model config's XLA options at the canvas's
  batch size), its second argument (the loop state) donated."""
  options = compiler_options(denoiser.config, canvas.tokens.shape[0])
  return jax.jit(fn, donate_argnums=(1,), compiler_options=options)


def jitted_step(denoiser: Denoiser, canvas: Canvas) -> Callable[..., Any]:
  """(params, state, ctx) -> (logits, state), state donated."""
  return _jit_donating_state(lambda p, s, c: denoiser.window_logits(p, canvas, s, c)[::2],
                             denoiser, canvas)


def median_step_seconds(step, params, state, ctx: StepContext, repeats: int):
  """Median wall time of `step` after warm-up: (seconds, state).

  Two warm-up calls: the first state may come uncommitted from outside jit, and the call after
  it sees committed buffers, which is a second compilation."""
  for _ in range(2):
    _, state = jax.block_until_ready(step(params, state, ctx))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _, state = jax.block_until_ready(step(params, state, ctx))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), state


def in_loop_step_seconds(denoiser: Denoiser, params, canvas: Canvas, state, ctx: StepContext,
                         extra_steps: int = 8, repeats: int = 3):
  """Seconds per step of `ctx`'s kind inside a `fori_loop` (as in the generation): (s, state).

  (t(1 + extra_steps) - t(1)) / extra_steps, each the median of `repeats` runs; the logits of
  every step feed a scalar in the carry, so no step's work is dropped.
  """

  def run(params, state, ctx, n):
    def body(_, carry):
      state, acc = carry
      logits, _, state = denoiser.window_logits(params, canvas, state, ctx)
      return state, acc + jnp.sum(logits[..., 0])
    return jax.lax.fori_loop(0, n, body, (state, jnp.float32(0)))

  loop = _jit_donating_state(run, denoiser, canvas)

  def timed(n):
    nonlocal state
    times = []
    for i in range(repeats + 1):
      t0 = time.perf_counter()
      state, acc = jax.block_until_ready(loop(params, state, ctx, jnp.int32(n)))
      if i:  # the first run compiles (or sees freshly committed buffers)
        times.append(time.perf_counter() - t0)
    del acc
    return statistics.median(times)

  t_lo = timed(1)
  t_hi = timed(1 + extra_steps)
  return max(t_hi - t_lo, 0.0) / extra_steps, state


def step_times(denoiser: Denoiser, params, canvas: Canvas, repeats: int = 5,
               entry_repeats: int | None = None, spread: bool = False,
               max_planned_unmask: int = 1) -> dict[str, float]:
  """{"refresh_s", "later_entry_s", "cached_step_s", "cached_step_call_s"} of this denoiser
  (and "cached_step_spread_s" if `spread`: see `spread_context`).

  later_entry_s is a later block's entry: a full refresh, or what the refresh economy makes of
  it (a response-only refresh, or a plain cached step). Entry steps are timed
  `entry_repeats` times (default max(3, repeats // 2)); at 128K one refresh takes seconds.
  cached_step_s is a cached step inside a loop (what the generation pays); cached_step_call_s
  the same step as a call of its own (dispatch included). `max_planned_unmask`: as in
  `entry_context`.
  """
  entry_repeats = entry_repeats or max(3, repeats // 2)
  b = canvas.tokens.shape[0]
  step = jitted_step(denoiser, canvas)
  params = denoiser.prepare_params(params)  # once, as a generation makes them
  state = denoiser.init_state(params, canvas)
  ctx = entry_context(canvas, b, max_planned_unmask)
  out = {}
  out["refresh_s"], state = median_step_seconds(step, params, state, ctx, entry_repeats)
  later = ctx.replace(block_index=jnp.int32(1),
                      block_start=jnp.int32(canvas.prompt_length + canvas.block_length))
  out["later_entry_s"], state = median_step_seconds(step, params, state, later, entry_repeats)
  cached = ctx.replace(block_entry=False)
  out["cached_step_call_s"], state = median_step_seconds(step, params, state, cached, repeats)
  out["cached_step_s"], state = in_loop_step_seconds(denoiser, params, canvas, state, cached)
  if spread:
    out["cached_step_spread_s"], state = in_loop_step_seconds(denoiser, params, canvas, state,
                                                              spread_context(cached))
  return out


def spread_context(ctx: StepContext) -> StepContext:
  """ctx with its highest past confidences 8 positions apart (entry_context's are the block's
  last ones): at block 32 with Focus's default rho and window (one token a step) 29 positions
  are active, against entry_context's 7; decoding runs about 16 a row (the demo model), and
  Dream's GQA attention costs more with more of them."""
  w = ctx.masked.shape[1]
  position = jnp.arange(w)
  confidence = jnp.where(position % 8 == 0, 1.0, 0.0) + position / (2.0 * w)
  return ctx.replace(prev_confidence=jnp.broadcast_to(confidence, ctx.prev_confidence.shape))
