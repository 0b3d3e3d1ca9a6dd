"""Where a step's time goes: a device trace of a few steps, summed by kernel name.

    python benchmarks/profile_step.py --model=llada_8b --context=32768 --modes=focus,dual_cache
    python benchmarks/profile_step.py --phase=entry --steps=2 --modes=focus   # the refresh

Writes a JSON of the top kernels per mode (total microseconds over the traced steps) and prints
a table. Uses JAX's Perfetto trace (no TensorBoard needed).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp

from focus_jax import presets, step_timing
from focus_jax.decoding import make_denoiser
from focus_jax.sampling import loop

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llada_8b", "preset")
flags.DEFINE_integer("context", 32768, "prompt length")
flags.DEFINE_list("modes", ["focus", "dual_cache"], "modes (knobs as in e2e.py: mode+k=v)")
flags.DEFINE_integer("steps", 5, "traced steps")
flags.DEFINE_enum("phase", "cached", ["cached", "entry"],
                  "cached: the steps inside a block; entry: the block-entry step (the refresh)")
flags.DEFINE_integer("top", 25, "kernels listed per mode")
flags.DEFINE_string("out", "benchmarks/results/profile_step.json", "JSON output")


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
  """(time the device ran anything, first start to last end) of [start, end) intervals, in us.

  span - busy is the device's idle time: launch gaps, and the host between traced steps."""
  if not intervals:
    return 0.0, 0.0
  busy, cur_start, cur_end = 0.0, None, None
  for start, end in sorted(intervals):
    if cur_end is None or start > cur_end:
      busy += 0.0 if cur_end is None else cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  busy += cur_end - cur_start
  return busy, max(e for _, e in intervals) - min(s for s, _ in intervals)


def kernel_times(trace_dir: str) -> tuple[dict[str, float], tuple[float, float, int]]:
  """Device event durations summed by name from the Perfetto JSON trace, and
  (busy, span, number of events)."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no Perfetto trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, name in pids.items() if "/device:" in name}
  if not device:  # CPU runs: host events (for checking this script without a GPU)
    device = set(pids)
  totals = collections.Counter()
  intervals = []
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device:
      totals[e["name"]] += float(e.get("dur", 0))
      intervals.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
  return dict(totals), (*busy_and_span(intervals), len(intervals))


def main(argv):
  del argv
  cfg = presets.preset(FLAGS.model)
  params = presets.random_params(cfg, 0)
  prompt = jnp.zeros((1, FLAGS.context), jnp.int32) + 7
  canvas = loop.make_canvas(prompt, None, 256, 32, cfg.mask_token_id)
  report = {}
  for spec in FLAGS.modes:
    mode, *extra = spec.split("+")
    options = dict(kv.split("=") for kv in extra)
    denoiser = make_denoiser(cfg, mode, **options)
    ctx = step_timing.entry_context(canvas, 1)
    step = step_timing.jitted_step(denoiser, canvas)
    _, state = step(params, denoiser.init_state(params, canvas), ctx)
    traced = ctx.replace(block_entry=FLAGS.phase == "entry")
    _, state = jax.block_until_ready(step(params, state, traced))
    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(FLAGS.steps):
      _, state = step(params, state, traced)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    totals, (busy, span, launches) = kernel_times(trace_dir)
    per_step = {k: v / FLAGS.steps for k, v in totals.items()}
    total = sum(per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:FLAGS.top]
    report[spec] = {"device_us_per_step": total, "distinct_kernels": len(per_step),
                    "launches_per_step": launches / FLAGS.steps,
                    "busy_us_per_step": busy / FLAGS.steps, "span_us_per_step": span / FLAGS.steps,
                    "top_us_per_step": top}
    print(f"\n{spec}: {total / 1000:.2f} ms of kernels per step, {len(per_step)} distinct, "
          f"{launches / FLAGS.steps:.0f} launches; "
          f"device busy {busy / FLAGS.steps / 1000:.2f} ms of a {span / FLAGS.steps / 1000:.2f} ms "
          "span per step")
    for name, us in top:
      print(f"  {us:9.1f} us  {name[:100]}")
    del state
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"gpu": jax.devices()[0].device_kind, "context": FLAGS.context,
               "phase": FLAGS.phase, "modes": report},
              f, indent=1)


if __name__ == "__main__":
  app.run(main)
