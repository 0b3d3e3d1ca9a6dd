"""float8 e4m3 with per-tensor scales: the number format of the refresh's fp8 options.

Hopper's tensor cores multiply e4m3 at twice the bfloat16 rate. e4m3 is a floating-point
format (3 mantissa bits, normals from 2^-6 to 448), so one scale per tensor only has to keep the
tensor's largest value under 448: relative precision is the same for every normal value. Used
by `dense_attention` (fp8 attention) and `matmul.fp8_matmul` (fp8 projections).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


def scale_for(amax: jax.Array, power_of_two: bool = False) -> jax.Array:
  """The float32 scale that maps |x| <= amax into e4m3: FP8_MAX / amax, or the largest power of
  two not above it (then x * scale and its inverse are exact in any binary float format)."""
  # (an all-zero tensor gets a finite scale: 448 / float32's tiny would overflow, and 0 * inf
  # is NaN)
  scale = FP8_MAX / jnp.maximum(amax.astype(jnp.float32), jnp.float32(2.0 ** -100))
  if power_of_two:  # scale = m * 2^e with m in [0.5, 1): 2^(e - 1), exactly (no log rounding)
    _, e = jnp.frexp(scale)
    scale = jnp.ldexp(jnp.float32(1.0), e - 1)
  return scale


def quantize(x: jax.Array, power_of_two: bool = False) -> tuple[jax.Array, jax.Array]:
  """(x * scale in e4m3, 1 / scale) with one scale for the whole tensor (`scale_for`)."""
  scale = scale_for(jnp.max(jnp.abs(x)), power_of_two)
  return (x.astype(jnp.float32) * scale).astype(FP8), 1.0 / scale
