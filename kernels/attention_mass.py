"""Attention mass per key: how much of a set of query rows' softmax lands on each key.

    mass[b, s] = sum over queries t and heads h of  w[b, t] * exp(scale * q[b, t, h] . k[b, s, h'] - lse[b, t, h])

(h' the kv head of h). `lse` is each row's log-sum-exp over the keys its attention saw, as
`block_sparse_attention(..., return_lse=True)` returns it, so exp(. - lse) is the row's softmax
probability of key s. The attention and this pass together are the two-pass form of "attention
plus the column sums of its probabilities" (Focus-dLLM's sink scores): the attention runs in
the split-KV kernel and this pass reads K once more, in place.

The mass is computed for every key, including keys the attention did not see: the caller masks
those. Rows with weight 0 or an lse of -inf (no key seen, padded query slots) add nothing.

Implementations: "xla" (the definition: an einsum over the grouped rows, which on GPU makes XLA
transpose the [B, S, Hkv, D] cache into a batched-GEMM layout first: a copy of the whole K per
call) and "pallas_gpu" (Pallas, Triton lowering: one program per (batch * kv head, key tile)
reads its K tile in place and writes the tile's mass). "auto": "pallas_gpu" on GPU, else "xla"
(and under a multi-device mesh, `kernels.partition`: XLA partitions the head sum).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from focus_jax.kernels import devices, partition
from focus_jax.kernels.sparse.common import group_queries

IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu")


def check_inputs(q, k, lse, query_weight) -> None:
  """Shape checks at the public boundary."""
  chex.assert_rank([q, k, lse, query_weight], [4, 4, 3, 2])
  b, t, hq, d = q.shape
  chex.assert_shape(k, (b, None, None, d))
  chex.assert_shape(lse, (b, t, hq))
  chex.assert_shape(query_weight, (b, t))
  if hq % k.shape[2]:
    raise ValueError(f"{hq} query heads are not a multiple of {k.shape[2]} kv heads")


def supported(q_shape, k_shape) -> str | None:
  """None when the Pallas kernel handles these shapes, else why not."""
  d, s_len = q_shape[-1], k_shape[1]
  if d < 16 or d & (d - 1):
    return f"head dim {d} is not a power of two >= 16"
  if s_len < 16:
    return f"cache length {s_len} is shorter than the kernel's smallest key tile (16)"
  return None


# Measured on an H200 (2026-12-03, `benchmarks/kernels.py --phases mass`, 32 queries): key tile
# 64 with 4 warps is the fastest of (64..512 keys) x (4, 8 warps) for LLaDA-8B at 8K and 32K
# (batch 1 and 8) and Dream-7B at 32K, and within 4% of the best (128 keys, 8 warps) for Dream at
# 8K. A [rows, tile] score block over MAX_SCORE_BLOCK elements gave wrong sums there (Dream's 256
# padded rows with 512-key tiles: relative error 0.2), so such tilings are refused.
DEFAULT_TILE, DEFAULT_WARPS = 64, 4
MAX_SCORE_BLOCK = 256 * 256


def check_tile(tile: int, rows_pad: int, s_len: int) -> None:
  """A key tile is a power of two >= 16, no longer than the cache, and its score block fits."""
  if tile < 16 or tile & (tile - 1) or tile > s_len:
    raise ValueError(f"key tile {tile} must be a power of two in [16, {s_len}] (the cache length)")
  if rows_pad * tile > MAX_SCORE_BLOCK:
    raise ValueError(f"key tile {tile} with {rows_pad} (padded) query rows per kv head exceeds "
                     f"{MAX_SCORE_BLOCK} score elements per program; use a tile of at most "
                     f"{MAX_SCORE_BLOCK // rows_pad}")


def _rows(q, lse, query_weight, hkv: int):
  """Grouped rows [B, Hkv, R, D], their lse and weights [B, Hkv, R]; rows that add nothing get
  lse = +inf (exp(. - inf) = 0: no inf * 0)."""
  qg = group_queries(q, hkv)
  w = jnp.broadcast_to(query_weight.astype(jnp.float32)[:, :, None], lse.shape)
  # [B, T, Hq] -> [B, Hkv, T*G]: the row order of `group_queries`, through a unit feature axis.
  lse_r, w_r = (group_queries(x[..., None], hkv)[..., 0] for x in (lse.astype(jnp.float32), w))
  lse_r = jnp.where(jnp.isfinite(lse_r) & (w_r != 0), lse_r, jnp.inf)
  return qg, lse_r, jnp.where(jnp.isinf(lse_r), 0.0, w_r)


def attention_mass_xla(q, k, lse, query_weight, *, scale: float) -> jax.Array:
  """The definition, in XLA: [B, S] float32."""
  qg, lse_r, w_r = _rows(q, lse, query_weight, k.shape[2])
  s = jnp.einsum("bhrd,bshd->bhrs", qg, k, preferred_element_type=jnp.float32) * scale
  return jnp.einsum("bhrs,bhr->bs", jnp.exp(s - lse_r[..., None]), w_r)


def _kernel(q_ref, lse_ref, w_ref, k_ref, out_ref, *, seq_len: int, tile: int, scale: float):
  # The last tile is shifted back inside the cache when S is not a multiple of the tile; its
  # overlap with the tile before is computed twice and written with the same values.
  start = jnp.minimum(pl.program_id(1) * tile, seq_len - tile)
  k = k_ref[pl.ds(start, tile), :]  # [tile, D], read in place from the [S, D] slab of this head
  s = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32) * scale  # [R, tile]
  p = jnp.exp(s - lse_ref[...][:, None]) * w_ref[...][:, None]
  out_ref[pl.ds(start, tile)] = jnp.sum(p, axis=0)


def attention_mass_pallas(q, k, lse, query_weight, *, scale: float, tile: int | None = None,
                          num_warps: int | None = None, num_stages: int = 2,
                          interpret: bool = False) -> jax.Array:
  """Grid (batch * kv head, key tile); per kv head [B, Hkv, S], summed over heads after."""
  why = supported(q.shape, k.shape)
  if why:
    raise ValueError(f"pallas_gpu attention mass cannot run this: {why}")
  b, s_len, hkv, d = k.shape
  qg, lse_r, w_r = _rows(q, lse, query_weight, hkv)
  rows = qg.shape[2]
  rows_pad = max(16, pl.next_power_of_2(rows))  # a Triton dot's side; padded rows add nothing
  if rows_pad != rows:
    pad = rows_pad - rows
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, pad), (0, 0)))
    lse_r = jnp.pad(lse_r, ((0, 0), (0, 0), (0, pad)), constant_values=jnp.inf)
    w_r = jnp.pad(w_r, ((0, 0), (0, 0), (0, pad)))
  tile = tile or min(DEFAULT_TILE, 1 << (s_len.bit_length() - 1))  # a power of two <= S
  check_tile(tile, rows_pad, s_len)
  num_warps = num_warps or DEFAULT_WARPS
  kernel = functools.partial(_kernel, seq_len=s_len, tile=tile, scale=scale)
  per_head = pl.pallas_call(
      kernel,
      grid=(b * hkv, -(-s_len // tile)),
      in_specs=[
          pl.BlockSpec((None, None, rows_pad, d), lambda bh, j: (bh // hkv, bh % hkv, 0, 0)),
          pl.BlockSpec((None, None, rows_pad), lambda bh, j: (bh // hkv, bh % hkv, 0)),
          pl.BlockSpec((None, None, rows_pad), lambda bh, j: (bh // hkv, bh % hkv, 0)),
          pl.BlockSpec((None, s_len, None, d), lambda bh, j: (bh // hkv, 0, bh % hkv, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, s_len), lambda bh, j: (bh // hkv, bh % hkv, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, s_len), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="attention_mass",
  )(qg, lse_r, w_r, k)
  return jnp.sum(per_head, axis=1)


def attention_mass(q: jax.Array, k: jax.Array, lse: jax.Array, query_weight: jax.Array, *,
                   scale: float | None = None, implementation: str = "auto",
                   interpret: bool = False) -> jax.Array:
  """q [B, T, Hq, D], k [B, S, Hkv, D] (the cache, in place), lse [B, T, Hq], query_weight
  [B, T] -> mass [B, S] float32 (see the module docstring)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  check_inputs(q, k, lse, query_weight)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  if implementation == "auto":  # under a multi-device mesh XLA partitions it (a head sum)
    gpu = (devices.gpu_at_least() and supported(q.shape, k.shape) is None
           and partition.active_mesh() is None)
    implementation = "pallas_gpu" if gpu else "xla"
  if implementation == "xla":
    return attention_mass_xla(q, k, lse, query_weight, scale=scale)
  return attention_mass_pallas(q, k, lse, query_weight, scale=scale, interpret=interpret)
