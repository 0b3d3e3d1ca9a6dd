"""Approximate KV cache machinery shared by the cached decoding modes.

A *refresh* is a full forward over the canvas that stores every layer's K/V ([B, L, Hkv, D] per
layer, one buffer per layer so each is updated in place). A *cached step* runs only a query set
(canvas positions, fixed size, with a validity mask): each layer writes the fresh K/V of the
query positions it is told to write into its buffer and attends over the buffer. Prefix cache,
dual cache and Focus differ only in which positions they run and how they attend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from focus_jax.decoding.base import Canvas
from focus_jax.kernels import dense_attention, local_attention, selected_attention
from focus_jax.kernels.sparse_attention import block_sparse_attention
from focus_jax.models import family
from focus_jax.models.attention import rows_of
from focus_jax.models.config import ModelConfig
from focus_jax.models.transformer import FP8_WEIGHTS, Transformer, fp8_weights


@flax.struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # per layer [B, L, Hkv, D]
  v: tuple[jax.Array, ...]

  @classmethod
  def empty(cls, config: ModelConfig, batch: int, length: int, sharding=None) -> KVCache:
    """Zeroed buffers, placed with `sharding` (batch over "data", KV heads over "model")."""
    shape = (batch, length, config.n_kv_heads, config.head_dim)

    def zeros():
      z = jnp.zeros(shape, config.jnp_dtype)
      return z if sharding is None else jax.lax.with_sharding_constraint(z, sharding)

    return cls(k=tuple(zeros() for _ in range(config.n_layers)),
               v=tuple(zeros() for _ in range(config.n_layers)))


@dataclasses.dataclass(frozen=True)
class RefreshPolicy:
  """When block entry refreshes the cache, and how much of it (the refresh-economy options).

  At 32K the full refresh is ~80% of a cached decode's time (../shared/design/performance.md),
  so each option trades accuracy for it; benchmarks/accuracy.py measures what it costs.
  - every_blocks = N: a full refresh at every N-th block entry only; other entries are plain
    cached steps (their K/V are as the last refresh left them).
  - reuse_prompt_kv: after the first full refresh, block entries refresh only the response
    region (its queries run against the cached prompt K/V, which are never recomputed).
  - prompt_window = W > 0: inside every full refresh, each prompt query attends only to the
    first `prompt_globals` tokens, a window of W prompt keys around it and the response region
    (kernels.local_attention); response queries attend to everything. At 32K with W = 2048 the
    refresh's attention does 7% of the dense FLOPs. Prompts shorter than about
    prompt_globals + 1.5 W refresh densely.
  - prompt_keep = f in (0, 1): inside every full refresh, each chunk of `prompt_chunk` prompt
    queries attends only to a fraction f of the prompt's blocks of `prompt_block` keys: the
    blocks of the first `prompt_globals` tokens, its own and neighbouring blocks, and the rest
    chosen per kv head by Quest's bound over the chunk's queries (kernels.selected_attention),
    plus the response region; response queries attend to everything. Unlike the local window
    it keeps a prompt query's far lookups. 0 (the default): dense. Prompts too short to save
    anything, or whose budget holds only the forced blocks, refresh densely. At 32K, keep 0.25
    (chunk 1024, block 128): LLaDA-8B's refresh 1.644 -> 1.086 s on an H200 (README).
  - fp8_attention: every full refresh's attention runs in float8 e4m3 with per-tensor scales
    (`kernels.dense_attention`, cuDNN's fp8 flash attention on a GPU). The refresh is
    compute-bound and attention is over half of it at 32K; the GEMMs stay bfloat16, and so does
    every cached step. fp8 attention cannot mask pad keys; it makes each an average key
    carrying the average value (a bounded pull, `kernels.dense_attention`), and the pipeline
    refuses batches with more than FP8_MAX_PAD_FRACTION of pads in a row.
  - fp8_matmul: every full refresh's projections (q, k, v, o and the MLP; not the lm head)
    multiply in float8 e4m3 with per-tensor scales (`ModelConfig.fp8_matmul`, cuBLASLt's fp8
    GEMM on a Hopper GPU). They are the other half of the refresh's time at 32K. Cached steps
    stay bfloat16 (their GEMMs stream weights; fp8 would not speed them up). The e4m3 weights
    are made once per generation, before the denoising loop (`prepare_params`): 1 byte a
    weight (7 GB for LLaDA-8B) for the whole generation.
  """

  every_blocks: int = 1
  reuse_prompt_kv: bool = False
  prompt_window: int = 0
  prompt_globals: int = 64
  prompt_keep: float = 0.0
  prompt_chunk: int = 1024
  prompt_block: int = 128
  fp8_attention: bool = False
  fp8_matmul: bool = False

  def __post_init__(self):
    if self.every_blocks < 1:
      raise ValueError(f"refresh every_blocks must be >= 1, got {self.every_blocks}")
    if self.prompt_window < 0 or self.prompt_window % 2:
      raise ValueError("refresh prompt_window must be 0 (dense) or an even number of keys, got "
                       f"{self.prompt_window}")
    if self.prompt_globals < 0:
      raise ValueError(f"refresh prompt_globals must be >= 0, got {self.prompt_globals}")
    if not 0.0 <= self.prompt_keep <= 1.0:
      raise ValueError("refresh prompt_keep must be 0 (dense) or a fraction of the prompt's key "
                       f"blocks in (0, 1], got {self.prompt_keep}")
    if self.prompt_chunk < 1 or self.prompt_block < 1:
      raise ValueError("refresh prompt_chunk and prompt_block must be >= 1, got "
                       f"{self.prompt_chunk} and {self.prompt_block}")
    sparse = [name for name, on in (("prompt_window", self.prompt_window),
                                    ("prompt_keep", self.prompt_keep),
                                    ("fp8_attention", self.fp8_attention)) if on]
    if len(sparse) > 1:
      raise ValueError(f"refresh {' and '.join(sparse)} each replace the refresh's dense "
                       "attention (the sparse prompt attention has no fp8 kernel): choose one")


FULL_REFRESH, RESPONSE_REFRESH, CACHED_STEP = 0, 1, 2


def entry_kind(policy: RefreshPolicy, block_index: jax.Array) -> int | jax.Array:
  """What a block's entry step does: FULL_REFRESH, RESPONSE_REFRESH or CACHED_STEP.

  A Python int under the default policy (the entry then needs no conditional), else a traced
  int32 for `lax.switch` (once per block).
  """
  if policy.every_blocks == 1 and not policy.reuse_prompt_kv:
    return FULL_REFRESH
  full = jnp.int32(FULL_REFRESH)
  if policy.reuse_prompt_kv:
    full = jnp.where(block_index == 0, FULL_REFRESH, RESPONSE_REFRESH)
  return jnp.where(block_index % policy.every_blocks == 0, full, CACHED_STEP).astype(jnp.int32)


def run_entry(policy: RefreshPolicy, block_index: jax.Array, branches, operand):
  """Runs branches[entry_kind] on the operand (statically when the kind is static)."""
  kind = entry_kind(policy, block_index)
  if isinstance(kind, int):
    return branches[kind](operand)
  return jax.lax.switch(kind, branches, operand)


def response_queries(config: ModelConfig, canvas: Canvas, batch: int,
                     write_from: jax.Array | None = None, *,
                     first_logit: bool = True) -> "QuerySet":
  """The generation region's positions as a query set, K/V written from `write_from` on (None:
  all). With `first_logit`, Dream (the logits of j come from j - 1) also runs the last prompt
  position, first: its gen + 1 queries give every response logit and still write the canvas's
  last row."""
  shift = 1 if config.logit_shift and first_logit else 0
  rows = canvas.length - canvas.prompt_length + shift
  positions = jnp.maximum(jnp.arange(rows, dtype=jnp.int32) + canvas.prompt_length - shift, 0)
  positions = jnp.broadcast_to(positions, (batch, rows))
  write = jnp.ones((batch, rows), bool) if write_from is None else positions >= write_from
  return QuerySet(positions, jnp.ones((batch, rows), bool), write,
                  window_start=positions[0, 0], window=rows)


def response_window_logits(config: ModelConfig, params, hidden: jax.Array,
                           queries: "QuerySet", block_start: jax.Array,
                           window: int) -> jax.Array:
  """Logits of the block window from the hidden states of `response_queries`."""
  source = block_start - (1 if config.logit_shift else 0)  # the window's first logit row
  rows = jax.lax.dynamic_slice_in_dim(hidden, source - queries.window_start, window, axis=1)
  return logits_at(config, params, rows)


def response_refresh(config: ModelConfig, params, canvas: Canvas, cache: "KVCache",
                     block_start: jax.Array, window: int, attention_impl: str,
                     split_kv_impl: str = "auto"):
  """A later block's entry under `reuse_prompt_kv`: (window logits, cache).

  The response rows run against the cached prompt K/V and rewrite their own, the canvas's last
  included. Dream's too run without the last prompt row (`first_logit=False`): no prompt row is
  rewritten, the rows stay gen, and the one logit that drops, the first response position's, is
  block 0's, whose entry is a full refresh.
  """
  queries = response_queries(config, canvas, canvas.tokens.shape[0], first_logit=False)
  hidden, cache, _ = cached_forward(config, params, canvas, cache, queries, attention_impl,
                                    split_kv_impl=split_kv_impl)
  return response_window_logits(config, params, hidden, queries, block_start, window), cache


@flax.struct.dataclass
class QuerySet:
  """Canvas positions a cached step runs: [B, A], with validity (invalid slots are padding).

  With `window` > 0, every written position lies in [window_start, window_start + window) (the
  step's block, or the response), and the cache write is one read-select-update of that window
  instead of a scatter."""

  positions: jax.Array
  valid: jax.Array
  write: jax.Array  # [B, A] bool: store this slot's fresh K/V in the cache
  window_start: jax.Array | None = None  # int32 scalar
  window: int = flax.struct.field(pytree_node=False, default=0)

  def store(self, buffer: jax.Array, values: jax.Array) -> jax.Array:
    """buffer with the written slots' values [B, A, ...] at their positions."""
    if self.window:
      return write_rows_in_window(buffer, self.positions, values, self.write, self.window_start,
                                  self.window)
    return write_rows(buffer, self.positions, values, self.write)


def canvas_masks(config: ModelConfig, canvas: Canvas):
  """(positions [B, L], key_valid [B, L] or None) of the canvas under the family's semantics."""
  positions, key_valid, _ = family.positions_and_masks(config, canvas.attention_mask,
                                                        canvas.tokens.shape)
  return positions, key_valid


@dataclasses.dataclass(frozen=True)
class RefreshAttention:
  """Full self-attention over the call's own K/V, which also overwrite the layer's cache in place
  (no second cache-sized buffer: at 128K the cache alone is 70 GB)."""

  key_valid: jax.Array | None
  query_valid: jax.Array | None
  implementation: str = "auto"
  prompt_length: int = 0  # the prompt rows, which a sparse policy treats apart
  policy: RefreshPolicy = RefreshPolicy()

  def __call__(self, layer, q, k, v, layer_state, carry, query_rows=None):
    del layer
    k_cache, v_cache = layer_state
    policy = self.policy
    masks = dict(key_valid=self.key_valid, query_valid=self.query_valid,
                 implementation=self.implementation)
    # (A last layer that computes only the window's rows stays dense.)
    if policy.prompt_window and query_rows is None:
      out = local_attention.local_prefix_attention(
          q, k, v, prefix=self.prompt_length, window=policy.prompt_window,
          n_global=policy.prompt_globals, **masks)
    elif policy.prompt_keep and query_rows is None:
      out = selected_attention.selected_prefix_attention(
          q, k, v, prefix=self.prompt_length, chunk=policy.prompt_chunk,
          block=policy.prompt_block, keep=policy.prompt_keep, n_global=policy.prompt_globals,
          **masks)
    else:
      out = dense_attention.attention(q, k, v, key_valid=self.key_valid,
                                      query_valid=rows_of(self.query_valid, query_rows),
                                      implementation=self.implementation,
                                      fp8=policy.fp8_attention)
    zero = (0, 0, 0, 0)
    return out, (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), zero),
                 jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), zero)), carry


