"""End-to-end decoding speed on the real 8B / 7B shapes (random bf16 weights made on the GPU).

For every (context, mode): compile time, tokens/s of the whole jitted generation (median of
`--repeats` runs), refresh-step and sparse-step times measured alone, peak device memory, and
each time against its floor (../shared/design/performance.md): a refresh against its FLOPs at
the measured matmul rate, a cached step against the bytes it must read at the measured copy
bandwidth. Vanilla (a full forward every step) is timed per step and extrapolated: running 256
full forwards at 32K would cost minutes of device time and measure nothing new. Peak memory
is the process's running peak (JAX cannot reset it), so run the largest configuration of a
context first when its peak matters. `--compile_only` instead compiles each generation on
abstract weights (nothing allocated, nothing run) and records XLA's own memory plan of it: a
quick check of what a configuration will hold, e.g. after a change to the refresh.

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
from focus_jax.focus import FocusConfig, pruning
from focus_jax.kernels.sparse_attention import resolve_implementation
from focus_jax.models import param_map
from focus_jax.models.config import MATMUL_IMPLS
from focus_jax.models.transformer import compiler_options
from focus_jax.sampling import compile_generation, loop
from focus_jax.pipeline import check_fp8_pads, sampler_rule

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llada_8b", "preset: llada_8b, ultra_llada, dream_7b")
flags.DEFINE_list("contexts", ["8192", "32768"], "prompt lengths")
flags.DEFINE_list("modes", ["dual_cache", "focus"],
                  "decoding modes (vanilla: per step); a mode may carry knobs: "
                  "focus+reuse_prompt_kv=true+refresh_every_blocks=2, and per-variant schedule "
                  "knobs block=, batch=, threshold=, matmul= (else --block, --batch, "
                  "--threshold, --matmul_impl)")
flags.DEFINE_integer("gen", 256, "generation length")
flags.DEFINE_integer("steps", 256, "denoising steps")
flags.DEFINE_integer("block", 32, "block length")
flags.DEFINE_integer("pad", 0, "left pad tokens of the batch's last row (row r gets pad * (r + "
                     "1) // batch): a padded batch, its masks and the kernels' pad paths")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_float("threshold", 0.0, "> 0: threshold parallel decoding")
flags.DEFINE_enum("matmul_impl", "xla", list(MATMUL_IMPLS),
                  "ModelConfig.matmul_impl: how the projections' matmuls run")
flags.DEFINE_bool("fused_qkv", False, "ModelConfig.fused_qkv (one q|k|v weight per layer); "
                  "a mode's knob fused_qkv=1 or 0 overrides it")
flags.DEFINE_integer("repeats", 2, "timed generations per configuration")
flags.DEFINE_integer("generate_up_to", 1 << 30, "contexts up to this time the whole jitted "
                     "generation; longer ones (64K, 128K: minutes per generation) take tokens/s "
                     "from the timed steps (first refresh + later entries + cached steps) and say "
                     "so; threshold decoding always generates (its step count is data-dependent)")
flags.DEFINE_integer("entry_repeats", 3, "timed repeats of a block-entry step")
flags.DEFINE_string("focus", "", "Focus knobs, e.g. alpha=0.5,l_dense=6")
flags.DEFINE_bool("compile_only", False, "compile each generation on abstract weights and record "
                  "XLA's memory plan (temporaries, arguments) instead of timing it")
flags.DEFINE_string("out", "benchmarks/results/e2e.json", "JSON output (read by plot_e2e.py)")
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


def split_kv_impl(cfg, mode: str, batch: int, block: int, length: int, options: dict) -> dict:
  """The split-KV kernels "auto" resolves to for this run's cached steps ("auto" depends on the
  GPU and the rows a kv head carries): Focus's slots (one a block position) and the dual
  cache's rows (Dream: the row before the block too). Recorded so each row names its kernels."""
  if mode not in ("focus", "dual_cache"):
    return {}
  rows = block + (1 if mode == "dual_cache" and cfg.logit_shift else 0)
  q = (batch, rows, cfg.n_heads, cfg.head_dim)
  k = (batch, length, cfg.n_kv_heads, cfg.head_dim)
  chosen = options.get("sparse_impl" if mode == "focus" else "split_kv_impl", "auto")
  dense = resolve_implementation(chosen, q, k, cfg.jnp_dtype, kv.DECODE_BLOCK)
  if mode == "dual_cache":
    return {"dense": dense}
  block_size = options.get("prompt_block_size", FocusConfig().prompt_block_size)
  return {"dense": dense, "sparse": resolve_implementation(chosen, q, k, cfg.jnp_dtype,
                                                           block_size)}


