"""What the sparse prompt attentions (local window, selected blocks) are checked against: a
float64 softmax attention under an explicit key mask, and a tiny model's dense refresh."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def masked_attention(q, k, v, mask, key_valid=None):
  """q [B, S, Hq, D], k/v [B, S, Hkv, D]; mask [S, S] (every head) or [B, Hkv, S, S] (per
  sequence and kv head), and pad keys [B, S] -> float64 [B, S, Hq, D]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s, hq, d = q.shape
  g = hq // k.shape[2]
  mask = np.asarray(mask)
  out = np.zeros(q.shape)
  for bi in range(b):
    for h in range(hq):
      sc = q[bi, :, h] @ k[bi, :, h // g].T / np.sqrt(d)
      m = mask if mask.ndim == 2 else mask[bi, h // g]
      if key_valid is not None:
        m = m & np.asarray(key_valid)[bi][None, :]
      sc = np.where(m, sc, -np.inf)
      p = np.exp(sc - sc.max(axis=1, keepdims=True))
      out[bi, :, h] = (p / p.sum(axis=1, keepdims=True)) @ v[bi, :, h // g]
  return out


def dense_everywhere(q, k, v):
  """The reference of a call that stays dense: every row sees every key."""
  s = q.shape[1]
  return masked_attention(q, k, v, np.ones((s, s), bool))


@dataclasses.dataclass
class TinyRefresh:
  """A random tiny model's canvas (a `prompt_length` prompt, gen 32, block 16) and its dense
  refresh, to run a refresh policy against."""
  prompt_length: int

  def __post_init__(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from focus_jax import presets  # pylint: disable=g-import-not-at-top
    from focus_jax.sampling import loop  # pylint: disable=g-import-not-at-top
    self.config = presets.preset("tiny")
    self.params = presets.random_params(self.config, 0)
    prompt = jnp.asarray(np.random.default_rng(1).integers(
        0, self.config.vocab_size - 2, (1, self.prompt_length)), jnp.int32)
    self.canvas = loop.make_canvas(prompt, None, 32, 16, self.config.mask_token_id)
    self.dense_logits, self.dense_cache = self.refresh(None)

  def refresh(self, policy) -> tuple[Any, Any]:
    """(window logits, KVCache) of a refresh at the first block under `policy`."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from focus_jax.decoding import cache as kv  # pylint: disable=g-import-not-at-top
    cache = kv.KVCache.empty(self.config, 1, self.canvas.length)
    return kv.refresh(self.config, self.params, self.canvas, cache,
                      jnp.int32(self.canvas.prompt_length), 16, policy=policy)

  def check_sparse(self, logits, cache) -> None:
    """A sparse prompt policy's refresh: finite logits of the dense shape; layer 0's K/V equal
    the dense ones (they depend on the tokens alone), the last layer's prompt K/V differ."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    assert logits.shape == self.dense_logits.shape and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(np.asarray(cache.k[0]), np.asarray(self.dense_cache.k[0]),
                               atol=1e-6)
    prompt = slice(0, self.prompt_length)
    change = cache.k[-1][:, prompt] - self.dense_cache.k[-1][:, prompt]
    assert float(jnp.max(jnp.abs(change))) > 1e-3