# The key under which `prepare_params` adds the refresh's e4m3 weights to the params mapping.
REFRESH_FP8_WEIGHTS = "refresh_fp8_weights"


def prepare_params(params, policy: RefreshPolicy):
  """params as a denoising loop reads them, made once before it: with `policy.fp8_matmul` they
  gain the projections' e4m3 weights (`models.transformer.fp8_weights`) under
  REFRESH_FP8_WEIGHTS, which `refresh` hands the model. (Quantised inside the loop instead, the
  weights are loop-invariant: XLA hoisted transposed bfloat16 and e4m3 copies of every layer's
  weights out of it, a 32K LLaDA-8B generation no longer fit an H100, 2026-12-07.)"""
  if not policy.fp8_matmul or REFRESH_FP8_WEIGHTS in params:
    return params
  # (one compiled program when called eagerly, as the step timers do; inlined under a jit. A jit
  # of the whole function would hand back a copy of every parameter as well.)
  return {**params, REFRESH_FP8_WEIGHTS: _fp8_weights_jit(params)}


_fp8_weights_jit = jax.jit(fp8_weights)


def _refresh_variables(params, policy: RefreshPolicy) -> dict:
  """The model's variables for a refresh: the e4m3 weights beside the params when prepared."""
  if not (policy.fp8_matmul and REFRESH_FP8_WEIGHTS in params):
    return {"params": params}
  rest = {name: tree for name, tree in params.items() if name != REFRESH_FP8_WEIGHTS}
  return {"params": rest, FP8_WEIGHTS: params[REFRESH_FP8_WEIGHTS]}


