"""The refresh's local-prefix attention against a dense mask built from its definition, and the
refresh economy option that uses it."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from focus_jax.kernels import local_attention as la

from attention_reference import TinyRefresh, dense_everywhere, masked_attention


@pytest.mark.parametrize("s,prefix,window,n_global", [
    (200, 160, 32, 8),     # prefix a multiple of the chunk (16)
    (211, 171, 32, 8),     # a partial last chunk
    (190, 150, 48, 0),     # no global keys
    (96, 96, 16, 4),       # no tail: the prefix is the whole sequence
])
def test_local_prefix_attention_matches_its_mask(s, prefix, window, n_global):
  rng = np.random.default_rng(s)
  b, hq, hkv, d = 2, 4, 2, 16
  q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
             for h in (hq, hkv, hkv))
  mask = la.key_mask(s, prefix, window, n_global)
  # The definition: every prefix row sees the globals, exactly `window` other keys, the tail.
  assert np.all(mask[:prefix].sum(axis=1) == n_global + window + (s - prefix))
  assert np.all(mask[prefix:])
  assert np.all(mask[np.arange(prefix), np.arange(prefix)])  # a row sees its own key
  f = jax.jit(functools.partial(la.local_prefix_attention, prefix=prefix, window=window,
                                n_global=n_global, implementation="xla"))
  np.testing.assert_allclose(np.asarray(f(q, k, v)), masked_attention(q, k, v, mask),
                             atol=2e-5, rtol=2e-5)
  # Left padding (fewer pads than globals, and more): pad keys masked for every row, and a
  # row's globals are its first valid keys.
  for pads in (5, 37):
    key_valid = np.arange(s)[None, :] >= np.array([[0], [pads]])
    padded_mask = la.key_mask(s, prefix, window, n_global, key_valid)
    assert (padded_mask[0] == mask).all()  # the unpadded row: the plain definition
    globals_1 = padded_mask[1, pads + window // 2 + 3]  # a prefix row of row 1, past its pads
    assert globals_1[pads:pads + n_global].all() and not globals_1[:pads].any()
    got = f(q, k, v, key_valid=jnp.asarray(key_valid), query_valid=jnp.asarray(key_valid))
    want = masked_attention(q, k, v, np.broadcast_to(padded_mask[:, None], (b, hkv, s, s)))
    rows = key_valid  # pad query rows are unspecified
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=2e-5, rtol=2e-5)


def test_short_prefix_stays_dense_and_windows_stay_inside():
  assert la.check_local(100, 120, 64, 8) is not None  # 100 < 8 + 96
  assert la.check_local(200, 220, 64, 8) is None
  starts = la.chunk_windows(prefix=1000, window=128, n_global=16)
  assert starts.min() >= 16 and starts.max() + 128 <= 1000
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 120, 2, 16)), jnp.float32) for _ in range(3))
  got = la.local_prefix_attention(q, k, v, prefix=100, window=64, n_global=8,
                                  implementation="xla")
  np.testing.assert_allclose(np.asarray(got), dense_everywhere(q, k, v), atol=2e-5, rtol=2e-5)


def test_refresh_with_a_local_prompt_window():
  """The option through a real refresh: a window too large for the prompt falls back to the
  dense refresh exactly; a small one changes the deeper prompt K/V (layer 0's depend on the
  tokens alone); the knobs reach both cached modes, and bad ones are refused."""
  from focus_jax.decoding import cache as kv
  from focus_jax.decoding import make_denoiser

  case = TinyRefresh(192)
  wide = kv.RefreshPolicy(prompt_window=128, prompt_globals=64)
  logits, _ = case.refresh(wide)
  assert la.check_local(192, case.canvas.length, 128, 64) is not None  # too short: stays dense
  np.testing.assert_allclose(np.asarray(logits), np.asarray(case.dense_logits), atol=1e-5)
  local = kv.RefreshPolicy(prompt_window=32, prompt_globals=8)
  case.check_sparse(*case.refresh(local))  # deeper prompt K/V see a local context only
  for mode in ("dual_cache", "focus"):
    d = make_denoiser(case.config, mode, refresh_prompt_window=32, refresh_prompt_globals=8)
    assert d.refresh.prompt_window == 32
  with pytest.raises(ValueError, match="prompt_window"):
    kv.RefreshPolicy(prompt_window=33)
  with pytest.raises(ValueError, match="prompt_globals"):
    kv.RefreshPolicy(prompt_window=32, prompt_globals=-1)
