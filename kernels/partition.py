"""Kernels under a device mesh: each device runs its kernel on its own rows and heads.

A Pallas kernel, like any custom call without a partitioning rule, given sharded operands makes
XLA gather them whole onto every device, which then repeats the whole computation. Under a mesh
made current with `jax.set_mesh` (`focus_jax.pipeline` does so for a model on several devices),
the kernels' entry points run their kernel through `shard_map` instead: batch rows over
BATCH_AXIS, heads over HEADS_AXIS (query heads with their kv heads, so a GQA group stays on one
device: `focus_jax.sharding.check_mesh` refuses meshes that would split one). Outside such a
mesh, or already inside `shard_map`, they run as they are. Pure-XLA paths need none of this:
XLA partitions them itself.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec

BATCH_AXIS, HEADS_AXIS = "data", "model"
_AXES = {"rows": BATCH_AXIS, "heads": HEADS_AXIS}


def active_mesh():
  """The current mesh if it spans several devices and no `shard_map` is running; else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  return mesh


def specs(mesh, *, batch: int, kv_heads: int) -> Callable[..., PartitionSpec]:
  """spec(*dims): the PartitionSpec of an array whose dims are "rows", "heads" or None (not
  split), for a call on `batch` rows and `kv_heads` kv heads.

  Rows split only if `batch` divides over BATCH_AXIS, heads only if `kv_heads` divides over
  HEADS_AXIS (query heads go with their kv heads, so a device's query heads are those of its kv
  heads); otherwise, or where the mesh lacks the axis, that dim stays whole on every device:
  e.g. callers that fold the heads into the rows pass one kv head."""
  def axis(dim):
    name = _AXES.get(dim)
    if name is None or name not in mesh.axis_names:
      return None
    size = batch if dim == "rows" else kv_heads
    return name if size % mesh.shape[name] == 0 else None
  return lambda *dims: PartitionSpec(*(axis(d) for d in dims))


def per_device(fn: Callable[..., Any], mesh, in_specs, out_specs) -> Callable[..., Any]:
  """fn run by every device of `mesh` on its shards (None arguments take any spec)."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