def refresh(config: ModelConfig, params, canvas: Canvas, cache: KVCache, window_start: jax.Array,
            window: int, attention_impl: str = "auto", policy: RefreshPolicy | None = None):
  """Full forward that rewrites every layer's K/V: (window logits [B, W, V], KVCache).

  Only the window's rows leave the last layer (its K/V still cover the whole canvas)."""
  positions, key_valid, query_valid = family.positions_and_masks(
      config, canvas.attention_mask, canvas.tokens.shape)
  policy = policy or RefreshPolicy()
  attention = RefreshAttention(key_valid, query_valid, attention_impl, canvas.prompt_length,
                               policy)
  forward = config.replace(fp8_matmul=True) if policy.fp8_matmul else config
  hidden, kv, _ = Transformer(forward).apply(
      _refresh_variables(params, policy), canvas.tokens, positions, attention,
      tuple(zip(cache.k, cache.v)), output_rows=family.source_positions(config, window_start, window))
  logits = logits_at(config, params, hidden)
  return logits, KVCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv))


def write_rows(buffer: jax.Array, positions: jax.Array, values: jax.Array,
               write: jax.Array) -> jax.Array:
  """buffer[b, positions[b, a]] = values[b, a] where write[b, a]; other slots are dropped."""
  b, length = buffer.shape[:2]
  target = jnp.where(write, positions, length)  # out of bounds -> dropped
  rows = jnp.arange(b)[:, None]
  return buffer.at[rows, target].set(values, mode="drop")


