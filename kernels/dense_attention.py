"""Dense bidirectional attention, dispatched to the best implementation for the backend.

- GPU: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`.
- TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the MQA kernel
  vmapped over kv heads (GQA without repeated K/V), pad keys masked through segment ids. "auto"
  takes it when the query and key lengths are multiples of 128 and there are at least 128 queries
  (a refresh); a few queries over a long cache stay on XLA, where splash's [heads, seq, d] layout
  would cost a transpose of the whole cache for little compute.
- elsewhere (CPU, and the fallback): the XLA path below, float32 softmax, GQA by grouping query
  heads (K/V are never repeated in memory).

`implementation` is "auto", "xla", "cudnn" or "splash"; "auto" picks by backend, dtype and shape.
Rows whose keys are all masked are unspecified except on the XLA path (uniform over the keys).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite large negative: a fully masked row (a pad query) stays finite instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128


def _splash_fits(q: jax.Array, k: jax.Array) -> bool:
  return (q.shape[1] % SPLASH_BLOCK == 0 and k.shape[1] % SPLASH_BLOCK == 0
          and q.shape[1] >= SPLASH_BLOCK)


def _resolve(implementation: str, q: jax.Array, k: jax.Array | None = None) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if backend == "tpu" and k is not None and _splash_fits(q, k):
    return "splash"
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


def _block(n: int) -> int:
  for b in (512, 256, 128):
    if n % b == 0:
      return b
  raise ValueError(f"splash attention needs lengths that are multiples of {SPLASH_BLOCK}, got {n}")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     key_valid: jax.Array | None = None, query_valid: jax.Array | None = None,
                     interpret: bool = False) -> jax.Array:
  """TPU splash attention: q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D]; pad query rows unspecified.

  `interpret=True` runs the kernel in Pallas interpret mode (tests on CPU).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  del query_valid  # pad query rows keep the valid keys; their outputs are ignored downstream
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  bq, bkv = _block(t), _block(s)
  mask = sm.MultiHeadMask([sm.FullMask((t, s)) for _ in range(g)])
  kernel = sk.make_splash_mqa_single_device(
      mask, block_sizes=sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv),
      interpret=interpret)
  scale = 1.0 / float(d) ** 0.5
  qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
  kh = k.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
  vh = v.transpose(0, 2, 1, 3)
  if key_valid is None:
    per_head = lambda qq, kk, vv: kernel(qq, kk, vv)
    out = jax.vmap(jax.vmap(per_head))(qh, kh, vh)
  else:
    seg = sk.SegmentIds(q=jnp.zeros((b, t), jnp.int32),
                        kv=jnp.where(key_valid, 0, 1).astype(jnp.int32))
    per_head = lambda qq, kk, vv, sg: kernel(qq, kk, vv, segment_ids=sg)
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qh, kh, vh, seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None,
              query_valid: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
  impl = _resolve(implementation, q, k)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, key_valid, query_valid)
  if impl == "splash":
    return splash_attention(q, k, v, key_valid, query_valid,
                            interpret=jax.default_backend() != "tpu")
  return xla_attention(q, k, v, key_valid, query_valid)
