"""The transformer core shared by LLaDA and Dream (Flax Linen).

Pre-norm blocks: RMSNorm -> attention (RoPE, MHA or GQA, optional q/k/v bias) -> residual,
RMSNorm -> SwiGLU -> residual. What differs between the families is a handful of `ModelConfig`
fields; everything else is this one module.

Layers are unrolled (`layers_0 ... layers_{n-1}`): measured on an H200, a 32-query cached step over
unrolled layers read the weights at 3.4 TB/s against 1.4 TB/s under `lax.scan` (see
../shared/design/performance.md), and unrolled layers give each layer its own KV buffer, updated
in place, with a static layer index the attention policy can branch on.

Why Linen and not NNX: the hot path is a pure function (params, state) -> state inside one
`lax.while_loop`; Linen's parameters are a plain pytree that jit, the loop carry, Orbax and the
checkpoint converter all take as is, with logical-axis sharding metadata, and inference needs no
mutable module state.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from focus_jax.kernels import devices, matmul
from focus_jax.models.attention import Attention, check_qkv
from focus_jax.models.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _single_cuda_capability() -> tuple[int, int] | None:
  """(major, minor) CUDA compute capability of the only device when it is an NVIDIA GPU; None
  off a GPU, with several devices, or where the capability is not "major.minor" (ROCm: gfx*)."""
  if not _on_gpu() or jax.device_count() != 1:
    return None
  return devices.cuda_capability()


def _resolved(implementation: str) -> str:
  """ModelConfig.matmul_impl with "auto" resolved: "pallas_gpu_mlp" on a single Hopper GPU
  (compute capability 9.x, the only one measured: README), else "xla". A sharded weight would
  have to be gathered for a custom call, so multi-device runs stay on XLA."""
  if implementation != "auto":
    return implementation
  capability = _single_cuda_capability()
  return "pallas_gpu_mlp" if capability is not None and capability[0] == 9 else "xla"


# XLA's GPU dot merger fuses sibling dots of one input (a layer's q, k and v projections) while
# their weights total at most this many MB. Its default (32) merges LLaDA-8B's q and k (2 x 32 MiB)
# and leaves v apart; 128 makes q, k and v one GEMM.
AUTO_DOT_MERGER_THRESHOLD_MB = 128
# The merge pays only where a cached step's GEMMs stream weights (few rows): at batch 8 (256
# rows) it made LLaDA-8B's 8K Focus step 12.99 -> 15.73 ms (same H200, e2e_h200_ab_session5.json).
AUTO_DOT_MERGER_MAX_BATCH = 1
# Above that batch no sibling dots merge at all, on any GPU. XLA's default (32 MB) merges
# Dream-7B's q, k and v (31.5 MB) into one Triton GEMM that concatenates the three weights inside
# the kernel: at batch 8 it ran [256, 3584] x [3584, 4608] at ~200 TFLOP/s, 1.17 ms of a 16K
# Focus step; unmerged (cuBLAS) the step went 10.98 -> 10.62 ms and the refresh 4.00 -> 3.95 s
# (H100, 2026-12-07, e2e_h100_dream_b8_no_dot_merger.json). A fused q|k|v weight
# (`fused_qkv`) has no siblings to merge and gains the same (10.63 ms).
BATCH_DOT_MERGER_THRESHOLD_MB = 0


def compiler_options(config: ModelConfig, batch_size: int) -> dict[str, int]:
  """XLA options for jitting this config's forward passes at this batch size, on a GPU. With
  `matmul_impl="auto"` on a single Hopper GPU (where "auto" streams the SwiGLU) and batch 1, a
  layer's q, k and v projections also merge into one GEMM: LLaDA-8B's 8K Focus step 6.23 -> 6.00
  ms (H200, 2026-12-03, README). Above batch 1 they never merge (see
  BATCH_DOT_MERGER_THRESHOLD_MB). Elsewhere none."""
  if not _on_gpu():
    return {}
  if batch_size > AUTO_DOT_MERGER_MAX_BATCH:
    return {} if config.fused_qkv else {
        "xla_gpu_dot_merger_threshold_mb": BATCH_DOT_MERGER_THRESHOLD_MB}
  if config.matmul_impl != "auto" or _resolved("auto") != "pallas_gpu_mlp":
    return {}
  return {"xla_gpu_dot_merger_threshold_mb": AUTO_DOT_MERGER_THRESHOLD_MB}


def _streams(x: jax.Array, w_shape) -> bool:
  """Whether a projection asked to stream runs in the weight-streaming Pallas kernels
  (`kernels/matmul.py`): a plain bf16 call of few rows (a cached step) on shapes the kernels
  serve. A refresh (thousands of rows) and float32 stay on XLA."""
  return matmul.supported((math.prod(x.shape[:-1]), x.shape[-1]), w_shape, x.dtype) is None


# Calls of more rows than this are refresh-sized: a cached step has 32 query slots a sequence.
REFRESH_ROWS = 2048


def _materialised_norm(h: jax.Array) -> jax.Array:
  """A norm's output behind an optimization barrier in refresh-sized GPU calls, so that XLA
  does not fuse its scale into the GEMMs that read it: a LLaDA-8B refresh ran 1.6-2.3% faster
  (README, 2026-12-03). Cached steps keep the fusion (at 256 rows the barrier measured slower).
  Training on a GPU also passes through it; its effect there is unmeasured."""
  if _on_gpu() and math.prod(h.shape[:-1]) > REFRESH_ROWS:
    return jax.lax.optimization_barrier(h)
  return h


def _interpret() -> bool:
  return not _on_gpu()  # off a GPU (tests) the kernels run interpreted


def _streamed_dot_general(lhs, rhs, dimension_numbers, precision=None):
  """nn.Dense's contraction, streamed through `kernels.matmul` where `_streams` says so."""
  (contract_lhs, contract_rhs), batch = dimension_numbers
  plain = (tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,)
           and not batch[0] and rhs.ndim == 2 and lhs.dtype == rhs.dtype)
  if not (plain and _streams(lhs, rhs.shape)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)
  return matmul.matmul(lhs, rhs, implementation="pallas_gpu", interpret=_interpret())


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin [B, T, head_dim] in float32 for rotate-half RoPE (cat(freqs, freqs) layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, in_float32: bool) -> jax.Array:
  """x [B, T, H, D]. LLaDA rotates in float32; Dream casts cos/sin to x's dtype first."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  if in_float32:
    xf = x.astype(jnp.float32)
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        (x.shape[-1],), self.dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return weight * xf.astype(self.dtype)


def _precision(dtype) -> jax.lax.Precision | None:
  """float32 models multiply at HIGHEST precision (the parity tests' fp32 tolerance needs it)."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dense(features: int, axes: tuple[str, str], cfg: ModelConfig, name: str,
           bias_axis: str | None = None, fp8_allowed: bool = True):
  dtype = cfg.jnp_dtype
  if cfg.fp8_matmul and fp8_allowed:
    return Fp8Dense(features, axes, cfg, bias_axis, name=name)
  dot_general = None
  if _resolved(cfg.matmul_impl) == "pallas_gpu":
    dot_general = _streamed_dot_general
  return nn.Dense(
      features, use_bias=bias_axis is not None, dtype=dtype, param_dtype=dtype, name=name,
      dot_general=dot_general,
      kernel_init=nn.with_logical_partitioning(_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             (bias_axis,) if bias_axis else (None,)),
      precision=_precision(dtype))