def flops_forward(cfg, tokens: int, context: int) -> float:
  """2 x params x tokens + attention (QK and PV over the whole context), batch of 1."""
  layer_params = cfg.num_params() - 2 * cfg.vocab_size * cfg.d_model
  attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * tokens * context
  return 2 * layer_params * tokens + attn


def weight_params(cfg) -> int:
  """Parameters a cached step reads: all but the input embedding (a lookup, not read whole)."""
  return cfg.num_params() - cfg.vocab_size * cfg.d_model


def step_bytes(cfg, context: int, denoiser, batch: int = 1) -> float:
  """Bytes a cached step must read: the layer weights, the LM head (once for the batch), and
  every row's KV it attends (Focus: dense layers whole, sparse layers alpha of it, from the
  denoiser's own knobs)."""
  width = jnp.dtype(cfg.jnp_dtype).itemsize
  weights = width * weight_params(cfg)
  kv_per_token_layer = 2 * cfg.n_kv_heads * cfg.head_dim * width
  focus = getattr(denoiser, "focus", None)
  if focus is None:
    return weights + batch * kv_per_token_layer * context * cfg.n_layers
  dense = sum(focus.is_dense(l, cfg.n_layers) for l in range(cfg.n_layers))
  return weights + batch * kv_per_token_layer * context * (
      dense + focus.alpha * (cfg.n_layers - dense))


def step_weight_flops(cfg, rows: int) -> float:
  """FLOPs of `rows` query slots through the layer weights and the LM head (a cached step's
  GEMMs): 2 per weight per row."""
  return 2.0 * rows * weight_params(cfg)


def time_generation(params, prompt, prompt_mask, cfg, rule, denoiser, block: int) -> dict:
  """Compile time and the median wall time of the whole jitted generation."""
  args = (params, prompt, prompt_mask, jax.random.key(0))
  kwargs = dict(config=cfg, rule=rule, denoiser=denoiser, gen_length=FLAGS.gen,
                block_length=block)
  t0 = time.perf_counter()
  compiled = compile_generation(*args, **kwargs)
  out = {"compile_s": time.perf_counter() - t0}
  runs = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - t0)
  out["seconds"] = statistics.median(runs)
  out["num_steps"] = int(result.num_steps)
  return out


def compiled_memory(params, prompt, prompt_mask, cfg, rule, denoiser, block: int) -> dict:
  """XLA's memory plan of the whole generation, compiled and not run (`--compile_only`): the
  temporaries it needs besides its arguments (the weights) and its outputs."""
  t0 = time.perf_counter()
  compiled = compile_generation(params, prompt, prompt_mask, jax.random.key(0), config=cfg,
                                rule=rule, denoiser=denoiser, gen_length=FLAGS.gen,
                                block_length=block)
  out = {"compile_s": time.perf_counter() - t0}
  plan = compiled.memory_analysis()
  if plan is not None:  # (None where the backend keeps no plan)
    out.update(xla_temp_gib=plan.temp_size_in_bytes / memory.GIB,
               xla_argument_gib=plan.argument_size_in_bytes / memory.GIB,
               xla_output_gib=plan.output_size_in_bytes / memory.GIB)
  return out


def save(results):
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


