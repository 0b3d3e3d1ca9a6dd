"""LLaDA's sampler (`generate` of ML-GSAI/LLaDA) as an `UnmaskRule` for the shared loop.

Per step: x0 = argmax of the (Gumbel-perturbed) logits; confidence = softmax(logits)[x0]
(`low_confidence`) or uniform noise (`random`); the top-k masked positions of the block by
confidence are committed, k from the linear schedule. With `threshold` set, Fast-dLLM's parallel
decoding replaces the schedule: every masked position with confidence >= threshold, at least one.
The low-confidence score carried and ranked is -log(1 - p) (`common.certainty`), which orders
as p does but keeps near-certain positions apart in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from focus_jax.sampling import common

REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class LLaDARule:
  """Static sampler settings; hashable, so a change means a new compile and nothing else does."""

  steps_per_block: int
  eos_token_id: int
  eot_token_id: int | None
  temperature: float = 0.0
  remasking: str = "low_confidence"
  threshold: float | None = None
  # Appendix B.4 of LLaDA: forbid <|endoftext|> as a prediction.
  logits_eos_inf: bool = False
  # As in the reference code: after x0 is chosen, <|eot_id|>'s logit is set to -inf before the
  # confidence softmax, so eot predictions get zero confidence. The reference also blanks eos in
  # the noisy logits, which at temperature 0 are the logits themselves (its add_gumbel_noise
  # returns its input): there eos predictions get zero confidence too.
  confidence_eos_eot_inf: bool = False

  def __post_init__(self):
    if self.remasking not in REMASKING:
      raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
    if self.steps_per_block < 1:
      raise ValueError(f"steps per block must be >= 1, got {self.steps_per_block}")
    if self.threshold is not None and not 0 < self.threshold <= 1:
      raise ValueError(f"threshold is a probability in (0, 1], got {self.threshold}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.confidence_eos_eot_inf and self.eot_token_id is None:
      raise ValueError("confidence_eos_eot_inf needs the model config's eot_token_id")

  def block_schedule(self, masked):
    return common.llada_transfer_schedule(masked.sum(axis=1).astype(jnp.int32),
                                          self.steps_per_block)

  def planned_unmask(self, schedule, step, masked):
    if self.threshold is not None:
      return jnp.minimum(masked.sum(axis=1), 1).astype(jnp.int32)
    planned = jax.lax.dynamic_index_in_dim(schedule, jnp.minimum(step, self.steps_per_block - 1),
                                           axis=1, keepdims=False)
    return common.planned_or_rest(planned, step, self.steps_per_block, masked)

  def max_planned_unmask(self, block_length):
    if self.threshold is not None:
      return 1
    return -(-block_length // self.steps_per_block)  # the schedule's first counts

  def apply(self, rng, logits, tokens, masked, schedule, step):
    noise_rng, remask_rng = jax.random.split(rng)
    if self.logits_eos_inf:
      logits = logits.at[..., self.eos_token_id].set(common.NEG_INF)
    x0 = common.gumbel_argmax(noise_rng, logits, self.temperature)
    if self.confidence_eos_eot_inf:
      blanked = [self.eot_token_id] + ([self.eos_token_id] if self.temperature == 0 else [])
      logits = logits.at[..., jnp.asarray(blanked)].set(common.NEG_INF)
    if self.remasking == "low_confidence":
      # -log(1 - softmax(logits)[x0]): ranks as the probability does, near-certain ones too
      x0_score = common.certainty(logits, x0)
      threshold = None if self.threshold is None else common.certainty_threshold(self.threshold)
    else:
      x0_score = jax.random.uniform(remask_rng, x0.shape, jnp.float32)
      threshold = self.threshold
    confidence = jnp.where(masked, x0_score, common.NEG_INF)
    if threshold is not None:
      transfer = common.select_threshold(confidence, threshold, masked)
    else:  # (past the schedule: every candidate)
      transfer = common.select_top(confidence, self.planned_unmask(schedule, step, masked),
                                   masked)
    return jnp.where(transfer, x0, tokens), confidence