class _Kernel(nn.Module):
  """A bias-free projection's weight [in, features], named and initialised as nn.Dense's
  "kernel" (same parameter tree), for projections computed outside nn.Dense."""
  features: int
  axes: tuple[str, str]
  config: ModelConfig

  @nn.compact
  def __call__(self, in_features: int) -> jax.Array:
    dt = self.config.jnp_dtype
    return self.param("kernel", nn.with_logical_partitioning(_init, self.axes),
                      (in_features, self.features), dt)


# The variable collection of the projections' weights in e4m3 (`fp8_weights`).
FP8_WEIGHTS = "fp8_weights"


class Fp8Dense(nn.Module):
  """nn.Dense's projection (same "kernel" [in, features] and "bias" parameters) multiplied in
  float8 e4m3 (`ModelConfig.fp8_matmul`). The weight comes from the FP8_WEIGHTS collection when
  the caller made it (`fp8_weights`, once per generation), else it is quantised here, per call."""
  features: int
  axes: tuple[str, str]
  config: ModelConfig
  bias_axis: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.config.jnp_dtype
    kernel = self.param("kernel", nn.with_logical_partitioning(_init, self.axes),
                        (x.shape[-1], self.features), dt)
    if self.has_variable(FP8_WEIGHTS, "kernel"):
      out = matmul.fp8_matmul_quantized(x, self.get_variable(FP8_WEIGHTS, "kernel"),
                                        self.get_variable(FP8_WEIGHTS, "descale"))
    else:
      out = matmul.fp8_matmul(x, kernel)
    if self.bias_axis is not None:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.bias_axis,)),
                        (self.features,), dt)
      out = out + bias.astype(out.dtype)
    return out