def main(argv):
  del argv
  base_cfg = presets.preset(FLAGS.model)
  device = jax.devices()[0]
  gpu = getattr(device, "device_kind", str(device))
  copy_tbps = FLAGS.copy_tbps or (4.3 if "H200" in gpu else 2.88)
  focus_knobs = parse_knobs(FLAGS.focus)
  t0 = time.perf_counter()
  if FLAGS.compile_only:  # shapes only: nothing is allocated
    params = jax.eval_shape(lambda: presets.random_params(base_cfg, 0))
  else:
    params = presets.random_params(base_cfg, 0)
    jax.block_until_ready(params)
  by_layout = {False: params}  # fused_qkv -> params in that layout (built from the same weights)
  print(f"{gpu}: {FLAGS.model} random params in {time.perf_counter() - t0:.1f}s", flush=True)
  results = []
  for context in map(int, FLAGS.contexts):
    for spec in FLAGS.modes:
      mode, *extra = spec.split("+")
      options = dict(focus_knobs) if mode == "focus" else {}
      options.update(parse_knobs(",".join(extra)))
      # Schedule knobs of this variant (the rest go to the denoiser).
      block = int(options.pop("block", FLAGS.block))
      batch = int(options.pop("batch", FLAGS.batch))
      threshold = float(options.pop("threshold", FLAGS.threshold))
      cfg = base_cfg.replace(matmul_impl=options.pop("matmul", FLAGS.matmul_impl),
                             fused_qkv=bool(options.pop("fused_qkv", FLAGS.fused_qkv)))
      if cfg.fused_qkv not in by_layout:
        fuse = lambda p, cfg=cfg: param_map.fuse_qkv(cfg, p)
        by_layout[cfg.fused_qkv] = (jax.eval_shape(fuse, by_layout[False]) if FLAGS.compile_only
                                    else fuse(by_layout[False]))
      params = by_layout[cfg.fused_qkv]
      generate = context <= FLAGS.generate_up_to or bool(threshold)
      blocks = FLAGS.gen // block
      row = dict(model=FLAGS.model, gpu=gpu, jax=jax.__version__, context=context,
                 gen=FLAGS.gen, steps=FLAGS.steps, block=block, batch=batch,
                 mode=mode, variant=spec, threshold=threshold or None,
                 matmul_impl=cfg.matmul_impl, fused_qkv=cfg.fused_qkv,
                 focus=focus_knobs if mode == "focus" else None, repeats=FLAGS.repeats,
                 xla_flags=os.environ.get("XLA_FLAGS") or None,
                 compiler_options=compiler_options(cfg, batch) or None)
      rng = np.random.default_rng([context, batch])
      prompt = jnp.asarray(rng.integers(0, 100000, size=(batch, context)), jnp.int32)
      prompt_mask = None  # unpadded: no mask, as pipeline.generate_ids passes it
      if FLAGS.pad:
        if not 0 < FLAGS.pad < context:
          raise ValueError(f"--pad={FLAGS.pad}: give 0 < pad < the context ({context})")
        pads = FLAGS.pad * (np.arange(batch) + 1) // batch
        prompt_mask = jnp.asarray(np.arange(context)[None] >= pads[:, None])
        if options.get("refresh_fp8_attention"):  # as generate refuses it
          check_fp8_pads(np.asarray(prompt_mask), FLAGS.gen)
      row["pad"] = FLAGS.pad
      row["split_kv_impl"] = split_kv_impl(cfg, mode, batch, block, context + FLAGS.gen,
                                           options)
      canvas = loop.make_canvas(prompt, prompt_mask, FLAGS.gen, block, cfg.mask_token_id)
      denoiser = make_denoiser(cfg, mode, **options)
      sampler = {"threshold": threshold} if threshold else {}
      if cfg.family == "dream":
        sampler["alg"] = "maskgit_plus" if threshold else "entropy"
      rule = sampler_rule(cfg, steps=FLAGS.steps, gen_length=FLAGS.gen, block_length=block,
                          **sampler)
      try:
        row["memory_estimate_gib"] = memory.check_fits(
            cfg, batch, context + FLAGS.gen, mode, denoiser=denoiser,
            prompt_length=context, padded=bool(FLAGS.pad)).total / memory.GIB
        if FLAGS.compile_only:
          row.update(compiled_memory(params, prompt, prompt_mask, cfg, rule, denoiser, block))
          results.append(row)
          print(json.dumps(row), flush=True)
          save(results)
          continue
        if mode == "vanilla":
          step = step_timing.jitted_step(denoiser, canvas)
          row["step_s"], _ = step_timing.median_step_seconds(
              step, params, denoiser.init_state(params, canvas),
              step_timing.entry_context(canvas, batch), repeats=3)
          row["seconds"] = row["step_s"] * FLAGS.steps
          row["extrapolated_from_one_step"] = True
        else:
          # Focus also times a step whose focus positions are spread over the block (29 of 32
          # positions active at block 32 with the default rho and window, against 7).
          times = step_timing.step_times(denoiser, params, canvas, repeats=10,
                                         entry_repeats=FLAGS.entry_repeats,
                                         spread=mode == "focus",
                                         max_planned_unmask=rule.max_planned_unmask(block))
          row["refresh_s"] = times["refresh_s"]
          row["later_entry_s"] = times["later_entry_s"]
          row["sparse_step_s"] = times["cached_step_s"]  # inside a loop, as generated
          row["sparse_step_call_s"] = times["cached_step_call_s"]
          if "cached_step_spread_s" in times:
            row["sparse_step_spread_s"] = times["cached_step_spread_s"]
          if generate:
            row.update(time_generation(params, prompt, prompt_mask, cfg, rule, denoiser, block))
          else:
            entries = row["refresh_s"] + (blocks - 1) * row["later_entry_s"]
            row["seconds"] = entries + (FLAGS.steps - blocks) * row["sparse_step_s"]
            row["extrapolated_from_steps"] = True
            if "sparse_step_spread_s" in row:  # every sparse step a spread one
              row["tokens_per_s_spread"] = batch * FLAGS.gen / (
                  entries + (FLAGS.steps - blocks) * row["sparse_step_spread_s"])
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        print(row["error"], flush=True)
        results.append(row)
        save(results)
        continue
      row["tokens_per_s"] = batch * FLAGS.gen / row["seconds"]
      stats = device.memory_stats() or {}
      row["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
      full = flops_forward(cfg, context + FLAGS.gen, context + FLAGS.gen) * batch
      refresh_floor = full / (FLAGS.matmul_tflops * 1e12)
      sparse_floor = step_bytes(cfg, context + FLAGS.gen, denoiser, batch) / (copy_tbps * 1e12)
      row["refresh_floor_s"] = refresh_floor
      row["sparse_step_floor_s"] = sparse_floor
      # A roofline per part: the GEMMs are bound by the weights' bytes or by their FLOPs (every
      # query slot, block length per row, runs through the weights; at batch 8 the FLOPs win),
      # the attention by its KV bytes.
      weights_s = jnp.dtype(cfg.jnp_dtype).itemsize * weight_params(cfg) / (copy_tbps * 1e12)
      gemm_s = max(weights_s, step_weight_flops(cfg, batch * block) / (FLAGS.matmul_tflops * 1e12))
      row["sparse_step_roofline_s"] = gemm_s + (sparse_floor - weights_s)
      if "refresh_s" in row:
        row["refresh_vs_floor"] = row["refresh_s"] / refresh_floor
        row["sparse_step_vs_floor"] = row["sparse_step_s"] / sparse_floor
        row["sparse_step_vs_roofline"] = row["sparse_step_s"] / row["sparse_step_roofline_s"]
        if "sparse_step_spread_s" in row:
          row["sparse_step_spread_vs_floor"] = row["sparse_step_spread_s"] / sparse_floor
      else:
        row["step_vs_floor"] = row["step_s"] / refresh_floor
      steps_run = row.get("num_steps", FLAGS.steps)  # fewer under threshold decoding
      floor_total = (steps_run * refresh_floor if mode == "vanilla" else
                     blocks * refresh_floor + (steps_run - blocks) * sparse_floor)
      row["floor_tokens_per_s"] = batch * FLAGS.gen / floor_total
      row["vs_floor"] = row["seconds"] / floor_total
      results.append(row)
      print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in row.items()}), flush=True)
      save(results)  # after every row: a run cut short keeps what it measured
  if not FLAGS.compile_only:
    print("\ncontext variant                       tok/s  compile_s  refresh_s  sparse_ms  "
          "spread_ms  floor_tok/s  peak_GiB")
  for r in results:
    if "error" in r:
      print(f"{r['context']:7d} {r['variant']:<28} ERROR {r['error'][:80]}")
      continue
    if FLAGS.compile_only:
      print(f"{r['context']:7d} {r['variant']:<28} compiled in {r['compile_s']:.1f} s: "
            f"temporaries {r.get('xla_temp_gib', float('nan')):.2f} GiB, arguments "
            f"{r.get('xla_argument_gib', float('nan')):.2f} GiB (estimate "
            f"{r['memory_estimate_gib']:.1f} GiB in all)")
      continue
    print(f"{r['context']:7d} {r['variant']:<28} {r['tokens_per_s']:6.2f} "
          f"{r.get('compile_s', float('nan')):9.1f} {r.get('refresh_s', r.get('step_s')):10.3f} "
          f"{1000 * r.get('sparse_step_s', float('nan')):10.2f} "
          f"{1000 * r.get('sparse_step_spread_s', float('nan')):10.2f} {r['floor_tokens_per_s']:11.2f} "
          f"{r['peak_memory_gib']:9.1f}")


if __name__ == "__main__":
  app.run(main)
