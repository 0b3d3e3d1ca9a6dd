"""float8 e4m3 with per-tensor scales: the number format of the refresh's fp8 options.

Hopper's tensor cores multiply e4m3 at twice the bfloat16 rate. e4m3 is a floating-point
format (3 mantissa bits, normals from 2^-6 to 448), so one scale per tensor only has to keep the
tensor's largest value under 448: relative precision is the same for every normal value. Used
by `dense_attention` (fp8 attention) and `matmul.fp8_matmul` (fp8 projections).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focus_jax.kernels import devices

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
# The first NVIDIA GPUs whose tensor cores multiply e4m3 (Ada is 8.9, Hopper 9.0).
FP8_MIN_CAPABILITY = (8, 9)


def check_gpu_supports_fp8(what: str) -> None:
  """Raises, before anything compiles, when the default device is an NVIDIA GPU without fp8
  tensor cores (Ampere, what Colab mostly offers): cuDNN and cuBLASLt would fail deep inside
  the compile. Other backends pass (the CPU and TPU run the emulation or upcast)."""
  device = jax.devices()[0]
  capability = devices.cuda_capability(device)
  if capability is not None and capability < FP8_MIN_CAPABILITY:
    raise ValueError(
        f"{what} needs a GPU with fp8 tensor cores (compute capability >= "
        f"{'.'.join(map(str, FP8_MIN_CAPABILITY))}: Ada or Hopper); this {device.device_kind} is "
        f"{'.'.join(map(str, capability))}. Turn {what} off (the bfloat16 refresh is exact)")


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


def quantize(x: jax.Array, valid: jax.Array | None = None, center: bool = False,
             power_of_two: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [B, T, ...] -> ((x - mean) * scale in e4m3, 1 / scale, mean [B, 1, ...] float32), one
  scale for the whole tensor (`scale_for` of max |x - mean|).

  `center`: mean is x's mean over the valid positions of axis 1 (a sequence), per remaining
  index (else 0). With `valid` [B, T], invalid positions become 0 and set neither the mean nor
  the scale (a pad row must not cost the real ones precision, nor overflow e4m3 into NaN). One
  pass of reductions: per index, max |x - mean| is max(hi - mean, mean - lo), so the largest,
  smallest and the sum are read together, then a second pass writes the e4m3 array."""
  x = x.astype(jnp.float32)
  w = None if valid is None else valid.reshape(valid.shape + (1,) * (x.ndim - 2))
  hi = jnp.max(x if w is None else jnp.where(w, x, -jnp.inf), axis=1, keepdims=True)
  lo = jnp.min(x if w is None else jnp.where(w, x, jnp.inf), axis=1, keepdims=True)
  mean = jnp.zeros_like(hi)
  if center:
    count = x.shape[1] if w is None else jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1)
    mean = jnp.sum(x if w is None else jnp.where(w, x, 0), axis=1, keepdims=True) / count
  scale = scale_for(jnp.maximum(jnp.max(hi - mean), jnp.max(mean - lo)), power_of_two)
  x8 = (x - mean) * scale
  if w is not None:
    x8 = jnp.where(w, x8, 0)
  return x8.astype(FP8), 1.0 / scale, mean