def fp8_weights(params) -> dict:
  """The FP8_WEIGHTS collection for `params`: every block's projection weight [K, N] as e4m3
  [N, K] and its descale (`matmul.quantize_weight`), at the projection's module path; the lm
  head and the embedding stay out (they never run in fp8). Pass it beside "params" to a
  `fp8_matmul` model: a generation makes it once, before its denoising loop (1 byte a weight:
  7 GB for LLaDA-8B), instead of each refresh quantising every weight again."""
  def walk(tree):
    if "kernel" in tree and not isinstance(tree["kernel"], dict):
      w8t, descale = matmul.quantize_weight(tree["kernel"])
      return {"kernel": w8t, "descale": descale}
    return {name: walk(sub) for name, sub in tree.items() if isinstance(sub, dict)}
  return {name: walk(sub) for name, sub in params.items() if name.startswith("layers_")}


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w as nn.Dense computes it."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=_precision(x.dtype))


def _fused_qkv(cfg: ModelConfig, h: jax.Array, bias_axis: str | None):
  """q [B, T, Hq, D], k and v [B, T, Hkv, D] from one GEMM with the `fused_qkv` weight, whose
  columns are grouped by KV head (q heads, k, v; q head h belongs to KV head h // q_per_kv), so
  sharding its columns over "kv_heads" keeps each group on one device when the model axis
  divides the KV heads."""
  g = cfg.q_per_kv
  qkv = _dense(cfg.n_kv_heads * (g + 2) * cfg.head_dim, ("embed", "kv_heads"), cfg, "qkv_proj",
               bias_axis)(h)
  qkv = qkv.reshape(*h.shape[:2], cfg.n_kv_heads, g + 2, cfg.head_dim)
  q = qkv[:, :, :, :g].reshape(*h.shape[:2], cfg.n_heads, cfg.head_dim)
  return q, qkv[:, :, :, g], qkv[:, :, :, g + 1]


class Block(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, cos, sin, attention: Attention, layer_state, carry,
               output_rows: jax.Array | None = None):
    """One block; with `output_rows` [R], K/V come from all T positions but only those rows are
    attended from and carried on (the last layer, when the caller needs R outputs)."""
    cfg = self.config
    dt = cfg.jnp_dtype
    b = x.shape[0]
    rows = (lambda a: a) if output_rows is None else (lambda a: jnp.take(a, output_rows, axis=1))
    h = _materialised_norm(RMSNorm(cfg.rms_eps, dt, name="attn_norm")(x))
    bias_q = "heads" if cfg.qkv_bias else None
    bias_kv = "kv_heads" if cfg.qkv_bias else None
    x = rows(x)  # the residual stream continues for the output rows only
    t = x.shape[1]
    if cfg.fused_qkv:
      q, k, v = _fused_qkv(cfg, h, bias_kv)
      q = rows(q)  # (the last layer of a refresh projects every row's q, which it drops)
    else:
      q = _dense(cfg.n_heads * cfg.head_dim, ("embed", "heads"), cfg, "q_proj", bias_q)(rows(h))
      k = _dense(cfg.n_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg, "k_proj", bias_kv)(h)
      v = _dense(cfg.n_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg, "v_proj", bias_kv)(h)
      q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
      k = k.reshape(b, h.shape[1], cfg.n_kv_heads, cfg.head_dim)
      v = v.reshape(b, h.shape[1], cfg.n_kv_heads, cfg.head_dim)
    q = apply_rope(q, rows(cos), rows(sin), cfg.rope_in_float32)
    k = apply_rope(k, cos, sin, cfg.rope_in_float32)
    check_qkv(q, k, v, output_rows)
    out, layer_state, carry = attention(self.layer, q, k, v, layer_state, carry,
                                        query_rows=output_rows)
    chex.assert_shape(out, (b, t, cfg.n_heads, cfg.head_dim))
    out = out.reshape(b, t, cfg.n_heads * cfg.head_dim)
    x = x + _dense(cfg.d_model, ("heads", "embed"), cfg, "o_proj")(out)

    h = _materialised_norm(RMSNorm(cfg.rms_eps, dt, name="mlp_norm")(x))
    x = x + _dense(cfg.d_model, ("mlp", "embed"), cfg, "down_proj")(_swiglu(cfg, h))
    return x, layer_state, carry


