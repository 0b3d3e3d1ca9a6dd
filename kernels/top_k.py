"""`lax.top_k` over a long last axis, in two short passes.

On a GPU, XLA runs a top-k of k = 32 as a full sort of the row: Focus's sinks (the top 32 of
16-33K key scores a row) took four sort launches, 64 us a step at Dream-7B batch 8, 16K (H100,
`profile_step_h100_dream_b8_16k_gather.json`). The top k of every chunk of `chunk` entries holds
the row's top k, so two top-ks over short rows (chunks, then the chunks' survivors) give the
same values and indices, ties included: `lax.top_k` keeps the lower index first, and the
survivors stay in chunk order, so an earlier chunk's entry still precedes a later one's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CHUNK = 1024  # entries a first-pass row holds (one shared-memory sort on a GPU)


def _lowest(dtype) -> jax.Array:
  """The float whose bits are all ones: a negative NaN, the lowest value in the total order
  `lax.top_k` sorts by (below -inf and every other negative NaN)."""
  bits = jnp.dtype(dtype).itemsize * 8
  return lax.bitcast_convert_type(jnp.asarray(-1, jnp.dtype(f"int{bits}")), dtype)


def top_k(x: jax.Array, k: int, chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  """(values, indices int32) of the k largest entries along x's last axis, as `lax.top_k`
  gives them (descending, ties to the lower index, NaNs where its total order puts them).
  Float x only: the tail chunk is padded with the lowest value of that order, which loses its
  ties to real entries by its higher indices."""
  n = x.shape[-1]
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"top_k pads with a float NaN, so it takes floating scores, got {x.dtype}")
  if not 1 <= k <= n:
    raise ValueError(f"k = {k} must be in [1, {n}] (the last axis)")
  if k > chunk or n <= 2 * chunk:  # one pass is as short as two would be
    values, indices = lax.top_k(x, k)
    return values, indices.astype(jnp.int32)
  lead = x.shape[:-1]
  n_chunks = -(-n // chunk)
  padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, n_chunks * chunk - n)],
                   constant_values=_lowest(x.dtype))
  values, indices = lax.top_k(padded.reshape(*lead, n_chunks, chunk), k)
  indices = indices + (jnp.arange(n_chunks, dtype=indices.dtype) * chunk)[:, None]
  values, survivor = lax.top_k(values.reshape(*lead, n_chunks * k), k)
  indices = jnp.take_along_axis(indices.reshape(*lead, n_chunks * k), survivor, axis=-1)
  return values, indices.astype(jnp.int32)
