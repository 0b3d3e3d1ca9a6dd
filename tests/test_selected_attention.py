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


def test_a_padded_rows_sinks_are_where_its_prompt_begins():
  """With more left pads than a block, the leading blocks hold only pads: they are not kept in
  place of the row's true sinks (its first n_global valid keys, here in block 2, made to score
  low so that only forcing keeps them), which every chunk keeps."""
  s, prefix, chunk, block, keep, n_global = 300, 260, 32, 16, 0.5, 8
  q, k, v = inputs(5, 2, s, 4, 2)
  k = k.at[1, 37:48].multiply(0.01)  # row 1's sink keys: near zero, a low bound
  key_valid = jnp.asarray(np.arange(s)[None, :] >= np.array([[0], [37]]))
  out, ids = sel.selected_prefix_attention(q, k, v, prefix=prefix, chunk=chunk, block=block,
                                           keep=keep, n_global=n_global, key_valid=key_valid,
                                           query_valid=key_valid, implementation="xla",
                                           return_ids=True)
  ids = np.asarray(ids)
  assert (ids[1] == 2).any(axis=-1).all(), ids[1]  # every (chunk, kv head) of row 1
  # Its pad-only blocks are never kept by a chunk with a valid row (chunk 0's rows are all
  # pads: its output is unspecified, its choice immaterial).
  assert not np.isin(ids[1, 1:], [0, 1]).any(), ids[1]
  assert (ids[0] == 0).any(axis=-1).all()  # the unpadded row's sinks: its first block
  want = masked_attention(q, k, v, sel.key_mask(ids, prefix, chunk, block, s), key_valid)
  rows = np.asarray(key_valid)
  np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5, rtol=2e-5)


def test_a_padded_row_keeps_keep_of_its_own_blocks():
  """Row 1 is row 0 behind 128 pads (8 blocks of 16): its chunks keep `keep` of its own 16
  usable blocks, as it would alone, and no more (the static count, 12 of the batch's 24 blocks
  at keep 0.5, is the capacity; the slots past a row's cap come back as -1). The attention
  matches the mask of the ids kept. A row too short to select alone (dense there) keeps every
  usable block within the capacity, not only its forced ones (a local window)."""
  s, prefix, chunk, block, keep, n_global, pads = 400, 384, 64, 16, 0.5, 8, 128
  q, k, v = inputs(9, 2, s, 4, 2)
  key_valid = jnp.asarray(np.arange(s)[None, :] >= np.array([[0], [pads]]))
  out, ids = sel.selected_prefix_attention(q, k, v, prefix=prefix, chunk=chunk, block=block,
                                           keep=keep, n_global=n_global, key_valid=key_valid,
                                           query_valid=key_valid, implementation="xla",
                                           return_ids=True)
  ids = np.asarray(ids)
  n_keep = sel.kept_blocks(prefix, chunk, block, keep, n_global)
  own_count = sel.kept_blocks(prefix - pads, chunk, block, keep, n_global)
  assert ids.shape[-1] == n_keep == 12 and own_count == 8
  assert (ids[0] >= 0).all()  # the unpadded row keeps the static count
  assert ((ids[1] >= 0).sum(-1) == own_count).all() and (ids[1][..., own_count:] == -1).all()
  want = masked_attention(q, k, v, sel.key_mask(ids, prefix, chunk, block, s), key_valid)
  rows = np.asarray(key_valid)
  np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5, rtol=2e-5)
  forced = int(sel.forced_blocks(prefix, chunk, block, n_global).sum(axis=1).max())
  blocks_ok = jnp.arange(24)[None, :] >= jnp.asarray([[0], [8], [14], [16]])  # 24, 16, 10, 8
  caps = np.asarray(sel.kept_per_row(blocks_ok, prefix, chunk, block, keep, n_global))
  assert forced == 7 and sel.check_selected(10 * block, 10 * block, chunk, block, keep,
                                            n_global) is not None  # 10 blocks alone: dense
  np.testing.assert_array_equal(caps, [12, 8, 10, 8])


def test_a_chunks_own_blocks_outrank_sinks_that_pads_spread():
  """Pads among a row's first valid keys spread its sinks over more blocks than the static
  budget counts: the chunk's own blocks and neighbours (which hold valid keys) are still kept,
  the sinks taking what is left (found in review: ties went to the low ids, the sinks)."""
  s, prefix, chunk, block, keep, n_global = 106, 96, 16, 8, 0.44, 5
  assert sel.check_selected(prefix, s, chunk, block, keep, n_global) is None
  q, k, v = inputs(0, 1, s, 2, 1)
  key_valid = np.ones((1, s), bool)
  key_valid[0, 1:13] = False  # sinks: key 0 and keys 13-16, in blocks 0, 1 and 2
  _, ids = sel.selected_prefix_attention(q, k, v, prefix=prefix, chunk=chunk, block=block,
                                         keep=keep, n_global=n_global,
                                         key_valid=jnp.asarray(key_valid),
                                         implementation="xla", return_ids=True)
  ids = np.asarray(ids)[0, :, 0]
  own = sel.own_blocks(prefix, chunk, block)
  usable = key_valid[0, :prefix].reshape(-1, block).any(axis=1)
  for c in range(len(ids)):
    assert set(np.flatnonzero(own[c] & usable)) <= set(ids[c].tolist()), (c, ids[c])
    assert 0 in ids[c]  # the first sink block still fits every chunk's budget


