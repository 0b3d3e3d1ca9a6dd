"""Run a dLLM with focus-jax: `python main.py [--config=configs/demo.py] [--config.field=value]`.

Loads the model named by the config, generates for its prompts with each decoding mode in
`config.modes`, and prints the texts and timings (compile, run, per step, tokens/s).
"""

from __future__ import annotations

import os
import statistics

from absl import app
import jax
from ml_collections import config_flags
import numpy as np

import focus_jax
from focus_jax import pipeline, sharding

# The default runs the demo dLLM trained here (demo_model/) on a freshly generated long-context
# question, dense and Focus side by side; configs/tiny.py is a random tiny model.
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py"),
    "Run configuration.")


def _say(*args) -> None:
  """print, by the first process only (on several hosts each runs this same program)."""
  if jax.process_index() == 0:
    print(*args)


def _start_distributed(cfg) -> None:
  d = cfg.distributed
  if not d.initialize:
    return
  jax.distributed.initialize(
      coordinator_address=d.coordinator_address or None,
      num_processes=d.num_processes if d.num_processes > 0 else None,
      process_id=d.process_id if d.process_id >= 0 else None)


def _task_prompt(cfg, model: pipeline.Model):
  """A freshly generated task prompt, its padding mask and the expected answer ids."""
  from focus_jax.training import tasks  # pylint: disable=g-import-not-at-top
  ex = tasks.make_example(cfg.task, cfg.seed, cfg.task_prompt_length, cfg.task_depth)
  if model.tokenizer is not None:  # the text goes through the model's own tokenizer
    ids = model.tokenizer(ex.prompt_text, add_special_tokens=False)["input_ids"]
    if list(ids) != ex.prompt.tolist():
      raise ValueError(f"{model.name}: its tokenizer does not match the task vocabulary; "
                       "--config.task needs the demo model (demo_model/)")
  words = ex.prompt_text.split()
  _say(f"task {cfg.task!r}, {len(words)} prompt tokens, needle depth {ex.depth:.2f}:\n  "
        f"{' '.join(words[:24])} ... {' '.join(words[-16:])}\nexpected answer: {ex.answer_text}")
  prompt, mask = pipeline.pad_for_model(model, [ex.prompt.tolist()] * cfg.batch_size,
                                        cfg.pad_to, cfg.gen_length)
  return prompt, mask, ex


def _prompt_ids(cfg, model: pipeline.Model):
  if cfg.synthetic_prompt_length > 0:
    rng = np.random.default_rng(cfg.seed)
    special = {model.config.mask_token_id, model.config.eos_token_id}
    ids = rng.integers(0, min(model.config.vocab_size, 100000),
                       size=(cfg.batch_size, cfg.synthetic_prompt_length))
    ids = np.where(np.isin(ids, list(special)), 0, ids).astype(np.int32)
    return ids, np.ones_like(ids, dtype=bool)
  if model.tokenizer is None:
    raise ValueError(f"{model.name} has no tokenizer: set --config.synthetic_prompt_length")
  from focus_jax import tokenizer as tokenization  # pylint: disable=g-import-not-at-top
  ids = tokenization.encode_prompts(model.tokenizer, list(cfg.prompts), model.config.family,
                                    chat=cfg.chat)
  return pipeline.pad_for_model(model, ids, cfg.pad_to, cfg.gen_length)


def _check_before_loading(cfg) -> None:
  """What can be refused without the model, before its weights are read."""
  from focus_jax.decoding import MODES, make_denoiser  # pylint: disable=g-import-not-at-top
  unknown = [mode for mode in cfg.modes if mode not in MODES]
  if unknown:
    raise ValueError(f"--config.modes: unknown decoding mode {', '.join(map(repr, unknown))}; "
                     f"choose from {MODES}")
  # The schedule, sampler settings of the model's family (a Dream checkpoint under a LLaDA
  # config file) and every mode's knobs, from the model's config alone: a bad Focus knob is not
  # found after the weights are read and the modes before it have run.
  config = pipeline.model_config(cfg.model)
  pipeline.sampler_rule(config, steps=cfg.steps or cfg.gen_length,
                        gen_length=cfg.gen_length, block_length=cfg.block_length,
                        **{k: v for k, v in cfg.sampler.items() if v is not None})
  for mode in cfg.modes:
    make_denoiser(config, mode, **_mode_options(cfg, mode))


def _mode_options(cfg, mode: str) -> dict:
  options = {k: v for k, v in cfg.decoding.get(mode, {}).items() if v is not None}
  options["attention_impl"] = cfg.attention_impl
  return options


def main(argv):
  del argv
  cfg = _CONFIG.value
  _start_distributed(cfg)  # (before JAX touches a device)
  _check_before_loading(cfg)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
  model = focus_jax.load(cfg.model, dtype=cfg.dtype, seed=cfg.seed, mesh=mesh,
                         matmul_impl=cfg.matmul_impl, fused_qkv=cfg.fused_qkv)
  example = None
  if cfg.task:
    prompt, mask, example = _task_prompt(cfg, model)
  else:
    prompt, mask = _prompt_ids(cfg, model)
  _say(f"model: {model.name} ({model.config.num_params() / 1e6:.1f}M parameters, "
        f"{model.config.dtype}); prompt {prompt.shape[0]} x {prompt.shape[1]} tokens; "
        f"gen {cfg.gen_length}, steps {cfg.steps}, block {cfg.block_length}")
  rows = []
  for mode in cfg.modes:
    options = _mode_options(cfg, mode)
    runs = [pipeline.generate_ids(model, prompt, mask, mode=mode, gen_length=cfg.gen_length,
                                  steps=cfg.steps, block_length=cfg.block_length,
                                  cfg_scale=cfg.cfg_scale, seed=cfg.seed,
                                  decoding_options=options, time_split=cfg.time_split,
                                  **{k: v for k, v in cfg.sampler.items() if v is not None})
            for _ in range(max(1, cfg.repeats))]
    result = runs[0]
    seconds = statistics.median(r.seconds for r in runs)
    _say(f"\n=== {mode} ===")
    if model.tokenizer is not None:
      for text in pipeline.decode_rows(model, result.tokens):
        _say(repr(text))
    else:
      _say("generated ids (row 0):", result.tokens[0][:32].tolist(), "...")
    correct = None
    if example is not None:
      from focus_jax.training import tasks  # pylint: disable=g-import-not-at-top
      correct = all(tasks.exact_match(row, example.answer) for row in result.tokens)
      _say(f"  correct: {'yes' if correct else 'NO'} (expected {example.answer_text!r})")
    for key, value in result.stats.items():
      _say(f"  {key}: {np.round(np.asarray(value), 3).tolist()}")
    rows.append((mode, result.compile_seconds, seconds, result.num_steps,
                 1000 * seconds / max(result.num_steps, 1),
                 prompt.shape[0] * cfg.gen_length / seconds, correct))
  _say("\nmode            compile_s    run_s   steps   ms/step    tokens/s" +
        ("  correct" if example is not None else ""))
  for mode, compile_s, run_s, steps, ms, tps, ok in rows:
    _say(f"{mode:<14} {compile_s:9.2f} {run_s:8.3f} {steps:7d} {ms:9.2f} {tps:11.2f}" +
          ("" if ok is None else f"  {'yes' if ok else 'NO'}"))


if __name__ == "__main__":
  app.run(main)
