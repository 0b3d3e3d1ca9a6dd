"""Relevance of key blocks to a weighted set of query rows: score, softmax and weighted sum fused.

    relevance[b, h, n] = sum_r w[b, r] * softmax over valid n' of (score(q[b, h, r], rep[b, h, n']) * scale)[n]

`score` is q . rep (`bound=False`), or, for representatives stored as [centre, radius] (`bound=True`,
Quest's box), the upper bound q . centre + |q| . radius of the block's largest logit. Invalid
blocks get relevance 0 and take no share of any row's softmax; a row with no valid block adds
nothing.

Implementations: "xla" (the definition; the default) and "pallas_gpu" (Pallas, Triton lowering:
one program per (batch * kv head, row tile) runs the scores, an online softmax and the weighted
sum over the block axis in two passes). **The Pallas kernel is not the default: it is slower.**
On the H100 at 32K (512 blocks, 32 queries; `benchmarks/kernels.py --phases relevance`), one
layer took 28.7 us against XLA's 19.1 us for LLaDA-8B (32 kv heads), and 32.5 against 11.2 us
for Dream-7B (4 kv heads, 224 rows). It fuses ~10 XLA kernels into one, but its 32 (LLaDA) or
16 (Dream) programs walk all 512 blocks serially, while XLA's GEMMs and reductions spread over
the whole GPU. A version that also splits the block axis (per-tile softmax statistics, merged,
then a second pass) is what could win.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

IMPLEMENTATIONS = ("xla", "pallas_gpu")
NEG_INIT = -1e30  # finite running max of an empty row: no inf - inf


def check_inputs(qg, row_weight, representatives, block_valid, bound: bool) -> None:
  """Shape checks at the public boundary."""
  chex.assert_rank([qg, representatives], 4)
  b, hkv, rows, d = qg.shape
  chex.assert_shape(row_weight, (b, rows))
  chex.assert_shape(representatives, (b, hkv, None, 2 * d if bound else d))
  chex.assert_shape(block_valid, (b, representatives.shape[2]))


def block_relevance_xla(qg, row_weight, representatives, block_valid, *, bound: bool,
                        scale: float) -> jax.Array:
  """The definition, in XLA: [B, Hkv, R, D] rows -> [B, Hkv, NB] float32."""
  if bound:  # q . centre + |q| . radius as one product over 2D channels: one GEMM, not two
    qg = jnp.concatenate([qg, jnp.abs(qg)], axis=-1)
  logits = jnp.einsum("bhrd,bhnd->bhrn", qg, representatives, preferred_element_type=jnp.float32)
  valid = block_valid[:, None, None, :]
  logits = jnp.where(valid, logits * scale, -jnp.inf)
  probs = jnp.where(valid, jax.nn.softmax(logits, axis=-1), 0.0)  # rows of all -inf: 0, not nan
  return jnp.einsum("bhrn,br->bhn", probs, row_weight.astype(jnp.float32))


def supported(qg_shape, n_blocks: int) -> str | None:
  """None when the Pallas kernel handles these shapes, else why not."""
  d = qg_shape[-1]
  if d < 16 or d & (d - 1):
    return f"head dim {d} is not a power of two >= 16"
  if n_blocks < 16:
    return f"{n_blocks} blocks: the kernel's block tile is at least 16"
  return None


def _kernel(q_ref, w_ref, rep_ref, valid_ref, out_ref, *, n_blocks: int, tile: int, bound: bool,
            scale: float):
  q = q_ref[...]  # [block_m, D]
  d = q.shape[1]
  q_abs = jnp.abs(q)
  n_tiles = -(-n_blocks // tile)
  offs = jnp.arange(tile, dtype=jnp.int32)

  def scores(j):
    """Tile j's logits [block_m, tile] (-inf at invalid blocks) and where it starts. The last
    tile is shifted back inside the array when the block count is not a multiple of the tile."""
    start = jnp.minimum(j * tile, n_blocks - tile)
    dims = (((1,), (1,)), ((), ()))
    s = lax.dot_general(q, rep_ref[pl.ds(start, tile), pl.ds(0, d)], dims,
                        preferred_element_type=jnp.float32)
    if bound:
      s += lax.dot_general(q_abs, rep_ref[pl.ds(start, tile), pl.ds(d, d)], dims,
                           preferred_element_type=jnp.float32)
    ok = valid_ref[pl.ds(start, tile)] != 0
    return start, jnp.where(ok[None, :], s * scale, -jnp.inf)

  def stats(j, carry):  # pass 1: each row's softmax max and denominator (online)
    m, l = carry
    start, s = scores(j)
    s = jnp.where((start + offs >= j * tile)[None, :], s, -jnp.inf)  # a shifted tile's repeats
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)
    return m_new, l

  block_m = q.shape[0]
  m, l = lax.fori_loop(0, n_tiles, stats, (jnp.full((block_m,), NEG_INIT, jnp.float32),
                                           jnp.zeros((block_m,), jnp.float32)))
  row_scale = jnp.where(l > 0, w_ref[...] / jnp.where(l > 0, l, 1.0), 0.0)

  def emit(j, carry):  # pass 2: probabilities, weighted over the rows; repeats rewrite equal values
    start, s = scores(j)
    p = jnp.exp(s - m[:, None]) * row_scale[:, None]
    out_ref[pl.ds(start, tile)] = jnp.sum(p, axis=0)
    return carry

  lax.fori_loop(0, n_tiles, emit, 0)


def block_relevance_pallas(qg, row_weight, representatives, block_valid, *, bound: bool,
                           scale: float, block_m: int | None = None, tile: int | None = None,
                           num_warps: int = 4, num_stages: int = 2,
                           interpret: bool = False) -> jax.Array:
  """Grid (batch * kv head, row tile); each program writes its rows' share, summed after."""
  b, hkv, rows, d = qg.shape
  n_blocks, width = representatives.shape[2], representatives.shape[3]
  why = supported(qg.shape, n_blocks)
  if why:
    raise ValueError(f"pallas_gpu block relevance cannot run this: {why}")
  block_m = block_m or min(64, max(16, pl.next_power_of_2(rows)))
  tile = tile or min(64, 1 << (n_blocks.bit_length() - 1))  # a power of two <= n_blocks
  m_tiles = -(-rows // block_m)
  pad = m_tiles * block_m - rows
  if pad:  # zero rows of zero weight add nothing
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, pad), (0, 0)))
    row_weight = jnp.pad(row_weight, ((0, 0), (0, pad)))
  kernel = functools.partial(_kernel, n_blocks=n_blocks, tile=tile, bound=bound, scale=scale)
  partial = pl.pallas_call(
      kernel,
      grid=(b * hkv, m_tiles),
      in_specs=[
          pl.BlockSpec((None, None, block_m, d), lambda bh, mt: (bh // hkv, bh % hkv, mt, 0)),
          pl.BlockSpec((None, block_m), lambda bh, mt: (bh // hkv, mt)),
          pl.BlockSpec((None, None, n_blocks, width), lambda bh, mt: (bh // hkv, bh % hkv, 0, 0)),
          pl.BlockSpec((None, n_blocks), lambda bh, mt: (bh // hkv, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, None, n_blocks), lambda bh, mt: (bh // hkv, bh % hkv,
                                                                           mt, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, m_tiles, n_blocks), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="block_relevance",
  )(qg, row_weight.astype(jnp.float32), representatives, block_valid.astype(jnp.int32))
  return jnp.sum(partial, axis=2)


def block_relevance(qg: jax.Array, row_weight: jax.Array, representatives: jax.Array,
                    block_valid: jax.Array, *, bound: bool, scale: float | None = None,
                    implementation: str = "xla", interpret: bool = False) -> jax.Array:
  """qg [B, Hkv, R, D], row_weight [B, R], representatives [B, Hkv, NB, D or 2D (bound)],
  block_valid [B, NB] -> relevance [B, Hkv, NB] float32 (0 at invalid blocks)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  check_inputs(qg, row_weight, representatives, block_valid, bound)
  scale = qg.shape[-1] ** -0.5 if scale is None else float(scale)
  if implementation == "xla":
    return block_relevance_xla(qg, row_weight, representatives, block_valid, bound=bound,
                               scale=scale)
  return block_relevance_pallas(qg, row_weight, representatives, block_valid, bound=bound,
                                scale=scale, interpret=interpret)