def test_a_padded_rows_forced_blocks_stay_within_the_static_budget():
  """However left pads fall, a row forces no more blocks than the static count that sizes the
  budget (`forced_blocks`): sinks straddling a block boundary keep the first block, so a chunk
  always has a block left to choose (found in review: a straddle filled the whole budget)."""
  s, prefix, chunk, block, keep, n_global = 106, 96, 16, 8, 0.44, 5
  n_keep = sel.kept_blocks(prefix, chunk, block, keep, n_global)
  budget = sel.forced_blocks(prefix, chunk, block, n_global).sum(axis=1)
  own = sel.own_blocks(prefix, chunk, block)
  for pads in range(40):
    key_valid = np.arange(s)[None, :] >= pads
    sinks = np.asarray(sel.sink_blocks(jnp.asarray(key_valid), 1, prefix // block, block,
                                       n_global))[0]
    first = pads // block
    assert sinks[first] and sinks.sum() == 1, (pads, sinks)  # the block of the first valid key
    usable = key_valid[0, :prefix].reshape(-1, block).any(axis=1)
    forced = ((own | sinks) & usable).sum(axis=1)
    assert (forced <= budget).all() and (forced < n_keep).all(), pads


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


def test_a_block_one_row_needs_outranks_a_block_many_rows_like():
  """One free slot a chunk. Every row likes a decoy block a little; one asking row needs a far
  needle block a lot. The asker's chunk keeps the needle (the largest share any row gives),
  the other chunks the decoy; a mean over rows, or the best block's bound alone (every row's
  best ties, and the decoy sits earlier), would keep the decoy everywhere."""
  s, chunk, block, d = 1024, 128, 32, 16
  rng = np.random.default_rng(3)
  e0, e1 = np.eye(d, dtype=np.float32)[:2]
  q = 0.01 * rng.standard_normal((1, s, 1, d)).astype(np.float32) + e1
  k = 0.01 * rng.standard_normal((1, s, 1, d)).astype(np.float32)
  v = rng.standard_normal((1, s, 1, d)).astype(np.float32)
  decoy, needle, asker = 3, 400, 700  # decoy: block 3; needle: block 12; asker: chunk 5
  k[0, decoy * block:(decoy + 1) * block, 0] += e1
  k[0, needle, 0] = 2 * e0
  q[0, asker, 0] = 5 * e0
  _, ids = sel.selected_prefix_attention(
      *(jnp.asarray(x) for x in (q, k, v)), prefix=s, chunk=chunk, block=block, keep=0.25,
      n_global=32, implementation="xla", return_ids=True)
  ids = np.asarray(ids)[0, :, 0]
  assert ids.shape[-1] == 8  # 7 forced: sinks, 4 own blocks, 2 neighbours
  assert needle // block in ids[asker // chunk] and decoy not in ids[asker // chunk]
  for c in (4, 6):  # other chunks with 7 forced blocks, neither of these two
    assert decoy in ids[c] and needle // block not in ids[c]


def test_pad_blocks_are_never_chosen_and_pad_rows_do_not_vote():
  """Left pads: a block of pads is never kept unless forced, whether pads are marked on the
  queries or (LLaDA) only on the keys; pad queries that would ask for a far block do not get
  it kept."""
  s, prefix, chunk, block = 520, 512, 64, 16
  q, k, v = inputs(5, 2, s, 4, 2)
  q, k = np.array(q), np.array(k)
  q[:, :, :, 0] = 0  # channel 0: only the pads' queries use it, and hard ...
  q[1, :40, :, 0] = 50
  k[1, 25 * block:26 * block, :, 0] = 40  # ... to ask for block 25, far from chunk 0
  key_valid = jnp.asarray(np.arange(s)[None, :] >= np.array([[0], [40]]))
  for query_valid in (key_valid, None):
    _, ids = sel.selected_prefix_attention(
        jnp.asarray(q), jnp.asarray(k), v, prefix=prefix, chunk=chunk, block=block, keep=0.4,
        n_global=0, key_valid=key_valid, query_valid=query_valid, implementation="xla",
        return_ids=True)
    forced = sel.forced_blocks(prefix, chunk, block, 0)
    ids = np.asarray(ids)
    for c in range(ids.shape[1]):
      for h in range(2):
        chosen = set(ids[1, c, h]) - set(np.flatnonzero(forced[c]))
        assert not chosen & {0, 1}, (c, h, ids[1, c, h])  # blocks 0-1 are all pads
    # Chunk 0 holds the pad rows: were they voting, block 25 would be its first pick (ids come
    # ranked, the forced ones first).
    for h in range(2):
      first_pick = [i for i in ids[1, 0, h] if not forced[0, i]][0]
      assert first_pick != 25, ids[1, 0, h]


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


