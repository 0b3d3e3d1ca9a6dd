"""Block-sparse attention on TPU: a Pallas Mosaic-TPU kernel with a scalar-prefetched block list.

Grid (batch, kv head, item). The item table (selected prompt blocks, then the blocks covering the
response range, padded by repeating the last block so the pipeline issues no new DMA) is
scalar-prefetched into SMEM, and the K/V BlockSpec index maps read it to pick the next block. The
cache is viewed as [B, S, Hkv*D] (a free reshape), so a K tile is a [block_size, D] block: 8x128
tiling needs block_size % 8 == 0 (16 for 16-bit types) and D % 128 == 0 (or a single kv head).
Flash-style accumulation in VMEM scratch over the item axis ("arbitrary"); padded items skip the
compute with `pl.when`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from focus_jax.kernels.sparse import common

LANES = 128


def supported(q_shape, k_shape, dtype, block_size: int) -> str | None:
  d = q_shape[-1]
  s_len, hkv = k_shape[1], k_shape[2]
  sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
  if block_size % sub:
    return f"block_size {block_size} is not a multiple of {sub} (TPU sublane tiling)"
  if d % LANES and hkv > 1:
    return f"head dim {d} is not a multiple of {LANES} (TPU lane tiling)"
  if s_len % block_size:
    return f"cache length {s_len} is not a multiple of block_size {block_size}"
  return None


def item_table(sel: common.Selection, hkv: int, n_items: int, block_size: int):
  """[B*G*n_items] block ids and [B*G*2] (count, total) for the scalar prefetch (1-D: SMEM pads)."""
  bsz, g, n = sel.indices.shape
  first, n_resp = common.response_blocks(sel.response_start, sel.response_end, block_size)
  i = jnp.arange(n_items, dtype=jnp.int32)
  cnt = sel.counts[..., None]  # [B, G, 1]
  total = cnt + n_resp[:, None, None]
  sel_blk = jnp.take_along_axis(sel.indices, jnp.clip(i, 0, n - 1)[None, None].repeat(bsz, 0)
                                .repeat(g, 1), axis=-1)
  resp_blk = first[:, None, None] + (i - cnt)
  blk = jnp.where(i < cnt, sel_blk, resp_blk)
  last = jnp.take_along_axis(blk, jnp.maximum(total - 1, 0), axis=-1)
  last = jnp.where(total > 0, last, 0)
  blk = jnp.where(i < total, blk, last).astype(jnp.int32)
  meta = jnp.concatenate([cnt, total], axis=-1).astype(jnp.int32)
  return blk.reshape(-1), meta.reshape(-1)


def _kernel(items_ref, meta_ref, ranges_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref,
            m_sc, l_sc, acc_sc, *, block_size: int, n_items: int, groups: int, scale: float):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  gi = b * groups + (h if groups > 1 else 0)
  count = meta_ref[2 * gi]
  total = meta_ref[2 * gi + 1]

  @pl.when(i == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, common.NEG_INIT, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(i < total)
  def _compute():
    ps = ranges_ref[3 * b]
    rs = ranges_ref[3 * b + 1]
    re = ranges_ref[3 * b + 2]
    blk = items_ref[gi * n_items + i]
    start = blk * block_size
    is_sel = i < count
    lo = jnp.where(is_sel, jnp.maximum(start, ps), jnp.maximum(start, rs))
    hi = jnp.where(is_sel, jnp.minimum(start + block_size, rs), jnp.minimum(start + block_size, re))
    q = q_ref[...]
    k = k_ref[...]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    pos = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where((pos >= lo) & (pos < hi), s * scale, -jnp.inf)
    m_prev = m_sc[...]  # [rows, 128], lanes replicated
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    corr = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, :1])
    l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    v = v_ref[...]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    acc_sc[...] = acc_sc[...] * corr[:, :1] + pv

  @pl.when(i == n_items - 1)
  def _store():
    acc_ref[...] = acc_sc[...]
    m_ref[...] = m_sc[...]
    l_ref[...] = l_sc[...]


def sparse_partial(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection, *,
                   block_size: int, scale: float, n_resp_blocks: int,
                   interpret=False) -> common.Partial:
  """qg [B, Hkv, R, D], k/v [B, S, Hkv, D] -> partial over the selection and the response."""
  bsz, hkv, rows, d = qg.shape
  s_len = k.shape[1]
  g, n = sel.indices.shape[1:]
  sub = 16 if qg.dtype.itemsize == 2 else 8
  rows_pad = -(-rows // sub) * sub
  if rows_pad != rows:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
  n_items = n + n_resp_blocks
  items, meta = item_table(sel, hkv, n_items, block_size)
  ranges = jnp.stack([sel.prompt_start, sel.response_start, sel.response_end], -1).reshape(-1)
  k2 = k.reshape(bsz, s_len, hkv * d)
  v2 = v.reshape(bsz, s_len, hkv * d)

  def kv_map(b, h, i, items_ref, meta_ref, ranges_ref):
    gi = b * g + (h if g > 1 else 0)
    return (b, items_ref[gi * n_items + i], h)

  def row_map(b, h, i, *_):
    return (b, h, 0, 0)

  kernel = functools.partial(_kernel, block_size=block_size, n_items=n_items, groups=g,
                             scale=scale)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(bsz, hkv, n_items),
      in_specs=[
          pl.BlockSpec((None, None, rows_pad, d), row_map),
          pl.BlockSpec((None, block_size, d), kv_map),
          pl.BlockSpec((None, block_size, d), kv_map),
      ],
      out_specs=[
          pl.BlockSpec((None, None, rows_pad, d), row_map),
          pl.BlockSpec((None, None, rows_pad, LANES), row_map),
          pl.BlockSpec((None, None, rows_pad, LANES), row_map),
      ],
      scratch_shapes=[pltpu.VMEM((rows_pad, LANES), jnp.float32),
                      pltpu.VMEM((rows_pad, LANES), jnp.float32),
                      pltpu.VMEM((rows_pad, d), jnp.float32)],
  )
  acc, m, l = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((bsz, hkv, rows_pad, d), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hkv, rows_pad, LANES), jnp.float32),
                 jax.ShapeDtypeStruct((bsz, hkv, rows_pad, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_tpu",
  )(items, meta, ranges, qg, k2, v2)
  return common.Partial(acc[:, :, :rows], m[:, :, :rows, 0], l[:, :, :rows, 0])
