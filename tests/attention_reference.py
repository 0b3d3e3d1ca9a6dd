"""A float64 softmax attention under an explicit key mask: the reference the sparse prompt
attentions (local window, selected blocks) are checked against."""

from __future__ import annotations

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