def write_rows_in_window(buffer: jax.Array, positions: jax.Array, values: jax.Array,
                         write: jax.Array, start: jax.Array, window: int) -> jax.Array:
  """`write_rows` for positions that all lie in [start, start + window): one fusion that reads
  the window, picks each row's new value and updates the buffer in place. Against the scatter
  on one H200 (2026-12-04): LLaDA-8B's 8K batch-8 Focus step 13.52 -> 13.37 ms, Dream-7B's 32K
  step 5.86 -> 5.76 ms (README). Written positions outside the window would be lost; the start
  is clamped as `dynamic_slice` clamps it, which keeps every in-bounds position of the window
  in it."""
  b, length = buffer.shape[:2]
  window = min(window, length)
  start = jnp.clip(start, 0, length - window).astype(jnp.int32)
  old = jax.lax.dynamic_slice_in_dim(buffer, start, window, axis=1)
  rows = jnp.arange(window, dtype=jnp.int32)
  hit = (positions[:, None, :] - start == rows[None, :, None]) & write[:, None, :]  # [B, W, A]
  source = jnp.argmax(hit, axis=-1)
  new = jnp.take_along_axis(values.astype(buffer.dtype),
                            source.reshape(b, window, *([1] * (values.ndim - 2))), axis=1)
  keep = jnp.any(hit, axis=-1).reshape(b, window, *([1] * (values.ndim - 2)))
  return jax.lax.dynamic_update_slice_in_dim(buffer, jnp.where(keep, new, old), start, axis=1)


def prompt_start_of(canvas: Canvas) -> jax.Array:
  """[B] index of the first non-pad key (prompts are left-padded)."""
  b = canvas.tokens.shape[0]
  if canvas.attention_mask is None:
    return jnp.zeros((b,), jnp.int32)
  return canvas.prompt_length - jnp.sum(canvas.attention_mask[:, :canvas.prompt_length],
                                        axis=1).astype(jnp.int32)


# Key-block size of the split-KV kernel when it serves dense attention over the cache.
DECODE_BLOCK = 64


