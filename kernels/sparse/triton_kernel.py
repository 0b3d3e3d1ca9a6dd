"""Block-sparse attention on GPU: the same split-KV algorithm hand-written in Triton, called from
JAX through jax_triton (an optional dependency, imported lazily).

Kept as a candidate against the Pallas kernel (`gpu.py`): here the pip Triton compiles the kernel
and the loop is a `tl.range` with explicit software-pipelining depth. Layouts and outputs are the
Pallas kernel's, so the XLA split merge is shared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from focus_jax.kernels.sparse import common


@functools.cache
def _triton_kernel():
  import triton
  import triton.language as tl

  @triton.jit
  def bsa_split_kv(q_ptr, k_ptr, v_ptr, sel_ptr, meta_ptr, acc_ptr, m_ptr, l_ptr, scale,
                   S: tl.constexpr, HKV: tl.constexpr, G_SEL: tl.constexpr, N_SEL: tl.constexpr,
                   ROWS_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, BS: tl.constexpr,
                   BLOCK_M: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    bh = tl.program_id(0)
    mt = tl.program_id(1)
    sp = tl.program_id(2)
    b = bh // HKV
    h = bh % HKV
    g = h if G_SEL > 1 else 0
    r8 = tl.arange(0, 8)
    mv = tl.load(meta_ptr + (b * G_SEL + g) * 8 + r8)  # one vector load of (count, ps, rs, re)
    count = tl.sum(tl.where(r8 == 0, mv, 0))
    ps = tl.sum(tl.where(r8 == 1, mv, 0))
    rs = tl.sum(tl.where(r8 == 2, mv, 0))
    re = tl.sum(tl.where(r8 == 3, mv, 0))
    resp_first = rs // BS
    n_resp = tl.where(re > rs, (re - 1) // BS - resp_first + 1, 0)
    total = count + n_resp
    per = (total + NUM_SPLITS - 1) // NUM_SPLITS
    lo_item = tl.minimum(sp * per, total)
    hi_item = tl.minimum(lo_item + per, total)

    rm = tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    rn = tl.arange(0, BS)
    row0 = (bh * ROWS_PAD + mt * BLOCK_M).to(tl.int64)
    q = tl.load(q_ptr + (row0 + rm[:, None]) * D + rd[None, :])
    kv_base = b.to(tl.int64) * S * HKV * D + h * D
    sel_base = sel_ptr + (b * G_SEL + g) * N_SEL

    acc = tl.zeros((BLOCK_M, D), tl.float32)
    m = tl.full((BLOCK_M,), -1e30, tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    for i in tl.range(lo_item, hi_item, num_stages=STAGES):
      is_sel = i < count
      blk_sel = tl.load(sel_base + tl.minimum(i, N_SEL - 1))
      blk = tl.where(is_sel, blk_sel, resp_first + (i - count))
      start = blk * BS
      lo = tl.where(is_sel, tl.maximum(start, ps), tl.maximum(start, rs))
      hi = tl.where(is_sel, tl.minimum(start + BS, rs), tl.minimum(start + BS, re))
      w = tl.minimum(start, S - BS)
      offs = kv_base + (w + rn).to(tl.int64)[:, None] * (HKV * D) + rd[None, :]
      k = tl.load(k_ptr + offs)
      v = tl.load(v_ptr + offs)
      s = tl.dot(q, tl.trans(k))
      pos = w + rn
      ok = (pos >= lo) & (pos < hi)
      s = tl.where(ok[None, :], s * scale, float("-inf"))
      m_new = tl.maximum(m, tl.max(s, axis=1))
      corr = tl.exp(m - m_new)
      p = tl.exp(s - m_new[:, None])
      l = l * corr + tl.sum(p, axis=1)
      acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v)
      m = m_new
    out_row = ((b * HKV + h) * NUM_SPLITS + sp).to(tl.int64) * ROWS_PAD + mt * BLOCK_M
    tl.store(acc_ptr + (out_row + rm[:, None]) * D + rd[None, :], acc)
    tl.store(m_ptr + out_row + rm, m)
    tl.store(l_ptr + out_row + rm, l)

  return bsa_split_kv


def sparse_partial(qg: jax.Array, k: jax.Array, v: jax.Array, sel: common.Selection, *,
                   block_size: int, scale: float, block_m: int, num_splits: int, num_warps: int,
                   num_stages: int, **unused) -> common.Partial:
  """Same contract as `gpu.sparse_partial`; needs jax_triton and a CUDA GPU."""
  import jax_triton as jt
  del unused
  bsz, hkv, rows, d = qg.shape
  s_len = k.shape[1]
  g, n = sel.indices.shape[1:]
  qg = common.pad_query_rows(qg, block_m)
  rows_pad = qg.shape[2]
  meta = common.kernel_meta(sel.counts, sel, common.live_rows(None, bsz, rows))  # reads 0-3
  shape = (bsz, hkv, num_splits, rows_pad)
  acc, m, l = jt.triton_call(
      qg, k, v, sel.indices.astype(jnp.int32), meta,
      kernel=_triton_kernel(),
      out_shape=[jax.ShapeDtypeStruct(shape + (d,), jnp.float32),
                 jax.ShapeDtypeStruct(shape, jnp.float32),
                 jax.ShapeDtypeStruct(shape, jnp.float32)],
      grid=(bsz * hkv, rows_pad // block_m, num_splits),
      num_warps=num_warps, num_stages=num_stages,
      scale=float(scale), S=s_len, HKV=hkv, G_SEL=g, N_SEL=n, ROWS_PAD=rows_pad,
      NUM_SPLITS=num_splits, BS=block_size, BLOCK_M=block_m, D=d, STAGES=num_stages)
  return common.merge_splits(acc, m, l).first_rows(rows)
