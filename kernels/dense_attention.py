"""Dense bidirectional attention, dispatched to the best implementation for the backend.

- GPU: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`.
- elsewhere (CPU, and the fallback): the XLA path below, float32 softmax, GQA by grouping query
  heads (K/V are never repeated in memory).

`implementation` is "auto", "xla" or "cudnn"; "auto" picks by backend and dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite large negative: a fully masked row (a pad query) stays finite instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _resolve(implementation: str, q: jax.Array) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation != "auto":
    return implementation
  if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  key_valid: jax.Array | None = None,
                  query_valid: jax.Array | None = None) -> jax.Array:
  """Reference attention: q [B,T,Hq,D], k/v [B,S,Hkv,D], masks [B,S] / [B,T] -> [B,T,Hq,D]."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  qg = q.reshape(b, t, hkv, g, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
  if key_valid is not None:
    scores = jnp.where(key_valid[:, None, None, None, :], scores, MASK_VALUE)
  if query_valid is not None:
    scores = jnp.where(query_valid[:, None, None, :, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, hq, d).astype(q.dtype)


def cudnn_attention(q, k, v, key_valid=None, query_valid=None):
  mask = None
  if key_valid is not None or query_valid is not None:
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    kv_ok = jnp.ones((b, s), bool) if key_valid is None else key_valid
    q_ok = jnp.ones((b, t), bool) if query_valid is None else query_valid
    # A pad query row keeps its keys: a row with no valid key is undefined in cuDNN.
    mask = kv_ok[:, None, None, :] | ~q_ok[:, None, :, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None,
              query_valid: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
  impl = _resolve(implementation, q)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, key_valid, query_valid)
  return xla_attention(q, k, v, key_valid, query_valid)
