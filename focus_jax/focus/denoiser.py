"""Focus-dLLM as a decoding mode: approximate KV cache + past-confidence focus + sparse layers.

Block entry: a full forward refreshes every layer's K/V (as the dual cache does) and the
representative keys of the prompt blocks. Other steps run only I_active (see indicator.py)
through the model: dense attention in layers < l_dense (and Dream's dense tail), sinks found at
layer l_dense - 1, block-pruned sparse attention above (see attention.py). Logits, and so new
confidences, exist only for the active positions; the sampler commits only among them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from focus_jax.decoding import cache as kv
from focus_jax.decoding.base import Canvas, StepContext
from focus_jax.focus import indicator, pruning
from focus_jax.focus.attention import FocusAttend, LayerCarry
from focus_jax.focus.config import FocusConfig
from focus_jax.models import family
from focus_jax.models.config import ModelConfig


@flax.struct.dataclass
class FocusState:
  cache: kv.KVCache
  representatives: tuple[Any, ...]  # per layer [B, Hkv, NB, D or 2D] (sparse layers) or None
  block_valid: jax.Array  # [B, NB]
  stats: dict[str, jax.Array]  # diagnostics accumulators (empty when off)
  last_focus: jax.Array  # [B, W] I_focus of the last sparse step (diagnostics)
  last_active: jax.Array  # [B, W]


def _new_stats(n_layers: int) -> dict[str, jax.Array]:
  # Distinct buffers: the state is donated between steps, and one array twice can't be.
  scalars = ("sparse_steps", "refresh_steps", "committed", "committed_in_focus",
             "committed_in_active", "active_sum")
  stats = {name: jnp.zeros((), jnp.float32) for name in scalars}
  stats["retained_mass_sum"] = jnp.zeros((n_layers,), jnp.float32)
  stats["kv_tokens_sum"] = jnp.zeros((n_layers,), jnp.float32)
  return stats


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
  """Recall of the indicator, query slots run per sparse step by a row still decoding
  (|I_active|, at most the slot capacity), retained attention mass and KV tokens per layer,
  from the sums."""
  steps = max(float(stats["sparse_steps"]), 1.0)
  committed = max(float(stats["committed"]), 1.0)
  return {"sparse_steps": float(stats["sparse_steps"]),
          "refresh_steps": float(stats["refresh_steps"]),
          "recall_focus": float(stats["committed_in_focus"]) / committed,
          "recall_active": float(stats["committed_in_active"]) / committed,
          "active_per_sparse_step": float(stats["active_sum"]) / steps,
          "retained_mass_per_layer": [float(x) / steps for x in stats["retained_mass_sum"]],
          "kv_tokens_per_layer": [float(x) / steps for x in stats["kv_tokens_sum"]]}


def _window_logits_from_slots(slot_logits: jax.Array, slots: jax.Array, valid: jax.Array,
                              w: int) -> tuple[jax.Array, jax.Array]:
  """Slot logits [B, A, V] -> (window logits [B, w, V] float32, zero where no slot ran;
  computed [B, w]).

  A gather by each window position's slot, not a scatter into zeros: at Dream-7B's vocabulary
  and batch 8 the zero-filled [B, w, V] buffer and its scatter were two ~50 us passes a step,
  and XLA can fuse the gather into the sampler's reads.
  """
  b, a = slots.shape
  rows = jnp.arange(b)[:, None]
  target = jnp.where(valid, slots, w)  # invalid slots are dropped
  slot_of = jnp.full((b, w), a, jnp.int32).at[rows, target].set(
      jnp.broadcast_to(jnp.arange(a, dtype=jnp.int32), (b, a)), mode="drop")
  computed = slot_of < a
  gathered = jnp.take_along_axis(slot_logits, jnp.minimum(slot_of, a - 1)[:, :, None], axis=1)
  return jnp.where(computed[:, :, None], gathered.astype(jnp.float32), 0.0), computed


@dataclasses.dataclass(frozen=True)
class FocusDenoiser:
  config: ModelConfig
  focus: FocusConfig = FocusConfig()
  attention_impl: str = "auto"
  refresh: kv.RefreshPolicy = kv.RefreshPolicy()
  cache_sharding: Any = None  # a NamedSharding for [B, L, Hkv, D] (focus_jax.sharding)

  def __post_init__(self):
    self.focus.check(self.config.n_layers)

  def _sparse_layers(self):
    return [not self.focus.is_dense(l, self.config.n_layers) for l in range(self.config.n_layers)]

  def _representatives(self, cache: kv.KVCache, canvas: Canvas):
    _, key_valid = kv.canvas_masks(self.config, canvas)
    reps, block_valid = [], None
    for layer, sparse in enumerate(self._sparse_layers()):
      if not sparse:
        reps.append(None)
        continue
      rep, block_valid = pruning.representative_keys(
          cache.k[layer], key_valid, canvas.prompt_length, self.focus.prompt_block_size,
          self.focus.representative)
      reps.append(rep)
    if block_valid is None:  # no sparse layer
      nb = pruning.num_prompt_blocks(canvas.prompt_length, self.focus.prompt_block_size)
      block_valid = jnp.zeros((canvas.tokens.shape[0], nb), bool)
    return tuple(reps), block_valid

  def prepare_params(self, params):
    return kv.prepare_params(params, self.refresh)

  def init_state(self, params, canvas: Canvas) -> FocusState:
    del params
    b, w = canvas.tokens.shape[0], canvas.block_length
    cache = kv.KVCache.empty(self.config, b, canvas.length, self.cache_sharding)
    reps, block_valid = self._representatives(cache, canvas)
    stats = _new_stats(self.config.n_layers) if self.focus.diagnostics else {}
    return FocusState(cache, reps, block_valid, stats, jnp.zeros((b, w), bool),
                      jnp.zeros((b, w), bool))

  def window_logits(self, params, canvas: Canvas, state: FocusState, ctx: StepContext):
    b, w = ctx.masked.shape

    def counted(stats):
      stats = dict(stats)
      if stats:
        stats["refresh_steps"] = stats["refresh_steps"] + 1
      return stats

    def full_refresh(s: FocusState):
      logits, cache = kv.refresh(self.config, params, canvas, s.cache, ctx.block_start, w,
                                 self.attention_impl, self.refresh)
      reps, block_valid = self._representatives(cache, canvas)
      return logits, jnp.ones((b, w), bool), s.replace(
          cache=cache, representatives=reps, block_valid=block_valid, stats=counted(s.stats))

    def response_refresh(s: FocusState):
      # Prompt K/V (and so the representative keys) are kept; the response is recomputed.
      logits, cache = kv.response_refresh(self.config, params, canvas, s.cache, ctx.block_start,
                                          w, self.attention_impl, self.focus.sparse_impl)
      return logits, jnp.ones((b, w), bool), s.replace(cache=cache, stats=counted(s.stats))

    def sparse(s: FocusState):
      return self._sparse_step(params, canvas, s, ctx)

    if not ctx.block_entry:
      return sparse(state)
    return kv.run_entry(self.refresh, ctx.block_index, [full_refresh, response_refresh, sparse],
                        state)

  def _focus_slots(self, ctx: StepContext, capacity: int) -> int | None:
    """How many leading slots can hold I_focus (static): rho times the schedule's largest k,
    at most the slots. The block relevance scores only those: at Dream-7B batch 8 it scored all
    32 slots x 7 heads, 224 rows of which 28 weigh anything. A block that outlives its schedule
    plans every mask left (k above the bound); its relevance is then voted by the first
    `focus_slots` focus positions of the block. None (all slots) without a known bound."""
    if self.focus.whole_block_active or ctx.max_planned_unmask is None:
      return None
    return min(capacity, self.focus.rho * ctx.max_planned_unmask)

  def _sparse_step(self, params, canvas: Canvas, state: FocusState, ctx: StepContext):
    cfg, mcfg = self.focus, self.config
    b, w = ctx.masked.shape
    if cfg.whole_block_active:
      focus = ctx.masked
      active = jnp.ones((b, w), bool)
    else:
      focus = indicator.focus_set(ctx.prev_confidence, ctx.masked, ctx.planned_unmask, cfg.rho)
      active = indicator.widen(focus, cfg.window)
    shift = 1 if mcfg.logit_shift else 0
    capacity = min(w, cfg.active_capacity or w)
    slots, valid = indicator.active_slots(active, focus, ctx.masked, capacity)
    query_focus = valid & jnp.take_along_axis(focus, slots, axis=1)
    live = valid  # slots run through the model; `valid` ones also give logits
    if cfg.whole_block_active and shift:
      # As Dream's dual cache: the block's last row runs too (slot w), for its K/V only.
      none = jnp.zeros((b, 1), bool)
      slots = jnp.concatenate([slots, jnp.full((b, 1), w, jnp.int32)], axis=1)
      valid, query_focus = (jnp.concatenate([x, none], axis=1) for x in (valid, query_focus))
      live = jnp.concatenate([live, ~none], axis=1)
    # Dream: the logits of position j come from position j-1, so that is the query to run.
    positions = jnp.maximum(ctx.block_start + slots - shift, 0)
    queries = kv.QuerySet(positions=positions, valid=live, write=live,
                          window_start=ctx.block_start - shift, window=max(w, slots.shape[1]))
    _, key_valid = kv.canvas_masks(mcfg, canvas)
    attend = FocusAttend(
        focus=cfg, n_layers=mcfg.n_layers, query_valid=live, query_focus=query_focus,
        key_valid=key_valid,
        prompt_start=kv.prompt_start_of(canvas), prompt_length=canvas.prompt_length,
        representatives=state.representatives, block_valid=state.block_valid,
        row_keep=pruning.kept_per_row(state.block_valid, cfg.alpha),
        attention_impl=self.attention_impl,
        focus_slots=self._focus_slots(ctx, capacity))
    carry = LayerCarry.initial(b, cfg.n_sink, mcfg.n_layers)
    hidden, cache, carry = kv.cached_forward(mcfg, params, canvas, state.cache, queries,
                                             self.attention_impl, attend=attend, carry=carry)
    slot_logits = kv.logits_at(mcfg, params, hidden)  # [B, A, V]
    logits, computed = _window_logits_from_slots(slot_logits, slots, valid, w)
    stats = dict(state.stats)
    if stats:
      stats["sparse_steps"] = stats["sparse_steps"] + 1
      # Over the rows still decoding this block (a finished row runs no slot).
      decoding = jnp.any(ctx.masked, axis=1)
      stats["active_sum"] = stats["active_sum"] + jnp.sum(
          jnp.where(decoding, jnp.sum(valid, axis=1), 0)) / jnp.maximum(jnp.sum(decoding), 1)
      stats["retained_mass_sum"] = stats["retained_mass_sum"] + carry.retained_mass
      stats["kv_tokens_sum"] = stats["kv_tokens_sum"] + carry.kv_tokens
    return logits, computed, state.replace(cache=cache, stats=stats, last_focus=focus,
                                           last_active=active & computed)

  def after_step(self, state: FocusState, ctx: StepContext, committed: jax.Array) -> FocusState:
    if not self.focus.diagnostics:
      return state
    sparse = jnp.float32(1.0)
    if ctx.block_entry:
      sparse = (jnp.asarray(kv.entry_kind(self.refresh, ctx.block_index))
                == kv.CACHED_STEP).astype(jnp.float32)
    stats = dict(state.stats)
    stats["committed"] += sparse * jnp.sum(committed)
    stats["committed_in_focus"] += sparse * jnp.sum(committed & state.last_focus)
    stats["committed_in_active"] += sparse * jnp.sum(committed & state.last_active)
    return state.replace(stats=stats)
