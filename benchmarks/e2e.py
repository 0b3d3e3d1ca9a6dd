"""End-to-end decoding speed on the real 8B / 7B shapes (random bf16 weights made on the GPU).

For every (context, mode): compile time, tokens/s of the whole jitted generation (median of
`--repeats` runs), refresh-step and sparse-step times measured alone, peak device memory, and
each time against its floor (../shared/design/performance.md): a refresh against its FLOPs at
the measured matmul rate, a cached step against the bytes it must read at the measured copy
bandwidth. Vanilla (a full forward every step) is timed per step and extrapolated: running 256
full forwards at 32K would cost minutes of device time and measure nothing new.

    python benchmarks/e2e.py --model=llada_8b --contexts=8192,32768 --modes=dual_cache,focus
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from focus_jax import memory, presets, step_timing
from focus_jax.decoding import make_denoiser
from focus_jax.decoding import cache as kv
from focus_jax.focus import pruning
from focus_jax.sampling import generate_tokens, loop
from focus_jax.pipeline import sampler_rule

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llada_8b", "preset: llada_8b, ultra_llada, dream_7b")
flags.DEFINE_list("contexts", ["8192", "32768"], "prompt lengths")
flags.DEFINE_list("modes", ["dual_cache", "focus"],
                  "decoding modes (vanilla: per step); a mode may carry knobs: "
                  "focus+reuse_prompt_kv=true+refresh_every_blocks=2")
flags.DEFINE_integer("gen", 256, "generation length")
flags.DEFINE_integer("steps", 256, "denoising steps")
flags.DEFINE_integer("block", 32, "block length")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_float("threshold", 0.0, "> 0: threshold parallel decoding")
flags.DEFINE_integer("repeats", 2, "timed generations per configuration")
flags.DEFINE_string("focus", "", "Focus knobs, e.g. alpha=0.5,l_dense=6")
flags.DEFINE_string("out", "benchmarks/results/e2e.json", "JSON output")
flags.DEFINE_float("matmul_tflops", 797.0, "measured bf16 matmul ceiling (H100/H200 alike)")
flags.DEFINE_float("copy_tbps", 0.0, "measured copy bandwidth; 0: by GPU name (2.88 H100, 4.3 H200)")


def parse_knobs(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(",")):
    key, value = item.split("=")
    for cast in (int, float):
      try:
        out[key] = cast(value)
        break
      except ValueError:
        continue
    else:
      out[key] = {"true": True, "false": False}.get(value.lower(), value)
  return out


def flops_forward(cfg, tokens: int, context: int) -> float:
  """2 x params x tokens + attention (QK and PV over the whole context), batch of 1."""
  layer_params = cfg.num_params() - 2 * cfg.vocab_size * cfg.d_model
  attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * tokens * context
  return 2 * layer_params * tokens + attn


def step_bytes(cfg, context: int, denoiser) -> float:
  """Bytes a cached step must read: the layer weights, the LM head, and the KV it attends
  (Focus: dense layers whole, sparse layers alpha of it, from the denoiser's own knobs)."""
  width = jnp.dtype(cfg.jnp_dtype).itemsize
  weights = width * (cfg.num_params() - cfg.vocab_size * cfg.d_model)  # embedding not read
  kv_per_token_layer = 2 * cfg.n_kv_heads * cfg.head_dim * width
  focus = getattr(denoiser, "focus", None)
  if focus is None:
    return weights + kv_per_token_layer * context * cfg.n_layers
  dense = sum(focus.is_dense(l, cfg.n_layers) for l in range(cfg.n_layers))
  return weights + kv_per_token_layer * context * (dense + focus.alpha * (cfg.n_layers - dense))


def save(results):
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


def main(argv):
  del argv
  cfg = presets.preset(FLAGS.model)
  device = jax.devices()[0]
  gpu = getattr(device, "device_kind", str(device))
  copy_tbps = FLAGS.copy_tbps or (4.3 if "H200" in gpu else 2.88)
  focus_knobs = parse_knobs(FLAGS.focus)
  t0 = time.perf_counter()
  params = presets.random_params(cfg, 0)
  jax.block_until_ready(params)
  print(f"{gpu}: {FLAGS.model} random params in {time.perf_counter() - t0:.1f}s", flush=True)
  results = []
  rng = np.random.default_rng(0)
  for context in map(int, FLAGS.contexts):
    prompt = jnp.asarray(rng.integers(0, 100000, size=(FLAGS.batch, context)), jnp.int32)
    prompt_mask = None  # unpadded: no mask, as pipeline.generate_ids passes it
    canvas = loop.make_canvas(prompt, prompt_mask, FLAGS.gen, FLAGS.block, cfg.mask_token_id)
    for spec in FLAGS.modes:
      mode, *extra = spec.split("+")
      row = dict(model=FLAGS.model, gpu=gpu, jax=jax.__version__, context=context,
                 gen=FLAGS.gen, steps=FLAGS.steps, block=FLAGS.block, batch=FLAGS.batch,
                 mode=mode, variant=spec, threshold=FLAGS.threshold or None,
                 focus=focus_knobs if mode == "focus" else None)
      options = dict(focus_knobs) if mode == "focus" else {}
      options.update(parse_knobs(",".join(extra)))
      denoiser = make_denoiser(cfg, mode, **options)
      sampler = {"threshold": FLAGS.threshold} if FLAGS.threshold else {}
      if cfg.family == "dream":
        sampler["alg"] = "maskgit_plus" if FLAGS.threshold else "entropy"
      rule = sampler_rule(cfg, steps=FLAGS.steps, gen_length=FLAGS.gen,
                          block_length=FLAGS.block, **sampler)
      try:
        row["memory_estimate_gib"] = memory.check_fits(
            cfg, FLAGS.batch, context + FLAGS.gen, mode).total / memory.GIB
        if mode == "vanilla":
          step = step_timing.jitted_step(denoiser, canvas)
          row["step_s"], _ = step_timing.median_step_seconds(
              step, params, denoiser.init_state(params, canvas),
              step_timing.entry_context(canvas, FLAGS.batch), repeats=3)
          row["seconds"] = row["step_s"] * FLAGS.steps
          row["extrapolated_from_one_step"] = True
        else:
          times = step_timing.step_times(denoiser, params, canvas, repeats=10)
          row["refresh_s"] = times["refresh_s"]
          row["later_entry_s"] = times["later_entry_s"]
          row["sparse_step_s"] = times["cached_step_s"]
          args = (params, prompt, prompt_mask, jax.random.key(0))
          kwargs = dict(config=cfg, rule=rule, denoiser=denoiser, gen_length=FLAGS.gen,
                        block_length=FLAGS.block)
          t0 = time.perf_counter()
          compiled = generate_tokens.lower(*args, **kwargs).compile()
          row["compile_s"] = time.perf_counter() - t0
          runs = []
          for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            runs.append(time.perf_counter() - t0)
          row["seconds"] = statistics.median(runs)
          row["num_steps"] = int(out.num_steps)
          del out, compiled
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        print(row["error"], flush=True)
        results.append(row)
        save(results)
        continue
      row["tokens_per_s"] = FLAGS.batch * FLAGS.gen / row["seconds"]
      stats = device.memory_stats() or {}
      row["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
      full = flops_forward(cfg, context + FLAGS.gen, context + FLAGS.gen) * FLAGS.batch
      refresh_floor = full / (FLAGS.matmul_tflops * 1e12)
      sparse_floor = step_bytes(cfg, context + FLAGS.gen, denoiser) / (copy_tbps * 1e12)
      row["refresh_floor_s"] = refresh_floor
      row["sparse_step_floor_s"] = sparse_floor
      if "refresh_s" in row:
        row["refresh_vs_floor"] = row["refresh_s"] / refresh_floor
        row["sparse_step_vs_floor"] = row["sparse_step_s"] / sparse_floor
      else:
        row["step_vs_floor"] = row["step_s"] / refresh_floor
      blocks = FLAGS.gen // FLAGS.block
      floor_total = (FLAGS.steps * refresh_floor if mode == "vanilla" else
                     blocks * refresh_floor + (FLAGS.steps - blocks) * sparse_floor)
      row["floor_tokens_per_s"] = FLAGS.batch * FLAGS.gen / floor_total
      row["vs_floor"] = row["seconds"] / floor_total
      results.append(row)
      print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in row.items()}), flush=True)
      save(results)  # after every row: a run cut short keeps what it measured
  print("\ncontext variant                       tok/s  compile_s  refresh_s  sparse_ms  floor_tok/s  peak_GiB")
  for r in results:
    if "error" in r:
      print(f"{r['context']:7d} {r['variant']:<28} ERROR {r['error'][:80]}")
      continue
    print(f"{r['context']:7d} {r['variant']:<28} {r['tokens_per_s']:6.2f} "
          f"{r.get('compile_s', float('nan')):9.1f} {r.get('refresh_s', r.get('step_s')):10.3f} "
          f"{1000 * r.get('sparse_step_s', float('nan')):10.2f} {r['floor_tokens_per_s']:11.2f} "
          f"{r['peak_memory_gib']:9.1f}")


if __name__ == "__main__":
  app.run(main)
