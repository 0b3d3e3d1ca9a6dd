"""Time single denoising steps alone: a block-entry step (refresh) and a cached step.

The jitted generation runs every step inside one `lax.while_loop`, where no host clock can see
them; here each kind of step is jitted by itself, with the denoiser state donated and threaded
through as the loop does, so the timings are those of the steps inside the loop. Used by the
Focus diagnostics of `main.py` (time in refresh vs sparse steps) and by the benchmarks.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from focus_jax.decoding.base import Canvas, Denoiser, StepContext


def entry_context(canvas: Canvas, batch: int) -> StepContext:
  """The entry step of the first block (all positions masked, confidences spread)."""
  w = canvas.block_length
  return StepContext(block_start=jnp.int32(canvas.prompt_length), block_index=jnp.int32(0),
                     masked=jnp.ones((batch, w), bool),
                     prev_confidence=jnp.broadcast_to(jnp.linspace(0.0, 1.0, w), (batch, w)),
                     planned_unmask=jnp.ones((batch,), jnp.int32), block_entry=True)


def jitted_step(denoiser: Denoiser, canvas: Canvas) -> Callable[..., Any]:
  """(params, state, ctx) -> (logits, state), state donated."""
  return jax.jit(lambda p, s, c: denoiser.window_logits(p, canvas, s, c)[::2],
                 donate_argnums=(1,))


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


def step_times(denoiser: Denoiser, params, canvas: Canvas, repeats: int = 5,
               entry_repeats: int | None = None) -> dict[str, float]:
  """{"refresh_s", "later_entry_s", "cached_step_s"} of this denoiser on this canvas.

  later_entry_s is a later block's entry: a full refresh, or what the refresh economy makes of
  it (a response-only refresh, or a plain cached step). Entry steps are timed
  `entry_repeats` times (default max(3, repeats // 2)); at 128K one refresh takes seconds.
  """
  entry_repeats = entry_repeats or max(3, repeats // 2)
  b = canvas.tokens.shape[0]
  step = jitted_step(denoiser, canvas)
  state = denoiser.init_state(params, canvas)
  ctx = entry_context(canvas, b)
  out = {}
  out["refresh_s"], state = median_step_seconds(step, params, state, ctx, entry_repeats)
  later = ctx.replace(block_index=jnp.int32(1),
                      block_start=jnp.int32(canvas.prompt_length + canvas.block_length))
  out["later_entry_s"], state = median_step_seconds(step, params, state, later, entry_repeats)
  out["cached_step_s"], state = median_step_seconds(step, params, state,
                                                    ctx.replace(block_entry=False), repeats)
  return out
