"""The refresh's selected-block prompt attention: against a dense mask built from the blocks it
kept, what it must keep, and the refresh economy option that uses it."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from focus_jax.kernels import selected_attention as sel

from attention_reference import TinyRefresh, dense_everywhere, masked_attention


def inputs(seed, b, s, hq, hkv, d=16):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
               for h in (hq, hkv, hkv))


@pytest.mark.parametrize("s,prefix,chunk,block,keep,n_global,hq,hkv,group_bytes", [
    (300, 260, 32, 16, 0.5, 8, 4, 2, None),    # GQA, a partial last chunk and block, a tail
    (300, 260, 32, 16, 0.5, 8, 4, 2, 1),       # the same, one chunk per lax.map group
    (256, 256, 24, 16, 0.5, 0, 4, 4, None),    # MHA, no tail, no sinks
    (290, 250, 20, 12, 0.5, 20, 6, 2, 10**5),  # groups of several chunks, padded to whole groups
])
def test_selected_prefix_attention_matches_its_mask(s, prefix, chunk, block, keep, n_global,
                                                    hq, hkv, group_bytes):
  q, k, v = inputs(s, 2, s, hq, hkv)
  assert sel.check_selected(prefix, s, chunk, block, keep, n_global) is None
  extra = {} if group_bytes is None else {"max_group_bytes": group_bytes}
  f = jax.jit(functools.partial(sel.selected_prefix_attention, prefix=prefix, chunk=chunk,
                                block=block, keep=keep, n_global=n_global, implementation="xla",
                                return_ids=True, **extra))
  out, ids = f(q, k, v)
  n_keep = sel.kept_blocks(prefix, chunk, block, keep, n_global)
  assert ids.shape == (2, -(-prefix // chunk), hkv, n_keep)
  mask = sel.key_mask(ids, prefix, chunk, block, s)
  np.testing.assert_allclose(np.asarray(out), masked_attention(q, k, v, mask),
                             atol=2e-5, rtol=2e-5)
  # Left padding: pad keys masked for every row, pads never chosen over a valid block.
  key_valid = jnp.asarray(np.arange(s)[None, :] >= np.array([[0], [21]]))
  out, ids = f(q, k, v, key_valid=key_valid, query_valid=key_valid)
  want = masked_attention(q, k, v, sel.key_mask(ids, prefix, chunk, block, s), key_valid)
  rows = np.asarray(key_valid)  # pad query rows are unspecified
  np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5, rtol=2e-5)


def test_kept_blocks_are_distinct_and_hold_the_forced_ones():
  s, prefix, chunk, block, keep, n_global = 520, 512, 64, 16, 0.4, 20
  q, k, v = inputs(0, 2, s, 8, 2)
  _, ids = sel.selected_prefix_attention(q, k, v, prefix=prefix, chunk=chunk, block=block,
                                         keep=keep, n_global=n_global, implementation="xla",
                                         return_ids=True)
  ids = np.asarray(ids)
  forced = sel.forced_blocks(prefix, chunk, block, n_global)
  assert ids.shape[-1] == 13 > forced.sum(axis=1).max()  # ceil(0.4 x 32 blocks), 8 forced
  for c in range(ids.shape[1]):
    want = set(np.flatnonzero(forced[c]))
    # Sinks (blocks 0-1), the chunk's own 4 blocks and a neighbour either side.
    assert {0, 1} <= want and {c * 4 - 1, c * 4 + 4} & set(range(32)) <= want
    for bi in range(2):
      for h in range(2):
        assert len(set(ids[bi, c, h])) == ids.shape[-1]
        assert want <= set(ids[bi, c, h])


def test_a_far_key_one_query_needs_is_kept():
  """One query of a chunk matches a key far outside the window and sinks: its block is kept
  (for that kv head only), where a mean over the chunk's queries would bury it."""
  s, prefix, chunk, block, d = 1024, 1024, 128, 32, 16
  rng = np.random.default_rng(3)
  q = rng.standard_normal((1, s, 2, d)).astype(np.float32) * 0.1
  k = rng.standard_normal((1, s, 2, d)).astype(np.float32) * 0.1
  v = rng.standard_normal((1, s, 2, d)).astype(np.float32)
  needle, asker = 150, 900  # block 4; the asking row sits in chunk 7 (blocks 28-31)
  direction = rng.standard_normal(d).astype(np.float32)
  k[0, needle, 1] = 3 * direction
  q[0, asker, 1] = 3 * direction
  out, ids = sel.selected_prefix_attention(
      *(jnp.asarray(x) for x in (q, k, v)), prefix=prefix, chunk=chunk, block=block, keep=0.25,
      n_global=32, implementation="xla", return_ids=True)
  assert needle // block in set(np.asarray(ids)[0, asker // chunk, 1])
  dense = masked_attention(q, k, v, np.ones((s, s), bool))
  np.testing.assert_allclose(np.asarray(out)[0, asker, 1], dense[0, asker, 1], atol=0.05)


def test_lengths_that_save_nothing_stay_dense():
  assert sel.check_selected(256, 300, 64, 16, 1.0, 8) is not None  # keeps every block
  assert sel.check_selected(80, 100, 64, 16, 0.25, 8) is not None  # the forced blocks are all
  # 6 blocks: chunk 0 is forced to keep 5 and keeps 5, so no block would be chosen by score.
  assert "forced" in sel.check_selected(96, 100, 64, 16, 0.25, 8)
  assert sel.check_selected(160, 170, 32, 16, 0.6, 8) is None  # 6 kept of 10, 5 forced
  assert "keep" in sel.check_selected(512, 520, 64, 16, 0.0, 8)
  q, k, v = inputs(1, 1, 100, 2, 2)
  got = sel.selected_prefix_attention(q, k, v, prefix=80, chunk=64, block=16, keep=0.25,
                                      n_global=8, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), dense_everywhere(q, k, v), atol=2e-5, rtol=2e-5)


def test_refresh_with_selected_prompt_blocks():
  """The option through a real refresh: keep 1 is the dense refresh exactly; a small keep
  changes the deeper prompt K/V (layer 0's depend on the tokens alone); the knobs reach both
  cached modes, and bad ones are refused."""
  from focus_jax.decoding import cache as kv
  from focus_jax.decoding import make_denoiser

  case = TinyRefresh(256)
  everything = kv.RefreshPolicy(prompt_keep=1.0, prompt_chunk=32, prompt_block=16)
  logits, _ = case.refresh(everything)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(case.dense_logits), atol=1e-5)
  sparse = kv.RefreshPolicy(prompt_keep=0.5, prompt_chunk=32, prompt_block=16,
                            prompt_globals=16)  # 8 of 16 blocks, 5 forced
  case.check_sparse(*case.refresh(sparse))
  for mode in ("dual_cache", "focus"):
    d = make_denoiser(case.config, mode, refresh_prompt_keep=0.25, refresh_prompt_chunk=32,
                      refresh_prompt_block=16)
    assert (d.refresh.prompt_keep, d.refresh.prompt_chunk, d.refresh.prompt_block) == (
        0.25, 32, 16)
  with pytest.raises(ValueError, match="prompt_keep"):
    kv.RefreshPolicy(prompt_keep=1.5)
  with pytest.raises(ValueError, match="prompt_chunk"):
    kv.RefreshPolicy(prompt_keep=0.25, prompt_chunk=0)
  with pytest.raises(ValueError, match="choose one"):
    kv.RefreshPolicy(prompt_keep=0.25, prompt_window=64)
  with pytest.raises(ValueError, match="choose one"):
    kv.RefreshPolicy(prompt_keep=0.25, fp8_attention=True)
