"""The XLA baseline: gather the selected blocks (and the response window), then dense attention.

This is what a plain JAX implementation does; the Pallas kernels are measured against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focus_jax.kernels.sparse import common


def xla_gather_attention(q, k, v, sel: common.Selection, extra_k, extra_v, extra_valid, *,
                         block_size: int, scale: float, max_response_len: int | None,
                         query_counts: jax.Array | None = None, return_lse: bool = False):
  """q [B,T,Hq,D], k/v [B,S,Hkv,D], normalised selection -> [B,T,Hq,D] (queries t >=
  `query_counts` zeroed); with `return_lse`, also each row's log-sum-exp [B, T, Hq].

  The response keys come from a window of static length `max_response_len` (the whole cache when
  None) starting at response_start, since its runtime length has no static bound otherwise.
  """
  bsz, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g, n = sel.indices.shape[1:]
  bs = block_size
  nb = common.num_blocks(s_len, bs)
  pad = nb * bs - s_len
  kp, vp = k, v
  if pad:  # only when S is not a multiple of the block size
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  kb = kp.reshape(bsz, nb, bs, hkv, d)
  vb = vp.reshape(bsz, nb, bs, hkv, d)
  idx = jnp.broadcast_to(sel.indices, (bsz, hkv, n))
  bi = jnp.arange(bsz)[:, None, None]
  hi = jnp.arange(hkv)[None, :, None]
  ks = kb[bi, idx, :, hi, :]  # [B, Hkv, N, bs, D]
  vs = vb[bi, idx, :, hi, :]
  pos = idx[..., None] * bs + jnp.arange(bs)  # [B, Hkv, N, bs]
  cnt = jnp.broadcast_to(sel.counts, (bsz, hkv))
  ok = ((jnp.arange(n)[None, None, :, None] < cnt[..., None, None])
        & (pos >= sel.prompt_start[:, None, None, None])
        & (pos < sel.response_start[:, None, None, None]))
  ks = ks.reshape(bsz, hkv, n * bs, d)
  vs = vs.reshape(bsz, hkv, n * bs, d)
  ok = ok.reshape(bsz, hkv, n * bs)

  r = s_len if max_response_len is None else min(int(max_response_len), s_len)
  start = jnp.minimum(sel.response_start, s_len - r)
  kr = jax.vmap(lambda x, s0: jax.lax.dynamic_slice_in_dim(x, s0, r, axis=0))(k, start)
  vr = jax.vmap(lambda x, s0: jax.lax.dynamic_slice_in_dim(x, s0, r, axis=0))(v, start)
  rpos = start[:, None] + jnp.arange(r)
  rok = (rpos >= sel.response_start[:, None]) & (rpos < sel.response_end[:, None])

  qg = common.group_queries(q, hkv)  # [B, Hkv, R, D]
  parts = [
      _partial(qg, ks, vs, ok, scale, "bhsd"),
      _partial(qg, kr, vr, jnp.broadcast_to(rok[:, None], (bsz, hkv, r)), scale, "bshd"),
  ]
  if extra_k is not None:
    parts.append(common.dense_partial(qg, extra_k, extra_v, extra_valid, scale))
  return common.finish(parts, t, query_counts, q.dtype, return_lse)


def _partial(qg, k, v, valid, scale, layout: str) -> common.Partial:
  s = jnp.einsum(f"bhrd,{layout}->bhrs", qg, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, initial=common.NEG_INIT)  # (initial: an empty window is no error)
  p = jnp.exp(s - m[..., None])
  acc = jnp.einsum(f"bhrs,{layout}->bhrd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return common.Partial(acc, m, jnp.sum(p, axis=-1))
