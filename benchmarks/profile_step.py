"""Where a step's time goes: a device trace of a few steps, summed by kernel name.

    python benchmarks/profile_step.py --model=llada_8b --context=32768 --modes=focus,dual_cache
    python benchmarks/profile_step.py --phase=entry --steps=2 --modes=focus   # the refresh
    python benchmarks/profile_step.py --phase=spread --modes=focus   # 29 of 32 positions active

Writes a JSON of the top kernels per mode (total microseconds over the traced steps) and prints
a table, then the same time summed by the source line that emitted each kernel (read from the
compiled HLO's stack frames: the innermost frame inside this repository). Uses JAX's Perfetto
trace (no TensorBoard needed).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp

import focus_jax
from focus_jax import step_timing
from focus_jax.decoding import make_denoiser
from focus_jax.models.config import MATMUL_IMPLS
from focus_jax.pipeline import sampler_rule
from focus_jax.sampling import loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_attribution import by_source, dumped_kernels, dumped_sources, kernel_times  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llada_8b", "preset")
flags.DEFINE_integer("context", 32768, "prompt length")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_list("modes", ["focus", "dual_cache"], "modes (knobs as in e2e.py: mode+k=v)")
flags.DEFINE_integer("steps", 5, "traced steps")
flags.DEFINE_enum("phase", "cached", ["cached", "spread", "entry"],
                  "cached: a step inside a block (7 positions active, as e2e.py's "
                  "sparse_step_s); spread: one with 29 of 32 active (sparse_step_spread_s); "
                  "entry: the block-entry step (the refresh)")
flags.DEFINE_integer("top", 25, "kernels listed per mode")
flags.DEFINE_string("dump_dir", None, "keep XLA's dumped modules here (default: a temporary "
                    "folder)")
flags.DEFINE_string("out", "benchmarks/results/profile_step.json", "JSON output")
flags.DEFINE_enum("matmul_impl", "xla", list(MATMUL_IMPLS), "ModelConfig.matmul_impl")
flags.DEFINE_bool("fused_qkv", False, "ModelConfig.fused_qkv: one q|k|v weight per layer")


def main(argv):
  del argv
  # Before the backend starts: XLA writes each optimised module, whose names the trace uses.
  dump_dir = FLAGS.dump_dir or tempfile.mkdtemp()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text").strip()
  model = focus_jax.load(FLAGS.model, matmul_impl=FLAGS.matmul_impl, fused_qkv=FLAGS.fused_qkv)
  cfg, params = model.config, model.params
  prompt = jnp.zeros((FLAGS.batch, FLAGS.context), jnp.int32) + 7
  canvas = loop.make_canvas(prompt, None, 256, 32, cfg.mask_token_id)
  rule = sampler_rule(cfg, steps=256, gen_length=256, block_length=32)  # sizes Focus's relevance
  report = {}
  for spec in FLAGS.modes:
    mode, *extra = spec.split("+")
    options = dict(kv.split("=") for kv in extra)
    denoiser = make_denoiser(cfg, mode, **options)
    ctx = step_timing.entry_context(canvas, FLAGS.batch, rule.max_planned_unmask(32))
    step = step_timing.jitted_step(denoiser, canvas)
    params = denoiser.prepare_params(model.params)  # as a generation makes them
    _, state = step(params, denoiser.init_state(params, canvas), ctx)
    traced = ctx.replace(block_entry=FLAGS.phase == "entry")
    if FLAGS.phase == "spread":
      traced = step_timing.spread_context(traced)
    _, state = jax.block_until_ready(step(params, state, traced))
    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(FLAGS.steps):
      _, state = step(params, state, traced)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    counts = {}
    totals, (busy, span, launches) = kernel_times(trace_dir, counts)
    sources, kernels = dumped_sources(dump_dir), dumped_kernels(dump_dir)
    per_step = {k: v / FLAGS.steps for k, v in totals.items()}
    total = sum(per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:FLAGS.top]
    report[spec] = {"device_us_per_step": total, "distinct_kernels": len(per_step),
                    "launches_per_step": launches / FLAGS.steps,
                    "busy_us_per_step": busy / FLAGS.steps, "span_us_per_step": span / FLAGS.steps,
                    "top_us_per_step": top,
                    # [name, us per step, launches per step, its HLO: op, shapes, fused ops]
                    "top_kernels": [[name, us, counts[name] / FLAGS.steps,
                                     kernels.get(name) or kernels.get(name.split("__")[0], "")]
                                    for name, us in top],
                    "by_source_us_per_step": by_source(per_step, sources)[:FLAGS.top]}
    print(f"\n{spec}: {total / 1000:.2f} ms of kernels per step, {len(per_step)} distinct, "
          f"{launches / FLAGS.steps:.0f} launches; "
          f"device busy {busy / FLAGS.steps / 1000:.2f} ms of a {span / FLAGS.steps / 1000:.2f} ms "
          "span per step")
    for name, us, n, hlo in report[spec]["top_kernels"]:
      print(f"  {us:9.1f} us {n:5.1f}x  {name[:60]:60}  {hlo[:160]}")
    print("  by source line:")
    for where, us, n in report[spec]["by_source_us_per_step"]:
      print(f"  {us:9.1f} us  {n:3d} kernels  {where[:100]}")
    del state
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"gpu": jax.devices()[0].device_kind, "context": FLAGS.context,
               "batch": FLAGS.batch, "matmul_impl": FLAGS.matmul_impl,
               "fused_qkv": FLAGS.fused_qkv, "phase": FLAGS.phase, "modes": report},
              f, indent=1)


if __name__ == "__main__":
  app.run(main)
