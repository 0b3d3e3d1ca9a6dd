"""Fast-dLLM's approximate KV caches as decoding modes.

Both refresh at block entry: a full forward stores every layer's K/V and gives that step's
logits. Between refreshes:
- prefix cache: the current block and everything after it run against the cached prefix (the
  fixed-size query set is the whole generation region; slots before the block read the cache
  and are not written, so the result is that of running [block_start, L) alone; for Dream
  [block_start - 1, L), whose first row gives the block's first logit);
- dual cache: only the current block runs (for Dream also the row before it, whose query gives
  the block's first logit); its fresh K/V overwrite the cache, and the suffix K/V stay as the
  last refresh left them.
`refresh_every_step=True` turns either into vanilla decoding (the exactness tests use this);
`refresh` (a `RefreshPolicy`) selects the refresh-economy options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from focus_jax.decoding import cache as kv
from focus_jax.decoding.base import Canvas, StepContext
from focus_jax.models import family
from focus_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class _CachedDenoiser:
  config: ModelConfig
  attention_impl: str = "auto"
  # The split-KV kernel of a step's attention over the cache on a GPU or TPU
  # (kernels.sparse_attention: "auto", "pallas_gpu", "mosaic_gpu", ...).
  split_kv_impl: str = "auto"
  refresh_every_step: bool = False
  refresh: kv.RefreshPolicy = kv.RefreshPolicy()
  cache_sharding: Any = None  # a NamedSharding for [B, L, Hkv, D] (focus_jax.sharding)

  def prepare_params(self, params):
    return kv.prepare_params(params, self.refresh)

  def init_state(self, params, canvas: Canvas):
    del params
    return kv.KVCache.empty(self.config, canvas.tokens.shape[0], canvas.length,
                            self.cache_sharding)

  def after_step(self, state, ctx, committed):
    return state

  def _step(self, params, canvas: Canvas, cache: kv.KVCache, ctx: StepContext):
    raise NotImplementedError

  def window_logits(self, params, canvas: Canvas, cache: kv.KVCache, ctx: StepContext):
    w = ctx.masked.shape[1]

    def full_refresh(c):
      return kv.refresh(self.config, params, canvas, c, ctx.block_start, w, self.attention_impl,
                        self.refresh)

    def response_refresh(c):
      return kv.response_refresh(self.config, params, canvas, c, ctx.block_start, w,
                                 self.attention_impl, self.split_kv_impl)

    def step(c):
      return self._step(params, canvas, c, ctx)

    if self.refresh_every_step:
      logits, cache = full_refresh(cache)
    elif ctx.block_entry:
      logits, cache = kv.run_entry(self.refresh, ctx.block_index,
                                   [full_refresh, response_refresh, step], cache)
    else:
      logits, cache = step(cache)
    return logits, None, cache


class DualCacheDenoiser(_CachedDenoiser):

  def _step(self, params, canvas, cache, ctx):
    """Runs the block's rows; Dream runs one more, first: the row before the block gives the
    block's first logit (the shift), and the block's last row still has its K/V rewritten."""
    b, w = ctx.masked.shape
    rows = w + (1 if self.config.logit_shift else 0)
    src = jnp.broadcast_to(family.source_positions(self.config, ctx.block_start, rows), (b, rows))
    ones = jnp.ones((b, rows), bool)
    hidden, cache, _ = kv.cached_forward(self.config, params, canvas, cache,
                                         kv.QuerySet(src, ones, ones, window_start=src[0, 0],
                                                     window=rows), self.attention_impl,
                                         split_kv_impl=self.split_kv_impl)
    return kv.logits_at(self.config, params, hidden[:, :w]), cache


class PrefixCacheDenoiser(_CachedDenoiser):

  def _step(self, params, canvas, cache, ctx):
    b, w = ctx.masked.shape
    shift = 1 if self.config.logit_shift else 0
    queries = kv.response_queries(self.config, canvas, b, write_from=ctx.block_start - shift)
    hidden, cache, _ = kv.cached_forward(self.config, params, canvas, cache, queries,
                                         self.attention_impl, split_kv_impl=self.split_kv_impl)
    return kv.response_window_logits(self.config, params, hidden, queries, ctx.block_start,
                                     w), cache