def all_blocks_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         prompt_start: jax.Array, prompt_length: int,
                         implementation: str = "auto",
                         query_counts: jax.Array | None = None, return_lse: bool = False):
  """Dense attention over [prompt_start, L) as a block-sparse call with every prompt block
  selected: the split-KV kernel then serves dense decode attention too. `query_counts` [B]:
  only the first count queries are live (the kernel skips the rest; they come back as zeros).
  `return_lse`: also each row's log-sum-exp [B, T, Hq] (see `block_sparse_attention`)."""
  b, length = k_cache.shape[:2]
  nb = -(-prompt_length // DECODE_BLOCK)
  indices = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, 1, nb))
  return block_sparse_attention(
      q, k_cache, v_cache, indices, jnp.full((b, 1), nb, jnp.int32), prompt_start,
      jnp.full((b,), prompt_length, jnp.int32), jnp.full((b,), length, jnp.int32),
      block_size=DECODE_BLOCK, implementation=implementation,
      max_response_len=length - prompt_length, query_counts=query_counts, return_lse=return_lse)


def uses_split_kv(k_cache: jax.Array, implementation: str = "auto") -> bool:
  """Whether dense attention over this cache runs as the split-KV kernel (`all_blocks_attention`):
  "auto" on GPU and TPU, for caches of at least one decode block."""
  return (implementation == "auto" and jax.default_backend() in ("gpu", "tpu")
          and k_cache.shape[1] >= DECODE_BLOCK)


def dense_over_cache(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     key_valid: jax.Array | None, prompt_start: jax.Array, prompt_length: int,
                     implementation: str = "auto",
                     query_counts: jax.Array | None = None,
                     split_kv_impl: str = "auto") -> jax.Array:
  """Few queries over a whole cache. On GPU/TPU the split-KV kernel (cuDNN and XLA do not split
  the key axis for few queries: about 1 TB/s), `split_kv_impl` naming which (see
  `kernels.sparse_attention`); elsewhere the XLA path with the key mask. `query_counts` [B]
  lets the kernel skip padded query slots (queries t >= count: their outputs are not to be
  used)."""
  if uses_split_kv(k_cache, implementation):
    return all_blocks_attention(q, k_cache, v_cache, prompt_start, prompt_length,
                                implementation=split_kv_impl, query_counts=query_counts)
  impl = "xla" if implementation == "auto" else implementation
  return dense_attention.attention(q, k_cache, v_cache, key_valid=key_valid, implementation=impl)


@dataclasses.dataclass(frozen=True)
class CachedAttention:
  """Writes the query slots' K/V into the layer's cache, then attends densely over the cache.

  `attend` may replace the dense attention for some layers (Focus's sparse layers); it gets
  (layer, q, k_cache, v_cache, carry) and returns (out, carry).
  """

  queries: QuerySet
  key_valid: jax.Array | None
  prompt_start: jax.Array
  prompt_length: int
  attention_impl: str = "auto"
  attend: Callable[..., Any] | None = None
  split_kv_impl: str = "auto"  # the kernel of dense attention over the cache (GPU, TPU)

  def __call__(self, layer, q, k, v, layer_state, carry, query_rows=None):
    if query_rows is not None:
      raise NotImplementedError("a cached step runs its query set as given (no query_rows)")
    k_cache, v_cache = layer_state
    k_cache, v_cache = self.queries.store(k_cache, k), self.queries.store(v_cache, v)
    if self.attend is not None:
      out, carry = self.attend(layer, q, k_cache, v_cache, carry)
    else:
      out = dense_over_cache(q, k_cache, v_cache, self.key_valid, self.prompt_start,
                             self.prompt_length, self.attention_impl,
                             split_kv_impl=self.split_kv_impl)
    return out, (k_cache, v_cache), carry


def cached_forward(config: ModelConfig, params, canvas: Canvas, cache: KVCache,
                   queries: QuerySet, attention_impl: str = "auto",
                   attend: Callable[..., Any] | None = None, carry: Any = None,
                   split_kv_impl: str = "auto"):
  """Runs the query set against the cache: (final hidden [B, A, D], new cache, carry)."""
  chex.assert_equal_shape([queries.positions, queries.valid, queries.write])
  positions, key_valid = canvas_masks(config, canvas)
  safe = jnp.clip(queries.positions, 0, canvas.length - 1)
  tokens = jnp.take_along_axis(canvas.tokens, safe, axis=1)
  query_positions = jnp.take_along_axis(positions, safe, axis=1)
  attention = CachedAttention(queries, key_valid, prompt_start_of(canvas), canvas.prompt_length,
                              attention_impl, attend, split_kv_impl)
  hidden, kv, carry = Transformer(config).apply(
      {"params": params}, tokens, query_positions, attention,
      tuple(zip(cache.k, cache.v)), carry)
  return hidden, KVCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv)), carry


def logits_at(config: ModelConfig, params, hidden: jax.Array) -> jax.Array:
  return Transformer(config).apply({"params": params}, hidden, method=Transformer.logits)
