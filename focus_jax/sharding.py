"""Device mesh and sharding of parameters and caches.

Parameters carry logical axis names (set in models/transformer.py); `LOGICAL_RULES` maps them to
mesh axes. The default mesh is one device, so every spec resolves to a replicated array; multi-GPU
and TPU pods only need a bigger mesh in the config, not a reshaped model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from focus_jax.kernels import partition
from focus_jax.models.config import ModelConfig
from focus_jax.models.transformer import Transformer

MESH_AXES = (partition.BATCH_AXIS, partition.HEADS_AXIS)  # ("data", "model")
# Tensor parallelism over heads and MLP columns on "model"; batch over "data".
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "model"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
    ("embed", None), ("batch", "data"), ("length", None), ("head_dim", None))


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A data x model mesh; over all the devices, laid out by their physical topology (a TPU
  slice's torus, a host's NVLink order)."""
  devices = list(devices if devices is not None else jax.devices())
  need = data * model
  if need > len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {need} devices, "
                     f"only {len(devices)} available ({jax.default_backend()})")
  if jax.process_count() > 1 and need != len(devices):
    raise ValueError(
        f"mesh data={data} x model={model} uses {need} of the {len(devices)} devices of "
        f"{jax.process_count()} hosts: on several hosts every process runs the same program "
        f"over one mesh of all the devices; set data x model = {len(devices)}")
  if need == len(devices) and need > 1:
    for split in (False, True):  # some TPU slices lay out (data, model) only across their axes
      try:
        return Mesh(mesh_utils.create_device_mesh((data, model), devices,
                                                  allow_split_physical_axes=split), MESH_AXES)
      except (NotImplementedError, ValueError, AssertionError):
        continue
    logging.warning("no topology-aware layout for a %d x %d mesh of %s devices: devices in "
                    "id order", data, model, devices[0].platform)
  return Mesh(np.asarray(devices[:need]).reshape(data, model), MESH_AXES)


def check_same_on_every_host(**values: Any) -> None:
  """On several hosts every process passes the same whole batch (the program splits it over the
  mesh's "data" axis) and gets the whole result back: refuses values that differ between the
  processes, which would otherwise decode a mix of their rows silently. Each process shares a
  fixed-size digest of each value (its shape too), so values of different shapes are told
  apart instead of breaking the gather."""
  if jax.process_count() == 1:
    return
  digests = np.stack([_digest(value) for value in values.values()])  # [n, 32]
  every = np.asarray(multihost_utils.process_allgather(digests))  # [processes, n, 32]
  for i, name in enumerate(values):
    if not (every[:, i] == every[0, i]).all():
      raise ValueError(f"{name} differs between the {jax.process_count()} processes: each "
                       "must pass the same whole batch (it is split over the mesh's data "
                       "axis), not its own share")


def _digest(value: Any) -> np.ndarray:
  if value is None:
    return np.frombuffer(hashlib.sha256(b"None").digest(), np.uint8)
  array = np.ascontiguousarray(np.asarray(value))
  head = f"{array.shape}|{array.dtype}|".encode()
  return np.frombuffer(hashlib.sha256(head + array.tobytes()).digest(), np.uint8)


def to_host(x: jax.Array) -> np.ndarray:
  """x as a NumPy array on this process, gathered from the other hosts where it is split."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def kernels_per_device(mesh: Mesh | None):
  """The context to trace a generation in: on several devices, the mesh made current, so that
  the Pallas kernels run per device on their shards (`kernels.partition`) instead of on
  gathered copies; a no-op on one device."""
  if mesh is None or mesh.size == 1:
    return contextlib.nullcontext()
  return jax.set_mesh(mesh)


def check_mesh(config: ModelConfig, mesh: Mesh, batch: int | None = None) -> None:
  """Refuses a mesh that would split a head, a query group from its kv head, or the batch's
  rows unevenly (XLA would pad the shards and move K/V between devices in every attention)."""
  data, model = mesh.shape["data"], mesh.shape["model"]
  if config.n_heads % model or config.n_kv_heads % model:
    fits = [m for m in range(1, config.n_kv_heads + 1)
            if config.n_kv_heads % m == 0 and config.n_heads % m == 0]
    raise ValueError(
        f"mesh model={model} must divide the query heads ({config.n_heads}) and the kv heads "
        f"({config.n_kv_heads}): attention is sharded by heads, and a head or a query group "
        f"cannot be split. Use --config.mesh.model in {fits}, and data for the other devices")
  if batch is not None and batch % data:
    raise ValueError(
        f"batch {batch} is not a multiple of the mesh's data={data} (each data shard decodes "
        f"whole rows): pad the batch to a multiple of {data} (repeat a prompt) or use a data "
        f"axis that divides {batch}")


def abstract_params(config: ModelConfig):
  """Parameter shapes/dtypes with their logical-axis boxes, without allocating anything."""
  model = Transformer(config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  from focus_jax.models.attention import SelfAttention  # pylint: disable=g-import-not-at-top
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, tokens, SelfAttention(),
                         method=Transformer._init_all))  # pylint: disable=protected-access
  return variables["params"]


def param_shardings(config: ModelConfig, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedSharding for every parameter (a pytree shaped like the unboxed params)."""
  boxed = abstract_params(config)
  specs = nn.get_partition_spec(boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def kv_sharding(mesh: Mesh) -> NamedSharding:
  """KV caches are [B, S, Hkv, D]: batch over "data", heads over "model"."""
  return NamedSharding(mesh, P("data", None, "model", None))