def test_groups_keep_the_same_blocks_and_bad_arguments_are_refused():
  q, k, v = inputs(7, 2, 300, 4, 2)
  call = functools.partial(sel.selected_prefix_attention, q, k, v, prefix=260, chunk=32,
                           block=16, keep=0.5, n_global=8, implementation="xla",
                           return_ids=True)
  (whole, ids), (split, split_ids) = call(), call(max_group_bytes=1)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(split_ids))
  np.testing.assert_allclose(np.asarray(whole), np.asarray(split), atol=1e-6)
  for bad, match in ((dict(keep=0.0), "keep"), (dict(chunk=0), "chunk"),
                     (dict(n_global=-1), "n_global"), (dict(prefix=301), "prefix")):
    with pytest.raises(ValueError, match=match):
      call(**bad)
  with pytest.raises(ValueError, match="not a multiple"):
    sel.selected_prefix_attention(q[:, :, :3], k, v, prefix=260, chunk=32, block=16, keep=0.5,
                                  n_global=8)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("group_bytes", [1 << 30, 16 << 20])
def test_extra_bytes_follow_the_compiled_working_set(padded, group_bytes):
  """The memory estimate's term (`extra_bytes`) against XLA's own plan of the call: one group of
  chunks, K/V laid out head-major; what it leaves out is the dense rows' float32 scores."""
  b, s, hq, hkv, d = 1, 8192 + 64, 8, 2, 64
  kw = dict(prefix=8192, chunk=512, block=128, keep=0.25, n_global=64,
            max_group_bytes=group_bytes, implementation="xla")
  q = jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
  mask = (jax.ShapeDtypeStruct((b, s), bool),) if padded else ()
  call = lambda q, k, v, *m: sel.selected_prefix_attention(
      q, k, v, key_valid=m[0] if m else None, **kw)
  temp = jax.jit(call).lower(q, k, k, *mask).compile().memory_analysis().temp_size_in_bytes
  estimate = sel.extra_bytes(b, s, hq, hkv, d, jnp.bfloat16, padded=padded, **kw)
  assert 0.7 * temp < estimate < 1.3 * temp, (estimate, temp)
  # Lengths that save nothing stay dense and add nothing.
  assert sel.extra_bytes(b, 300, hq, hkv, d, jnp.bfloat16, padded=padded,
                         **dict(kw, prefix=256)) == 0


def test_padded_rows_reach_cudnn_as_lengths_of_valid_first_keys(monkeypatch):
  """With pad keys the gathered keys go valid first and cuDNN gets each row's valid count (its
  padding mask) instead of a mask: emulated here by XLA attention over the first
  `key_value_seq_lengths` keys, the answer is the masked reference's (pads anywhere, not only
  leading)."""
  from focus_jax.kernels import dense_attention as da
  masks = []  # the masks cuDNN was given, by the batch of its call

  def cudnn_by_lengths(q, k, v, mask=None, key_value_seq_lengths=None, implementation=None):
    masks.append((q.shape[0], mask is not None))
    if mask is not None:  # the response rows' dense call (its mask is the same for each row)
      return da.xla_attention(q, k, v, mask[:, 0, 0, :])
    return da.xla_attention(q, k, v, jnp.arange(k.shape[1]) < key_value_seq_lengths[:, None])

  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_by_lengths)
  s, prefix, chunk, block = 300, 260, 32, 16
  q, k, v = inputs(11, 2, s, 4, 2)
  rng = np.random.default_rng(3)
  key_valid = np.arange(s)[None, :] >= np.array([[0], [37]])  # left pads ...
  key_valid[0, rng.choice(prefix, 30, replace=False)] = False  # ... and pads anywhere
  key_valid = jnp.asarray(key_valid)
  out, ids = sel.selected_prefix_attention(q, k, v, prefix=prefix, chunk=chunk, block=block,
                                           keep=0.5, n_global=8, key_valid=key_valid,
                                           implementation="cudnn", return_ids=True)
  # The chunks' call (2 sequences x 2 kv heads x 9 chunks) takes lengths, no mask.
  assert sorted(masks) == [(2, True), (2 * 2 * 9, False)], masks
  want = masked_attention(q, k, v, sel.key_mask(ids, prefix, chunk, block, s), key_valid)
  rows = np.asarray(key_valid)
  np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5, rtol=2e-5)
