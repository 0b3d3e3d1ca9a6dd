"""Attention sinks reused across layers (Focus-dLLM, mechanism 2).

At the last dense layer the score of key j is S_j = (1/H) sum_h softmax_j(Q_active^h . K_j^h /
sqrt(d)), summed over the active queries; the top-N_sink prompt keys are the step's sinks, and
every later layer reuses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focus_jax.decoding import cache as kv
from focus_jax.kernels import top_k
from focus_jax.kernels.attention_mass import attention_mass
from focus_jax.kernels.dense_attention import MASK_VALUE


def attention_with_sink_scores(q: jax.Array, k: jax.Array, v: jax.Array,
                               key_valid: jax.Array | None, query_valid: jax.Array,
                               prompt_start: jax.Array, prompt_length: int,
                               attention_impl: str = "auto", split_kv_impl: str = "auto"):
  """Dense attention that also returns the sink score of every key.

  q [B, A, Hq, D], k/v [B, S, Hkv, D], key_valid [B, S] (the keys at or after prompt_start),
  query_valid [B, A] (valid slots first) -> (out [B, A, Hq, D], scores [B, S] float32).

  Where dense attention over the cache is the split-KV kernel (GPU, TPU), this is its two-pass
  form: the kernel returns each row's log-sum-exp, and `attention_mass` reads K once more for
  the probabilities' column sums. Elsewhere, one XLA softmax holds the probabilities.
  """
  b, a, hq, d = q.shape
  if kv.uses_split_kv(k, attention_impl):
    counts = jnp.sum(query_valid, axis=1, dtype=jnp.int32)
    out, lse = kv.all_blocks_attention(q, k, v, prompt_start, prompt_length,
                                       implementation=split_kv_impl, query_counts=counts,
                                       return_lse=True)
    return out, attention_mass(q, k, lse, query_valid.astype(jnp.float32) / hq)
  hkv = k.shape[2]
  qg = q.reshape(b, a, hkv, hq // hkv, d)
  logits = jnp.einsum("bahgd,bshd->bhgas", qg, k, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
  if key_valid is not None:
    logits = jnp.where(key_valid[:, None, None, None, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhgas,bshd->bahgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
  per_query = jnp.mean(probs, axis=(1, 2))  # head average: [B, A, S]
  scores = jnp.sum(jnp.where(query_valid[:, :, None], per_query, 0.0), axis=1)
  return out.reshape(b, a, hq, d).astype(q.dtype), scores


def select_sinks(scores: jax.Array, prompt_start: jax.Array, prompt_length: int, n_sink: int):
  """Top-n_sink prompt keys by score: (positions [B, N] int32, valid [B, N] bool)."""
  pos = jnp.arange(scores.shape[1])
  candidate = (pos[None, :] >= prompt_start[:, None]) & (pos[None, :] < prompt_length)
  values, positions = top_k.top_k(jnp.where(candidate, scores, -jnp.inf), n_sink)
  return positions, jnp.isfinite(values)
