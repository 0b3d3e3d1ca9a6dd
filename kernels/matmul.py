"""Matmul of few rows against a large weight: the GEMMs of a cached denoising step.

    out[M, N] = x[M, K] @ w[K, N]      (M small: the 32 query slots of a step, times the batch)

With a few dozen rows, each weight is read once per step and used for a handful of FLOPs per
byte, so these GEMMs are bound by how fast the weights stream from HBM: at batch 1 they are
two thirds of a LLaDA-8B Focus step at 8K. XLA's autotuned Triton GEMMs read them at about
3.5 TB/s on an H200 (4.3 TB/s copy bandwidth).

"pallas_gpu" (Pallas, Triton lowering) streams the weight in [k_chunk, block_n] tiles. Grid
(N tile, K split): each program walks its contiguous share of K with the rows' x slice resident,
accumulates in float32, and writes a float32 partial; with more than one split, one XLA reduction
(which fuses into the consumer) sums the splits. Splits exist for short N (the o and down
projections: 4096 columns are 32 tiles of 128, too few programs to keep every SM streaming).
`swiglu` streams a SwiGLU's gate and up weights in one pass and applies silu(gate) * up to the
float32 accumulators. "xla" is `lax.dot_general`. "auto" picks "pallas_gpu" on GPU for shapes it
serves (see `supported`), else "xla"; the model's `ModelConfig.matmul_impl="auto"` is narrower (only
the SwiGLU, only on one Hopper GPU).

**Measured (H200, 2026-12-03).** Kernel alone, 32 rows, chained as in a model
(`benchmarks/kernels.py --phases matmul`, `benchmarks/results/kernels_h200_matmul.json`): the
SwiGLU up-projection of LLaDA-8B (201 MB) 42.5 us with the default tiling against 72.6 us for
XLA's two dots, Dream-7B's 74.0 against 86.8 us; single GEMMs tie XLA or lose (q/o 12.2 vs 9.7
us). Repeats of one tiling in that sweep spread up to 1.5x, so trust only large gaps. End to end,
streaming every projection is slower: LLaDA-8B 8K Focus cached step 7.00 ms against 6.29 ms with
XLA (`benchmarks/results/e2e_h200_ab_matmul.json`). A custom call cuts the step's XLA fusions
(norms and residual adds into the GEMMs, sibling projections merged), and the separate kernels
that replace them cost more than the streaming gains. Streaming only the SwiGLU
(`ModelConfig.matmul_impl="pallas_gpu_mlp"`, or "auto" on one GPU) won all six same-machine
comparisons of that step, by 0.06-0.33 ms (6.04 against 6.36 ms in the latest,
`e2e_h200_ab_session3.json`), so the LLaDA configs use "auto". For Dream-7B it loses (6.07
against 5.81 ms): the model default stays "xla".

A layer's fused q|k|v weight (`fused_qkv`), H100, 2026-12-06 (`kernels_h100_matmul_qkv.json`):
alone, LLaDA-8B's [4096, 12288] streams in 41.6 us against XLA's 48.0; Dream-7B's [3584, 4608]
in 18.6 against 18.0. Streaming it with the SwiGLU left LLaDA-8B's Focus step unchanged (7.71 /
7.88 against 7.69 / 7.80 ms at 8K, `e2e_h100_llada_qkv_streamed.json`), so only "pallas_gpu"
(every projection) streams it.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from focus_jax.kernels import devices, fp8

IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu")
# Rows above this go to XLA: at M = 256 (batch 8) the GEMMs are compute-bound and XLA's
# autotuned tensor-core tilings are the right tool.
MAX_ROWS = 64


@dataclasses.dataclass(frozen=True)
class MatmulTiling:
  """Tiling of the Pallas kernel. `programs` is the target grid size the K splits aim for."""
  block_n: int = 128
  k_chunk: int = 128
  programs: int = 264
  num_warps: int = 4
  num_stages: int = 4


DEFAULT_TILING = MatmulTiling()
DEFAULT_SWIGLU_TILING = MatmulTiling(block_n=64, k_chunk=128, num_stages=3)


def supported(x_shape, w_shape, dtype, tiling: MatmulTiling = DEFAULT_TILING) -> str | None:
  """None when the Pallas kernel serves these shapes, else why not."""
  m, k = x_shape
  n = w_shape[1]
  if m > MAX_ROWS:
    return f"{m} rows is more than {MAX_ROWS}: XLA's tensor-core GEMMs serve that better"
  if dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16/float16"
  if n % tiling.block_n:
    return f"N = {n} is not a multiple of block_n = {tiling.block_n}"
  if k % tiling.k_chunk:
    return f"K = {k} is not a multiple of k_chunk = {tiling.k_chunk}"
  return None


def _check_tiling(t: MatmulTiling) -> None:
  for name in ("block_n", "k_chunk"):
    v = getattr(t, name)
    if v < 16 or v & (v - 1):
      raise ValueError(f"{name} = {v} must be a power of two >= 16 (a Triton tile side)")
  if t.programs < 1 or t.num_warps < 1 or t.num_stages < 1:
    raise ValueError(f"programs, num_warps and num_stages must be >= 1, got {t}")


def split_count(k: int, n: int, tiling: MatmulTiling) -> int:
  """K splits so that (N tiles) x splits approaches `tiling.programs`; at least one K chunk each."""
  n_tiles, chunks = n // tiling.block_n, k // tiling.k_chunk
  return max(1, min(chunks, round(tiling.programs / n_tiles)))


def _kernel(x_ref, w_ref, out_ref, *, k_chunk: int, chunks_per_split: int, chunks: int,
            block_n: int):
  split, n0 = pl.program_id(1), pl.program_id(0) * block_n
  first = split * chunks_per_split
  last = jnp.minimum(first + chunks_per_split, chunks)

  def body(i, acc):
    k0 = pl.multiple_of(i * k_chunk, k_chunk)
    xs = x_ref[:, pl.ds(k0, k_chunk)]
    ws = w_ref[pl.ds(k0, k_chunk), pl.ds(n0, block_n)]
    return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(first, last, body,
                          jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _padded_rows(x: jax.Array, w_shape, tiling: MatmulTiling, what: str) -> jax.Array:
  """Checks the call and pads x's rows to a Triton dot's side (padded rows are discarded)."""
  _check_tiling(tiling)
  why = supported(x.shape, w_shape, x.dtype, tiling)
  if why:
    raise ValueError(f"pallas_gpu {what} cannot run this: {why}")
  m = x.shape[0]
  rows = max(16, pl.next_power_of_2(m))
  return jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x


def matmul_pallas(x: jax.Array, w: jax.Array, *, tiling: MatmulTiling = DEFAULT_TILING,
                  interpret: bool = False) -> jax.Array:
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype, float32 accumulation."""
  xp = _padded_rows(x, w.shape, tiling, "matmul")
  (m, k), rows, n = x.shape, xp.shape[0], w.shape[1]
  chunks = k // tiling.k_chunk
  splits = split_count(k, n, tiling)
  per_split = -(-chunks // splits)
  splits = -(-chunks // per_split)  # no empty split
  out_dtype = x.dtype if splits == 1 else jnp.float32
  kernel = functools.partial(_kernel, k_chunk=tiling.k_chunk, chunks_per_split=per_split,
                             chunks=chunks, block_n=tiling.block_n)
  partial = pl.pallas_call(
      kernel,
      grid=(n // tiling.block_n, splits),
      in_specs=[pl.BlockSpec((rows, k), lambda j, s: (0, 0)),
                pl.BlockSpec((k, n), lambda j, s: (0, 0))],
      out_specs=pl.BlockSpec((None, rows, tiling.block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((splits, rows, n), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages),
      interpret=interpret,
      name="skinny_matmul",
  )(xp, w)
  out = partial[0] if splits == 1 else jnp.sum(partial, axis=0).astype(x.dtype)
  return out[:m]


def _swiglu_kernel(x_ref, wg_ref, wu_ref, out_ref, *, k_chunk: int, chunks: int, block_n: int):
  n0 = pl.program_id(0) * block_n

  def body(i, accs):
    k0 = pl.multiple_of(i * k_chunk, k_chunk)
    xs = x_ref[:, pl.ds(k0, k_chunk)]
    g = jnp.dot(xs, wg_ref[pl.ds(k0, k_chunk), pl.ds(n0, block_n)],
                preferred_element_type=jnp.float32)
    u = jnp.dot(xs, wu_ref[pl.ds(k0, k_chunk), pl.ds(n0, block_n)],
                preferred_element_type=jnp.float32)
    return accs[0] + g, accs[1] + u

  zeros = jnp.zeros((x_ref.shape[0], block_n), jnp.float32)
  g, u = jax.lax.fori_loop(0, chunks, body, (zeros, zeros))
  # silu(g) * u from the float32 accumulators (XLA rounds g and u to bf16 first: differences
  # are at bf16 rounding).
  out_ref[...] = (g * jax.nn.sigmoid(g) * u).astype(out_ref.dtype)


def swiglu_pallas(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *,
                  tiling: MatmulTiling = DEFAULT_SWIGLU_TILING,
                  interpret: bool = False) -> jax.Array:
  """silu(x @ w_gate) * (x @ w_up) [M, F] in one pass over both weights: each program streams
  the same columns of the two, so a SwiGLU up-projection is one launch with no K split (F is
  wide) and the gate never goes to HBM."""
  chex.assert_equal_shape([w_gate, w_up])
  xp = _padded_rows(x, w_gate.shape, tiling, "swiglu")
  (m, k), rows, n = x.shape, xp.shape[0], w_gate.shape[1]
  kernel = functools.partial(_swiglu_kernel, k_chunk=tiling.k_chunk, chunks=k // tiling.k_chunk,
                             block_n=tiling.block_n)
  whole = lambda j: (0, 0)
  out = pl.pallas_call(
      kernel,
      grid=(n // tiling.block_n,),
      in_specs=[pl.BlockSpec((rows, k), whole), pl.BlockSpec((k, n), whole),
                pl.BlockSpec((k, n), whole)],
      out_specs=pl.BlockSpec((rows, tiling.block_n), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages),
      interpret=interpret,
      name="swiglu_up",
  )(xp, w_gate, w_up)
  return out[:m]


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *, implementation: str = "auto",
           tiling: MatmulTiling | None = None, interpret: bool = False) -> jax.Array:
  """silu(x @ w_gate) * (x @ w_up): x [..., K], weights [K, F] -> [..., F]."""
  chex.assert_equal_shape([w_gate, w_up])
  return _over_rows(
      x, (w_gate, w_up), implementation, tiling or DEFAULT_SWIGLU_TILING,
      lambda a: jax.nn.silu(a @ w_gate) * (a @ w_up),
      lambda a, t: swiglu_pallas(a, w_gate, w_up, tiling=t, interpret=interpret))


def matmul(x: jax.Array, w: jax.Array, *, implementation: str = "auto",
           tiling: MatmulTiling | None = None, interpret: bool = False) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] (leading axes flattened into rows)."""
  return _over_rows(
      x, (w,), implementation, tiling or DEFAULT_TILING,
      lambda a: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(x.dtype),
      lambda a, t: matmul_pallas(a, w, tiling=t, interpret=interpret))


def _over_rows(x, weights, implementation: str, tiling: MatmulTiling, xla_fn, pallas_fn):
  """Checks, flattens x's leading axes into rows, picks the implementation, restores the axes."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  chex.assert_rank(list(weights), 2)
  w = weights[0]
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"x's last axis {x.shape[-1]} does not match w's rows {w.shape[0]}")
  if x.dtype != w.dtype:
    raise ValueError(f"x ({x.dtype}) and w ({w.dtype}) must share a dtype")
  x2 = x.reshape(-1, x.shape[-1])
  if implementation == "auto":
    ok = devices.gpu_at_least() and supported(x2.shape, w.shape, x.dtype, tiling) is None
    implementation = "pallas_gpu" if ok else "xla"
  out = xla_fn(x2) if implementation == "xla" else pallas_fn(x2, tiling)
  return out.reshape(*x.shape[:-1], w.shape[1])


def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w [K, N] -> (w8t [N, K] e4m3, descale float32 scalar): w = w8t.T * descale, one
  power-of-two scale (`kernels.fp8`).

  Transposed because cuBLASLt's fp8 GEMM reads both operands K-contiguous: handed w8 [K, N], XLA
  transposes it (in bfloat16, before the quantisation), and inside the denoising loop it hoisted
  those loop-invariant copies of every layer's weights out of the loop: 45 GiB more at a 32K
  LLaDA-8B refresh, which no longer fit an H100 (2026-12-07). Callers that multiply by the
  same weights many times quantise them once with this (`models.transformer.fp8_weights`)."""
  w8, descale, _ = fp8.quantize(w, power_of_two=True)
  return w8.T, descale


def fp8_matmul_quantized(x: jax.Array, w8t: jax.Array, w_descale: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] in float8 e4m3, w given as `quantize_weight(w)`: x takes one
  power-of-two scale, the dot takes the e4m3 arrays themselves (K-contiguous both), the product
  comes out in x's dtype, then the scales."""
  if x.shape[-1] != w8t.shape[1]:
    raise ValueError(f"x's last axis {x.shape[-1]} does not match the weight's {w8t.shape[1]} "
                     f"rows (w8t is [N, K] = {w8t.shape})")
  fp8.check_gpu_supports_fp8("fp8 projections (refresh_fp8_matmul)")
  x8, dx, _ = fp8.quantize(x, power_of_two=True)
  out = jax.lax.dot_general(x8, w8t, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=x.dtype)
  return out * (dx * w_descale).astype(x.dtype)


def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] in float8 e4m3: one power-of-two scale per operand (`kernels.fp8`),
  the product of the e4m3 operands in x's dtype, then the scales. For refresh-sized calls
  (thousands of rows), where the GEMMs are compute-bound and Hopper multiplies e4m3 at twice
  the bfloat16 rate.

  The dot takes the e4m3 arrays themselves, which XLA's GPU compiler (jax 0.11.2) makes one
  cuBLASLt fp8 GEMM: 2.52 ms against bfloat16's 4.12 for a 32K refresh's [33024, 4096] x
  [4096, 12288] on an H100, quantisation included (README, 2026-12-06). The documented
  pattern, e4m3 converted and scaled before a bfloat16 dot, is not rewritten there (a
  bfloat16 GEMM after extra passes), and without a barrier XLA drops the e4m3 round trip
  altogether. Power-of-two scales make the final multiply exact.
  """
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"x's last axis {x.shape[-1]} does not match w's rows {w.shape[0]}")
  return fp8_matmul_quantized(x, *quantize_weight(w))
