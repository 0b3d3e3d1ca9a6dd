"""Device mesh and sharding of parameters and caches.

Parameters carry logical axis names (set in models/transformer.py); `LOGICAL_RULES` maps them to
mesh axes. The default mesh is one device, so every spec resolves to a replicated array; multi-GPU
and TPU pods only need a bigger mesh in the config, not a reshaped model.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from focus_jax.models.config import ModelConfig
from focus_jax.models.transformer import Transformer

MESH_AXES = ("data", "model")
# Tensor parallelism over heads and MLP columns on "model"; batch over "data".
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "model"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
    ("embed", None), ("batch", "data"), ("length", None), ("head_dim", None))


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  need = data * model
  if need > len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {need} devices, "
                     f"only {len(devices)} available ({jax.default_backend()})")
  return Mesh(np.asarray(devices[:need]).reshape(data, model), MESH_AXES)


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
