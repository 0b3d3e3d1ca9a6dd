"""Focus's indicator packs the active positions into query slots: valid slots first, and among
them the I_focus positions, so the block selection scores a prefix of the slots; the fused
selection kernel, fed from those slots, keeps the blocks the XLA selection keeps."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from focus_jax.focus import indicator, pruning


def test_active_slots_put_focus_positions_first():
  rng = np.random.default_rng(0)
  w = 32
  for _ in range(20):
    masked = rng.random((3, w)) < 0.6
    confidence = jnp.asarray(rng.random((3, w)), jnp.float32)
    focus = indicator.focus_set(confidence, jnp.asarray(masked), jnp.asarray([1, 2, 3]), rho=2)
    active = indicator.widen(focus, 5)
    for capacity in (w, 12):
      slots, valid = indicator.active_slots(active, focus, jnp.asarray(masked), capacity)
      slots, valid = np.asarray(slots), np.asarray(valid)
      f, a = np.asarray(focus), np.asarray(active)
      for b in range(3):
        n = int(valid[b].sum())
        assert valid[b, :n].all() and not valid[b, n:].any()  # valid slots first
        in_focus = f[b, slots[b, :n]]
        n_focus = int(in_focus.sum())
        assert in_focus[:n_focus].all() and not in_focus[n_focus:].any()  # focus first
        assert n_focus == min(int(f[b].sum()), capacity)
        assert (np.diff(slots[b, :n_focus]) > 0).all()  # each group in position order
        assert (np.diff(slots[b, n_focus:n]) > 0).all()
        assert set(slots[b, :n]) <= set(np.flatnonzero(a[b]))
        assert n == min(int(a[b].sum()), capacity)


def test_focus_weights_cover_the_focus_prefix():
  focus = jnp.asarray([[True, True, False, False], [False, False, False, False],
                       [True, False, True, False]])
  weight, live = pruning.focus_weights(focus)
  np.testing.assert_allclose(np.asarray(weight), [[0.5, 0.5, 0, 0], [0, 0, 0, 0],
                                                  [0.5, 0, 0.5, 0]])
  np.testing.assert_array_equal(np.asarray(live), [2, 0, 3])  # past the last focus slot: 0


@pytest.mark.parametrize("hq,hkv,capacity", [(4, 4, 16), (28, 4, 16), (28, 4, 3)])
def test_fused_selection_from_packed_slots_keeps_the_xla_blocks(hq, hkv, capacity):
  # capacity 3: fewer slots than focus positions, so every slot is a focus slot.
  rng = np.random.default_rng(1)
  b, w, d, nb = 2, 16, 16, 24
  masked = jnp.asarray(rng.random((b, w)) < 0.7)
  confidence = jnp.asarray(rng.random((b, w)), jnp.float32)
  focus = indicator.focus_set(confidence, masked, jnp.asarray([2, 3]), rho=2)
  slots, valid = indicator.active_slots(indicator.widen(focus, 4), focus, masked, capacity)
  query_focus = valid & jnp.take_along_axis(focus, slots, axis=1)
  q = jnp.asarray(rng.standard_normal((b, capacity, hq, d)), jnp.float32)
  reps = rng.standard_normal((b, hkv, nb, 2 * d))
  reps[..., d:] = np.abs(reps[..., d:])
  block_valid = jnp.asarray(rng.random((b, nb)) < 0.9)
  picked = [pruning.select_prompt_blocks(q, query_focus, jnp.asarray(reps, jnp.float32),
                                         block_valid, alpha=0.4, selection="per_kv_head",
                                         kind="bound", implementation=impl)
            for impl in ("xla", "pallas_gpu")]
  (ref_ids, ref_counts), (ids, counts) = [(np.asarray(i), np.asarray(c)) for i, c in picked]
  np.testing.assert_array_equal(counts, ref_counts)
  for i in range(b):
    for h in range(hkv):
      n = counts[i, h]
      np.testing.assert_array_equal(ids[i, h, :n], np.sort(ref_ids[i, h, :n]))


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_a_padded_row_keeps_alpha_of_its_own_prompt(impl):
  # Row 1 is row 0 behind 8 blocks of left pads: it keeps alpha of its own 16 blocks (7 at
  # alpha 0.4), the same blocks shifted, not alpha of the batch's 24 (10).
  rng = np.random.default_rng(2)
  b, t, hq, hkv, d, nb, pads = 2, 4, 4, 2, 16, 24, 8
  q = rng.standard_normal((1, t, hq, d)).repeat(b, axis=0)
  reps = rng.standard_normal((1, hkv, nb, 2 * d)).repeat(b, axis=0)
  reps[..., d:] = np.abs(reps[..., d:])
  reps[1, :, pads:] = reps[0, :, :nb - pads]
  block_valid = np.ones((b, nb), bool)
  block_valid[0, nb - pads:] = False  # row 0's prompt is 16 blocks too (the rest: unused)
  block_valid[1, :pads] = False
  focus = jnp.asarray([[True, True, False, False]] * b)
  ids, counts = pruning.select_prompt_blocks(
      jnp.asarray(q, jnp.float32), focus, jnp.asarray(reps, jnp.float32),
      jnp.asarray(block_valid), alpha=0.4, selection="per_kv_head", kind="bound",
      implementation=impl)
  ids, counts = np.asarray(ids), np.asarray(counts)
  assert ids.shape == (b, hkv, pruning.kept_blocks(nb, 0.4)) == (b, hkv, 10)
  np.testing.assert_array_equal(counts, pruning.kept_blocks(nb - pads, 0.4))  # 7 for both rows
  for h in range(hkv):
    np.testing.assert_array_equal(np.sort(ids[1, h, :7]), np.sort(ids[0, h, :7]) + pads)
  np.testing.assert_array_equal(np.asarray(pruning.kept_per_row(jnp.asarray(
      [[True] * 24, [False] * 24, [True] + [False] * 23]), 0.4)), [10, 0, 1])


def test_masked_positions_without_confidence_outrank_decoded_ones():
  """A block entered without a refresh has no confidences (-inf everywhere): I_focus takes its
  masked positions in order, never decoded ones, which carry -inf as well."""
  prev = jnp.full((1, 8), -jnp.inf).at[0, 6].set(0.3)
  masked = jnp.asarray([[False, False, False, True, True, True, True, True]])
  got = indicator.focus_set(prev, masked, jnp.asarray([1]), rho=3)
  np.testing.assert_array_equal(np.asarray(got[0]), [0, 0, 0, 1, 1, 0, 1, 0])


def test_slot_logits_land_on_their_window_positions():
  """The sparse step's logits: each valid slot's row at its window position, zero and not
  computed elsewhere (the extra Dream slot w and invalid slots write nothing)."""
  from focus_jax.focus.denoiser import _window_logits_from_slots
  rng = np.random.default_rng(1)
  b, w, v = 3, 8, 5
  slots = np.stack([rng.permutation(w + 1)[:6] for _ in range(b)]).astype(np.int32)
  valid = rng.random((b, 6)) < 0.7
  slot_logits = rng.standard_normal((b, 6, v)).astype(np.float32)
  logits, computed = _window_logits_from_slots(jnp.asarray(slot_logits, jnp.bfloat16),
                                               jnp.asarray(slots), jnp.asarray(valid), w)
  expected = np.zeros((b, w, v), np.float32)
  expected_computed = np.zeros((b, w), bool)
  for r in range(b):
    for a in range(6):
      if valid[r, a] and slots[r, a] < w:
        expected[r, slots[r, a]] = jnp.asarray(slot_logits[r, a], jnp.bfloat16).astype(jnp.float32)
        expected_computed[r, slots[r, a]] = True
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(computed), expected_computed)
  np.testing.assert_array_equal(np.asarray(logits), expected)
  assert expected_computed.any() and not expected_computed.all()
