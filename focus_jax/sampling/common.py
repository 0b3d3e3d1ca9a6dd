"""Pieces shared by the LLaDA and Dream samplers: schedules, token choice, position choice.

All functions are pure and shape-static so they run inside one `lax.while_loop`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


def llada_transfer_schedule(num_masked: jax.Array, steps: int) -> jax.Array:
  """LLaDA's per-step unmask counts: [B] masked counts -> [B, steps].

  Linear noise schedule: n // steps each step, plus one for the first n % steps steps.
  """
  base = num_masked // steps
  remainder = num_masked % steps
  return base[:, None] + (jnp.arange(steps)[None, :] < remainder[:, None]).astype(jnp.int32)


def torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
  """`torch.linspace(start, end, num)` in float32, bit-for-bit (it fills from both ends).

  Dream's unmask counts are int(n * (1 - s/t)) on these values, so an ulp matters at integers.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if num == 1:
    return np.array([start32], np.float32)
  step = np.float32((end32 - start32) / np.float32(num - 1))
  half = num // 2
  out = np.empty(num, np.float32)
  for i in range(num):
    # torch's kernel uses a fused multiply-add: one rounding, emulated in float64.
    if i < half:
      out[i] = np.float32(np.float64(start32) + np.float64(step) * i)
    else:
      out[i] = np.float32(np.float64(end32) - np.float64(step) * (num - 1 - i))
  return out


def rank_descending(scores: jax.Array) -> jax.Array:
  """Rank of every entry within its row (0 = largest); ties keep the lower index first."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def select_top(confidence: jax.Array, count: jax.Array, candidates: jax.Array) -> jax.Array:
  """Boolean [B, W]: the `count[b]` highest-confidence candidates of each row."""
  scores = jnp.where(candidates, confidence, NEG_INF)
  return (rank_descending(scores) < count[:, None]) & candidates


def planned_or_rest(planned: jax.Array, step: jax.Array, steps_per_block: int,
                    masked: jax.Array) -> jax.Array:
  """A rule's planned count [B] while the block's schedule lasts; past it, every mask left (a
  block outlives its schedule only when a step committed less than planned, e.g. a predicted
  mask token): the block then finishes, and Focus runs every position it needs (a schedule's
  last count can be 0)."""
  return jnp.where(step < steps_per_block, planned, masked.sum(axis=1, dtype=jnp.int32))


def certainty(logits: jax.Array, x0: jax.Array) -> jax.Array:
  """-log(1 - p) for p = softmax(logits)[x0], [B, W] float32: monotone in p (so it ranks as p
  does, and p >= tau iff it is >= -log1p(-tau)), 0 where p = 0, and exact near p = 1, where p
  itself rounds to 1.0 in float32 for logit gaps above ~17: near-certain positions would tie
  and commit left to right, where LLaDA's float64 reference (and Fast-dLLM's) orders them.
  softplus(l[x0] - logsumexp of the other logits) is that quantity with no cancellation."""
  logits = logits.astype(jnp.float32)
  x0_logit = jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0]
  vocab = jnp.arange(logits.shape[-1])
  others = jax.nn.logsumexp(jnp.where(vocab == x0[..., None], -jnp.inf, logits), axis=-1)
  return jnp.nan_to_num(jax.nn.softplus(x0_logit - others), nan=0.0)


def certainty_threshold(threshold: float) -> float:
  """The `certainty` a probability threshold corresponds to."""
  return -math.log1p(-threshold) if threshold < 1 else math.inf


def select_threshold(confidence: jax.Array, threshold: float, candidates: jax.Array) -> jax.Array:
  """Fast-dLLM's parallel decoding: every candidate whose confidence is >= threshold (on the
  confidence's own scale: a probability, or `certainty_threshold` of one), and always the most
  confident candidate of a row that has any."""
  scores = jnp.where(candidates, confidence, NEG_INF)
  top = rank_descending(scores) == 0
  return candidates & (top | (confidence >= threshold))


def exponential_from_bits(bits: jax.Array) -> jax.Array:
  """Exponential(1) draws -log(u) from two uint32 words per draw (`bits` [2, ...]), u = 1 - v
  with v on a 2^-46 grid (23 bits of each word): the Gumbel noise -log(-log u) then reaches
  about 32.6, where float32 uniforms (a 2^-23 grid) stop at 15.9. LLaDA's reference draws in
  float64 (up to about 36.7) because that tail decides how often low-probability tokens are
  sampled; float32 uniforms lose a visible share of it at LLaDA's vocabulary."""
  hi = (bits[0] >> 9).astype(jnp.float32)
  lo = (bits[1] >> 9).astype(jnp.float32)
  step = jnp.float32(2.0 ** -23)
  v = (hi + (lo + 0.5) * step) * step  # in (0, 1): never 0 (no infinite noise)
  v = jnp.minimum(v, jnp.float32(1.0) - step)  # rounding must not reach 1 (log1p(-1) = -inf)
  return -jnp.log1p(-v)


def gumbel_argmax(rng: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
  """argmax of LLaDA's exp(l) / (-log u)^T, computed in log space: l - T * log(-log u).

  The reference does this in float64 to avoid overflow of exp(l) and to keep the noise's tail;
  the log form needs no exp, and `exponential_from_bits` keeps the tail in float32 (random
  draws differ from torch's anyway).
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  bits = jax.random.bits(rng, (2, *logits.shape), jnp.uint32)
  return jnp.argmax(logits - temperature * jnp.log(exponential_from_bits(bits)),
                    axis=-1).astype(jnp.int32)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Keep the smallest prefix of tokens (by probability) whose mass reaches top_p."""
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  remove_sorted = cumulative > top_p
  remove_sorted = jnp.concatenate(
      [jnp.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], axis=-1)
  remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(remove, jnp.finfo(logits.dtype).min, logits)


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
  top_k = min(top_k, logits.shape[-1])
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits < kth, jnp.finfo(logits.dtype).min, logits)


def window(x: jax.Array, start: jax.Array, length: int) -> jax.Array:
  """x[:, start:start+length] for a traced start."""
  return jax.lax.dynamic_slice_in_dim(x, start, length, axis=1)


def set_window(x: jax.Array, start: jax.Array, values: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(x, values, start, axis=1)
