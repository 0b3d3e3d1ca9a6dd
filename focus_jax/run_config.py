"""Defaults shared by the `configs/*.py` files that `main.py` runs (ml_collections)."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from focus_jax.focus.config import FocusConfig


def llada_sampler() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "temperature": 0.0, "remasking": "low_confidence", "threshold": placeholder(float),
      "logits_eos_inf": False, "confidence_eos_eot_inf": False})


def dream_sampler() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "alg": "entropy", "eps": 1e-3, "temperature": 0.0, "top_p": placeholder(float),
      "top_k": placeholder(int), "alg_temp": placeholder(float), "threshold": placeholder(float)})


def decoding_knobs() -> ml_collections.ConfigDict:
  """Every mode's knobs with their defaults, so any can be overridden from the command line."""
  focus = {}
  for f in dataclasses.fields(FocusConfig):
    value = getattr(FocusConfig(), f.name)
    # dense_tail is left unset so make_denoiser applies the family's default (Dream: 4).
    unset = value is None or f.name == "dense_tail"
    focus[f.name] = placeholder(int) if unset else value
  economy = {"refresh_every_blocks": 1, "reuse_prompt_kv": False, "refresh_prompt_window": 0,
             "refresh_prompt_globals": 64, "refresh_prompt_keep": 0.0,
             "refresh_prompt_chunk": 1024, "refresh_prompt_block": 128,
             "refresh_fp8_attention": False,
             "refresh_fp8_matmul": False}
  focus.update(economy)
  cache = {"refresh_every_step": False, "split_kv_impl": "auto", **economy}
  return ml_collections.ConfigDict({
      "vanilla": {}, "prefix_cache": dict(cache), "dual_cache": dict(cache), "focus": focus})


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # A preset with random weights ("tiny", "llada_8b", "ultra_llada", "dream_7b") or the path of
  # a converted checkpoint / Hugging Face directory.
  c.model = "tiny"
  c.dtype = ml_collections.config_dict.placeholder(str)  # None: the preset's or checkpoint's
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": 1, "model": 1})
  # Several hosts (a TPU pod slice, GPU nodes): every process runs main.py with the same config
  # and `initialize` on; jax.distributed finds its peers on Cloud TPU, SLURM, Open MPI and
  # Kubernetes, elsewhere set the coordinator ("host:port"), the process count and this
  # process's id. The mesh then spans every device of every host (data x model = all).
  c.distributed = ml_collections.ConfigDict({
      "initialize": False, "coordinator_address": "", "num_processes": 0, "process_id": -1})

  c.prompts = ("Write one sentence about the sea.",)
  c.chat = True
  # Prompts are left-padded to a multiple of this (one compile serves similar lengths); 1: no
  # padding for a single prompt (fp8 attention refuses rows that are more than 1/32 pads).
  c.pad_to = 64
  # > 0: ignore `prompts` and use random token ids of this length (benchmarks; no tokenizer).
  c.synthetic_prompt_length = 0
  c.batch_size = 1  # rows of a synthetic or task prompt (text prompts: one row each)
  # A synthetic long-context task of the demo model ("passkey", "kv", "vt"; see
  # focus_jax.training.tasks): a prompt of `task_prompt_length` tokens is generated from `seed`
  # (and `task_depth`, the needle's relative position, if set) and the expected answer printed.
  c.task = ""
  c.task_prompt_length = 2016
  c.task_depth = placeholder(float)

  c.gen_length = 64
  c.steps = 64
  c.block_length = 32
  c.cfg_scale = 0.0
  # Decoding modes run one after the other on the same prompts, for comparison.
  c.modes = ("vanilla",)
  # Knobs of the family's sampler (LLaDA: temperature, remasking, threshold, logits_eos_inf,
  # confidence_eos_eot_inf; Dream: alg, temperature, top_p, top_k, alg_temp, threshold).
  c.sampler = llada_sampler()
  # Per-mode knobs, e.g. --config.decoding.focus.alpha=0.25.
  c.decoding = decoding_knobs()
  c.attention_impl = "auto"  # dense attention: "auto" (cuDNN on GPU), "xla", "cudnn"
  # A cached step's projections (ModelConfig.matmul_impl): None keeps the model's ("xla");
  # "auto" streams the SwiGLU through a Pallas kernel on one Hopper GPU (faster for LLaDA-8B's shape,
  # slower for Dream-7B's: README), "xla", "pallas_gpu_mlp", "pallas_gpu".
  c.matmul_impl = placeholder(str)
  # True: one q|k|v weight per layer (ModelConfig.fused_qkv; fused at load). None: the model's.
  c.fused_qkv = placeholder(bool)
  c.repeats = 1  # timed runs per mode after compilation (median reported)
  # With Focus's diagnostics on: also time a refresh and a cached step on their own, to split the
  # run's seconds between them (their own compiles: seconds on a CPU).
  c.time_split = True
  return c
