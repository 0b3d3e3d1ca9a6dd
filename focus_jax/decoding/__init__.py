"""Decoding modes: how each denoising step computes its logits (vanilla, caches, Focus)."""

from __future__ import annotations

from typing import Any

from focus_jax.decoding.base import Canvas, Denoiser, StepContext
from focus_jax.decoding.cache import RefreshPolicy
from focus_jax.decoding.fast_dllm import DualCacheDenoiser, PrefixCacheDenoiser
from focus_jax.decoding.vanilla import VanillaDenoiser
from focus_jax.models.config import ModelConfig

MODES = ("vanilla", "prefix_cache", "dual_cache", "focus")
# Dream-7B keeps its final layers dense under Focus (as reported for it).
DREAM_DENSE_TAIL = 4


def make_denoiser(config: ModelConfig, mode: str = "vanilla", **options: Any) -> Denoiser:
  """The denoiser of a decoding mode; `options` are that mode's knobs (Focus: FocusConfig's
  fields plus attention_impl; caches: attention_impl, refresh_every_step; both: the refresh
  economy `refresh_every_blocks`, `reuse_prompt_kv`, `refresh_prompt_window`,
  `refresh_prompt_globals`, `refresh_prompt_keep`, `refresh_prompt_chunk`,
  `refresh_prompt_block`, `refresh_fp8_attention` and `refresh_fp8_matmul`, see
  `RefreshPolicy`)."""
  options = dict(options)
  if mode == "vanilla":
    options.pop("cache_sharding", None)  # vanilla keeps no cache
    return VanillaDenoiser(config, **options)
  refresh = RefreshPolicy(every_blocks=options.pop("refresh_every_blocks", 1),
                          reuse_prompt_kv=options.pop("reuse_prompt_kv", False),
                          prompt_window=options.pop("refresh_prompt_window", 0),
                          prompt_globals=options.pop("refresh_prompt_globals", 64),
                          prompt_keep=options.pop("refresh_prompt_keep", 0.0),
                          prompt_chunk=options.pop("refresh_prompt_chunk", 1024),
                          prompt_block=options.pop("refresh_prompt_block", 128),
                          fp8_attention=options.pop("refresh_fp8_attention", False),
                          fp8_matmul=options.pop("refresh_fp8_matmul", False))
  if mode == "prefix_cache":
    return PrefixCacheDenoiser(config, refresh=refresh, **options)
  if mode == "dual_cache":
    return DualCacheDenoiser(config, refresh=refresh, **options)
  if mode == "focus":
    from focus_jax.focus import FocusConfig, FocusDenoiser  # pylint: disable=g-import-not-at-top
    impl = options.pop("attention_impl", "auto")
    cache_sharding = options.pop("cache_sharding", None)
    if config.family == "dream":
      options.setdefault("dense_tail", DREAM_DENSE_TAIL)
    return FocusDenoiser(config, FocusConfig(**options), impl, refresh, cache_sharding)
  raise ValueError(f"unknown decoding mode {mode!r}; choose one of {MODES}")

