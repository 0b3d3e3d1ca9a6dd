"""LLaDA's masked-diffusion SFT objective.

Per sequence a mask ratio t ~ U(0, 1) is drawn (stratified over the batch; p_mask = (1 - eps) t + eps, as LLaDA does, so no
row is left without a chance of masks); every response token is masked independently with
probability p_mask; the prompt stays clean. The loss is the cross-entropy on the masked response
tokens weighted by 1 / p_mask, summed per row and divided by the row's response length (LLaDA's
SFT normalisation: eos padding counts as response), then averaged over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-3


def mask_response(key: jax.Array, tokens: jax.Array, response: jax.Array, mask_id: int,
                  eps: float = EPS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(noisy tokens [B, L], masked [B, L] bool, p_mask [B]).

  `response` [B, L] bool marks the response tokens (the only ones ever masked).
  """
  k_t, k_p, k_m = jax.random.split(key, 3)
  b = tokens.shape[0]
  # Low-discrepancy draw (as MDLM): the rows' t are (i + u) / B in a random order, so every
  # row's t is still U(0, 1) but the batch covers [0, 1) evenly, which tames the variance of the
  # 1/t weight.
  t = (jax.random.permutation(k_p, b) + jax.random.uniform(k_t, ())) / b
  p_mask = (1.0 - eps) * t + eps
  masked = (jax.random.uniform(k_m, tokens.shape) < p_mask[:, None]) & response
  return jnp.where(masked, mask_id, tokens), masked, p_mask


def sft_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array, p_mask: jax.Array,
             response_len: jax.Array) -> jax.Array:
  """Scalar loss. logits [B, T, V] float32 over T positions (e.g. the response region), targets
  and masked [B, T], p_mask [B], response_len [B] (tokens of each row's response)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  per_row = jnp.sum(jnp.where(masked, ce, 0.0), axis=-1) / p_mask
  return jnp.mean(per_row / response_len)
