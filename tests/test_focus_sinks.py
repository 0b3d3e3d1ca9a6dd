"""Focus's sink scores: the split-KV two-pass form (attention's lse, then the attention mass)
equals the one-softmax XLA form, and the sinks are the top prompt keys by score."""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp

from focus_jax.decoding import cache as kv
from focus_jax.focus import sinks


def _case(seed=0, b=2, a=6, hq=8, hkv=2, d=32, prompt=96, gen=32):
  rng = np.random.default_rng(seed)
  s = prompt + gen
  q = jnp.asarray(rng.standard_normal((b, a, hq, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
  prompt_start = jnp.asarray([0, 20], jnp.int32)  # row 1 is left-padded
  key_valid = jnp.arange(s)[None, :] >= prompt_start[:, None]
  query_valid = jnp.arange(a)[None, :] < jnp.asarray([[a], [4]])  # valid slots first
  return q, k, v, key_valid, query_valid, prompt_start, prompt


def test_two_pass_scores_equal_the_softmax_scores(monkeypatch):
  q, k, v, key_valid, query_valid, prompt_start, prompt = _case()
  out1, scores1 = sinks.attention_with_sink_scores(q, k, v, key_valid, query_valid,
                                                   prompt_start, prompt)
  assert not kv.uses_split_kv(k)  # the CPU takes the XLA softmax ...
  monkeypatch.setattr(kv, "uses_split_kv", lambda *_: True)  # ... force the two-pass form
  out2, scores2 = sinks.attention_with_sink_scores(q, k, v, key_valid, query_valid,
                                                   prompt_start, prompt)
  valid = np.asarray(query_valid)[..., None, None]
  np.testing.assert_allclose(np.where(valid, out2, 0), np.where(valid, out1, 0), atol=1e-5)
  keys = np.asarray(key_valid)
  np.testing.assert_allclose(np.where(keys, scores2, 0), np.where(keys, scores1, 0),
                             rtol=1e-4, atol=1e-6)
  # Per head and valid query the probabilities sum to one: the scores (head means) sum to the
  # number of valid queries.
  np.testing.assert_allclose(np.sum(np.where(keys, scores2, 0), axis=1), [6, 4], rtol=1e-5)


def test_select_sinks_takes_the_top_prompt_keys():
  scores = jnp.asarray([[5.0, 1.0, 4.0, 3.0, 9.0, 8.0], [7.0, 6.0, 1.0, 2.0, 3.0, 9.0]])
  positions, valid = sinks.select_sinks(scores, jnp.asarray([0, 1]), 4, 2)
  # Keys 4 and 5 are the response (not candidates); row 1's key 0 is padding.
  np.testing.assert_array_equal(positions, [[0, 2], [1, 3]])
  assert bool(jnp.all(valid))
  positions, valid = sinks.select_sinks(scores, jnp.asarray([0, 3]), 4, 2)
  np.testing.assert_array_equal(valid, [[True, True], [True, False]])  # one candidate only