def _swiglu(cfg: ModelConfig, h: jax.Array) -> jax.Array:
  """silu(h @ w_gate) * (h @ w_up), in fp8, streamed (both weights in one pass) or by XLA."""
  if cfg.fp8_matmul:
    return (nn.silu(_dense(cfg.mlp_hidden, ("embed", "mlp"), cfg, "gate_proj")(h))
            * _dense(cfg.mlp_hidden, ("embed", "mlp"), cfg, "up_proj")(h))
  w_gate = _Kernel(cfg.mlp_hidden, ("embed", "mlp"), cfg, name="gate_proj")(cfg.d_model)
  w_up = _Kernel(cfg.mlp_hidden, ("embed", "mlp"), cfg, name="up_proj")(cfg.d_model)
  streamed = _resolved(cfg.matmul_impl) in ("pallas_gpu", "pallas_gpu_mlp")
  if streamed and _streams(h, w_gate.shape):
    return matmul.swiglu(h, w_gate, w_up, implementation="pallas_gpu", interpret=_interpret())
  return nn.silu(_dot(h, w_gate)) * _dot(h, w_up)


class Transformer(nn.Module):
  """tokens [B, T] at `positions` [B, T] -> final-normed hidden states [B, T, D].

  `layer_states` is a sequence of per-layer states (one per layer, e.g. KV caches) or None;
  `carry` is threaded through the layers. Both are handed to `attention`, which returns their
  updates. Logits come from `logits(hidden)` so callers project only the positions they need
  (a 32K canvas times a 126K vocabulary would not fit). With `output_rows` [R], only those
  positions' hidden states are returned ([B, R, D]), and the last layer computes only them: its
  K/V (a cache refresh stores them) still cover every position, but its attention queries,
  output projection and MLP run R rows, not T (1/32 of a 32K refresh's FLOPs for LLaDA-8B).
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype,
                          param_dtype=cfg.jnp_dtype,
                          embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
    self.layers = [Block(cfg, i) for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.rms_eps, cfg.jnp_dtype)
    self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head", fp8_allowed=False)

  def __call__(self, tokens: jax.Array, positions: jax.Array, attention: Attention,
               layer_states: Sequence[Any] | None = None, carry: Any = None,
               output_rows: jax.Array | None = None):
    cfg = self.config
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape([tokens, positions])
    if layer_states is None:
      layer_states = (None,) * cfg.n_layers
    if len(layer_states) != cfg.n_layers:
      raise ValueError(f"got {len(layer_states)} layer states for {cfg.n_layers} layers")
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x = self.embed(tokens)
    new_states = []
    last = cfg.n_layers - 1
    for i, (layer, state) in enumerate(zip(self.layers, layer_states)):
      x, state, carry = layer(x, cos, sin, attention, state, carry,
                              output_rows if i == last else None)
      new_states.append(state)
    return self.final_norm(x), tuple(new_states), carry

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits for the given final-normed hidden states."""
    return self.lm_head(hidden).astype(jnp.float32)

  def init_params(self, rng: jax.Array):
    """Random parameters (without sharding boxes), for tests and benchmarks."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    from focus_jax.models.attention import SelfAttention  # pylint: disable=g-import-not-at-top
    variables = self.init(rng, tokens, tokens, SelfAttention(), method=Transformer._init_all)
    return nn.unbox(variables["params"])

  def _init_all(self, tokens, positions, attention):
    hidden, _, _ = self(tokens, positions, attention)
    return self.logits(hidden)
