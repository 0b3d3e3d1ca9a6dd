"""Decoding modes: how each denoising step computes its logits (vanilla, caches, Focus)."""

from __future__ import annotations

import dataclasses
from typing import Any

from focus_jax.decoding.base import Canvas, Denoiser, StepContext
from focus_jax.decoding.cache import RefreshPolicy
from focus_jax.decoding.fast_dllm import DualCacheDenoiser, PrefixCacheDenoiser
from focus_jax.decoding.vanilla import VanillaDenoiser
from focus_jax.models.config import ModelConfig

MODES = ("vanilla", "prefix_cache", "dual_cache", "focus")
# Dream-7B keeps its final layers dense under Focus (as reported for it).
DREAM_DENSE_TAIL = 4


# The refresh-economy knobs of the cached modes and Focus, as RefreshPolicy's fields.
_ECONOMY = {"refresh_every_blocks": "every_blocks", "reuse_prompt_kv": "reuse_prompt_kv",
            "refresh_prompt_window": "prompt_window", "refresh_prompt_globals": "prompt_globals",
            "refresh_prompt_keep": "prompt_keep", "refresh_prompt_chunk": "prompt_chunk",
            "refresh_prompt_block": "prompt_block", "refresh_fp8_attention": "fp8_attention",
            "refresh_fp8_matmul": "fp8_matmul"}


def mode_knobs(mode: str) -> tuple[str, ...]:
  """The option names `make_denoiser` takes for a mode: its denoiser's fields (Focus: and
  FocusConfig's), the refresh economy's for the cached modes, and `cache_sharding` (which
  vanilla, keeping no cache, ignores)."""
  from focus_jax.focus import FocusConfig, FocusDenoiser  # pylint: disable=g-import-not-at-top
  denoiser = {"vanilla": VanillaDenoiser, "prefix_cache": PrefixCacheDenoiser,
              "dual_cache": DualCacheDenoiser, "focus": FocusDenoiser}[mode]
  own = [f.name for f in dataclasses.fields(denoiser) if f.name not in ("config", "refresh",
                                                                        "focus")]
  if mode == "focus":
    own = [f.name for f in dataclasses.fields(FocusConfig)] + own
  if mode == "vanilla":
    return (*own, "cache_sharding")
  return (*own, *_ECONOMY)


def make_denoiser(config: ModelConfig, mode: str = "vanilla", **options: Any) -> Denoiser:
  """The denoiser of a decoding mode; `options` are that mode's knobs (Focus: FocusConfig's
  fields plus attention_impl; caches: attention_impl, refresh_every_step; both: the refresh
  economy `refresh_every_blocks`, `reuse_prompt_kv`, `refresh_prompt_window`,
  `refresh_prompt_globals`, `refresh_prompt_keep`, `refresh_prompt_chunk`,
  `refresh_prompt_block`, `refresh_fp8_attention` and `refresh_fp8_matmul`, see
  `RefreshPolicy`)."""
  options = dict(options)
  if mode not in MODES:
    raise ValueError(f"unknown decoding mode {mode!r}; choose one of {MODES}")
  unknown = sorted(set(options) - set(mode_knobs(mode)))
  if unknown:
    raise ValueError(f"decoding mode {mode!r} has no knob {', '.join(map(repr, unknown))}; its "
                     f"knobs: {', '.join(mode_knobs(mode))}")
  if mode == "vanilla":
    options.pop("cache_sharding", None)  # vanilla keeps no cache
    return VanillaDenoiser(config, **options)
  refresh = RefreshPolicy(**{field: options.pop(knob) for knob, field in _ECONOMY.items()
                             if knob in options})
  if mode == "prefix_cache":
    return PrefixCacheDenoiser(config, refresh=refresh, **options)
  if mode == "dual_cache":
    return DualCacheDenoiser(config, refresh=refresh, **options)
  from focus_jax.focus import FocusConfig, FocusDenoiser  # pylint: disable=g-import-not-at-top
  impl = options.pop("attention_impl", "auto")
  cache_sharding = options.pop("cache_sharding", None)
  if config.family == "dream":
    options.setdefault("dense_tail", DREAM_DENSE_TAIL)
  return FocusDenoiser(config, FocusConfig(**options), impl, refresh, cache_sharding)

