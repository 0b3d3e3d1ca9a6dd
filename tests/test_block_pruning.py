"""Focus's prompt-block representatives: the Quest box bound really bounds every key's logit, is
exact for a one-key block, and ranks first the block that holds one strongly matching key
among noise, where the mean key ranks it by the block's average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focus_jax.focus import pruning


def _keys(seed: int, b=2, length=96, hkv=2, d=16):
  return jax.random.normal(jax.random.key(seed), (b, length, hkv, d), jnp.float32)


@pytest.mark.parametrize("seed", range(3))
def test_bound_is_an_upper_bound_on_every_key_logit(seed):
  k = _keys(seed)
  rep, valid = pruning.representative_keys(k, None, prompt_length=80, block_size=16,
                                           kind="bound")
  assert rep.shape == (2, 2, 5, 32) and bool(valid.all())  # head-major
  q = jax.random.normal(jax.random.key(100 + seed), (2, 16), jnp.float32)  # one query per head
  centre, radius = rep[..., :16], rep[..., 16:]
  bound = jnp.einsum("hd,bhnd->bnh", q, centre) + jnp.einsum("hd,bhnd->bnh", jnp.abs(q), radius)
  logits = jnp.einsum("hd,blhd->blh", q, k[:, :80]).reshape(2, 5, 16, 2)
  np.testing.assert_array_less(np.asarray(logits.max(axis=2)), np.asarray(bound) + 1e-4)


def test_bound_is_exact_for_a_single_key_and_skips_invalid_keys():
  k = _keys(1, b=1, length=20)
  key_valid = jnp.zeros((1, 20), bool).at[0, 3].set(True)  # block 0 holds one valid key
  rep, valid = pruning.representative_keys(k, key_valid, prompt_length=20, block_size=10,
                                           kind="bound")
  np.testing.assert_array_equal(np.asarray(valid), [[True, False]])
  np.testing.assert_allclose(np.asarray(rep[0, :, 0, :16]), np.asarray(k[0, 3]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(rep[0, :, 0, 16:]), 0.0, atol=1e-6)


def test_one_matching_key_ranks_its_block_first_under_bound_not_mean():
  d, block = 16, 32
  rng = np.random.default_rng(0)
  target = rng.normal(size=d).astype(np.float32)
  target /= np.linalg.norm(target)
  k = rng.normal(scale=0.3, size=(1, 8 * block, 1, d)).astype(np.float32)
  k[0, :block, 0] += 1.0 * target  # block 0: every key leans towards the query a little
  k[0, 5 * block + 7, 0] = 6.0 * target  # block 5: one key matches strongly
  q = jnp.asarray(4.0 * target)[None, None, None, :]  # [B, A, Hq, D]
  focus = jnp.ones((1, 1), bool)
  ranked = {}
  for kind in ("bound", "mean"):
    rep, valid = pruning.representative_keys(jnp.asarray(k), None, 8 * block, block, kind)
    rel = pruning.block_relevance(q, focus, rep, valid, "per_kv_head", kind)
    ranked[kind] = int(jnp.argmax(rel[0, 0]))
  assert ranked == {"bound": 5, "mean": 0}
