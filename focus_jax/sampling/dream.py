"""Dream's sampler (`diffusion_generate` of Dream-v0) as an `UnmaskRule` for the shared loop.

Timesteps t_i = linspace(1, eps, steps+1). `origin`: each masked position is committed with
probability 1 - s/t (all on the last step). The confidence algorithms commit the top
int(n_masked * (1 - s/t)) masked positions by `maskgit_plus` (top probability), `topk_margin`
(top1 - top2) or `entropy` (negative entropy); with `alg_temp` the positions are sampled from
softmax(confidence / alg_temp) without replacement instead. Tokens are argmax at temperature 0,
else sampled after temperature, top_p and top_k.

The reference runs the whole generation as one block; with `block_length < gen_length` the same
schedule runs per block with steps/num_blocks steps (the semi-autoregressive form Fast-dLLM
uses for Dream; Fast-dLLM's own Dream port differs in first-step details we do not copy).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from focus_jax.sampling import common

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclasses.dataclass(frozen=True)
class DreamRule:
  steps_per_block: int
  block_length: int
  alg: str = "entropy"
  eps: float = 1e-3
  temperature: float = 0.0
  top_p: float | None = None
  top_k: int | None = None
  alg_temp: float | None = None
  threshold: float | None = None

  def __post_init__(self):
    if self.alg not in ALGORITHMS:
      raise ValueError(f"alg must be one of {ALGORITHMS}, got {self.alg!r}")
    if self.steps_per_block < 1:
      raise ValueError(f"steps per block must be >= 1, got {self.steps_per_block}")
    if self.threshold is not None and self.alg == "origin":
      raise ValueError("threshold parallel decoding needs a confidence algorithm, not 'origin'")
    if self.threshold is not None and not 0 < self.threshold <= 1:
      raise ValueError(f"threshold is a probability in (0, 1], got {self.threshold}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")

  def _timesteps(self) -> np.ndarray:
    return common.torch_linspace_f32(1.0, self.eps, self.steps_per_block + 1)

  def _counts(self) -> np.ndarray:
    """Unmask counts per step. All rows hold the same number of masks at every step (each step
    commits the same count in every row), so the reference's batch mean is that number and the
    schedule is static."""
    ts = self._timesteps()
    remaining, counts = np.float32(self.block_length), []
    for i in range(self.steps_per_block):
      if i < self.steps_per_block - 1:
        n = int(remaining * (np.float32(1) - ts[i + 1] / ts[i]))
      else:
        n = int(remaining)
      counts.append(n)
      remaining = np.float32(remaining - n)
    return np.asarray(counts, np.int32)

  def block_schedule(self, masked):
    return jnp.zeros((), jnp.int32)  # static; nothing to compute per block

  def planned_unmask(self, schedule, step, masked):
    b = masked.shape[0]
    if self.threshold is not None:
      return jnp.minimum(masked.sum(axis=1), 1).astype(jnp.int32)
    if self.alg == "origin":
      ts = jnp.asarray(self._timesteps())
      i = jnp.minimum(step, self.steps_per_block - 1)
      p = jnp.where(i < self.steps_per_block - 1, 1.0 - ts[i + 1] / ts[i], 1.0)
      return jnp.ceil(masked.sum(axis=1) * p).astype(jnp.int32)
    counts = jnp.asarray(self._counts())
    planned = jnp.broadcast_to(counts[jnp.minimum(step, self.steps_per_block - 1)], (b,))
    return common.planned_or_rest(planned, step, self.steps_per_block, masked)

  def max_planned_unmask(self, block_length):
    if self.threshold is not None:
      return 1
    if self.alg == "origin":  # its last step plans every mask left
      return block_length
    return int(max(self._counts()))

  def _sample(self, rng, logits):
    """(confidence, x0, probability of x0) per position, as the reference's sample_tokens."""
    if self.temperature > 0:
      logits = logits / self.temperature
    if self.top_p is not None and self.top_p < 1:
      logits = common.top_p_filter(logits, self.top_p)
    if self.top_k is not None:
      logits = common.top_k_filter(logits, self.top_k)
    probs = jax.nn.softmax(logits, axis=-1)
    if self.temperature > 0:
      x0 = jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)
      probability = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    else:
      x0 = jnp.argmax(probs, axis=-1).astype(jnp.int32)
      probability = jnp.max(probs, axis=-1)
    confidence = probability
    if self.alg == "topk_margin":
      top2 = jax.lax.top_k(probs, 2)[0]
      confidence = top2[..., 0] - top2[..., 1]
    elif self.alg == "entropy":
      confidence = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    return confidence, x0, probability

  def apply(self, rng, logits, tokens, masked, schedule, step):
    sample_rng, position_rng = jax.random.split(rng)
    confidence, x0, probability = self._sample(sample_rng, logits)
    last = step >= self.steps_per_block - 1
    if self.alg == "origin":
      ts = jnp.asarray(self._timesteps())
      i = jnp.minimum(step, self.steps_per_block - 1)
      p_transfer = jnp.where(last, 1.0, 1.0 - ts[jnp.minimum(i + 1, self.steps_per_block)] / ts[i])
      flip = masked & (jax.random.uniform(position_rng, masked.shape) < p_transfer)
      return jnp.where(flip, x0, tokens), jnp.where(masked, confidence, common.NEG_INF)
    if self.threshold is not None:
      # Fast-dLLM's Dream threshold decoding (its `confidence_threshold` algorithm) ranks and
      # thresholds by x0's probability, whatever `alg` says: an entropy never reaches 0.9, and
      # the one position committed when none passes is the most probable one.
      confidence = jnp.where(masked, probability, common.NEG_INF)
      transfer = common.select_threshold(confidence, self.threshold, masked)
      return jnp.where(transfer, x0, tokens), confidence
    confidence = jnp.where(masked, confidence, common.NEG_INF)
    count = self.planned_unmask(schedule, step, masked)
    if self.alg_temp:
      # Sampling positions without replacement from softmax(conf / alg_temp) = top-k of
      # Gumbel-perturbed log-probabilities.
      scores = jax.nn.log_softmax(confidence / self.alg_temp, axis=-1)
      scores = scores + jax.random.gumbel(position_rng, scores.shape)
      transfer = common.select_top(scores, count, masked)
    else:
      transfer = common.select_top(confidence, count, masked)
    return jnp.where(transfer, x0, tokens), confidence
