"""The two-pass top-k gives `lax.top_k`'s values and indices exactly, ties and -inf included."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from focus_jax.kernels import top_k


@pytest.mark.parametrize("n,k,chunk", [(16640, 32, 1024), (5000, 7, 256), (1000, 32, 64),
                                       (300, 4, 128), (1000, 64, 64)])
def test_two_pass_top_k_is_lax_top_k(n, k, chunk):
  rng = np.random.default_rng(n)
  for trial in range(6):
    x = rng.standard_normal((2, 3, n)).astype(np.float32)
    if trial == 1:  # many ties: few distinct values
      x = np.round(x * 2) / 2
    if trial == 2:  # most entries -inf (non-candidates), fewer finite ones than k in row 0
      x[..., rng.random(n) < 0.9] = -np.inf
      x[0, 0] = -np.inf
      x[0, 0, [5, n - 1]] = 1.0
    if trial == 3:  # all equal: the lowest indices, in order
      x[:] = 0.25
    if trial == 4:  # NaNs of both signs (a CPU's invalid operations give -NaN)
      x[..., rng.random(n) < 0.3] = np.nan
      x[..., rng.random(n) < 0.3] = -np.nan
      x[0, 0] = -np.nan  # a row of nothing else
      assert np.signbit(x[0, 0]).all()
    if trial == 5:  # bfloat16 ties
      x = np.asarray(jnp.asarray(x, jnp.bfloat16))
    dtype = jnp.bfloat16 if trial == 5 else jnp.float32
    got = top_k.top_k(jnp.asarray(x, dtype), k, chunk=chunk)
    want = lax.top_k(jnp.asarray(x, dtype), k)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32).view(np.int32),
                                  np.asarray(want[0], np.float32).view(np.int32))  # NaN bits too
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert got[1].dtype == jnp.int32


def test_bad_inputs_are_refused():
  with pytest.raises(TypeError, match="floating"):
    top_k.top_k(jnp.arange(10), 2)
  with pytest.raises(ValueError, match="must be in"):
    top_k.top_k(jnp.zeros((4,)), 5)
