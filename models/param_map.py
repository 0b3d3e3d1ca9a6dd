"""How an HF checkpoint's tensors map onto the core's parameter tree.

Each family module (llada.py, dream.py) lists its tensors as `TensorSpec`s: the HF name, the path
in our tree, the HF shape, and whether the weight is a torch Linear ([out, in], transposed into
Flax's [in, out]). The converter and the direct HF loader both read these lists; nothing else
knows HF names.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from focus_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  hf_name: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  transpose: bool = False

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape in our tree."""
    return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape


def linear(hf_name: str, path: tuple[str, ...], out_features: int, in_features: int):
  return TensorSpec(hf_name, path + ("kernel",), (out_features, in_features), transpose=True)


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(out, in) of every Linear of one block, by our module name."""
  q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model, cfg.mlp_hidden
  return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
          "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


def build_specs(cfg: ModelConfig, *, embed: str, final_norm: str, lm_head: str,
                layer_prefix: str, norms: dict[str, str], linears: dict[str, str],
                biases: dict[str, str]) -> list[TensorSpec]:
  """Specs for a pre-norm block stack given the family's HF names (per-layer names are relative
  to `layer_prefix.format(i)`)."""
  specs = [TensorSpec(embed, ("embed", "embedding"), (cfg.vocab_size, cfg.d_model))]
  shapes = layer_shapes(cfg)
  for i in range(cfg.n_layers):
    pre, ours = layer_prefix.format(i=i), f"layers_{i}"
    for our_name, hf in norms.items():
      specs.append(TensorSpec(f"{pre}.{hf}", (ours, our_name, "weight"), (cfg.d_model,)))
    for our_name, hf in linears.items():
      specs.append(linear(f"{pre}.{hf}", (ours, our_name), *shapes[our_name]))
    if cfg.qkv_bias:
      for our_name, hf in biases.items():
        specs.append(TensorSpec(f"{pre}.{hf}", (ours, our_name, "bias"), (shapes[our_name][0],)))
  specs.append(TensorSpec(final_norm, ("final_norm", "weight"), (cfg.d_model,)))
  specs.append(linear(lm_head, ("lm_head",), cfg.vocab_size, cfg.d_model))
  return specs


def hf_tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """The expected HF tensors of a checkpoint with this config."""
  from focus_jax.models import dream, llada  # pylint: disable=g-import-not-at-top
  return {"llada": llada.hf_tensor_specs, "dream": dream.hf_tensor_specs}[cfg.family](cfg)


QKV = ("q_proj", "k_proj", "v_proj")


def _fused_columns(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """[..., Hq*D], [..., Hkv*D] twice -> [..., Hkv*(G+2)*D] grouped by KV head (q heads, k, v),
  the layout `transformer._fused_qkv` splits."""
  lead, d = q.shape[:-1], cfg.head_dim
  group = lambda a, n: a.reshape(*lead, cfg.n_kv_heads, n, d)
  fused = jnp.concatenate([group(q, cfg.q_per_kv), group(k, 1), group(v, 1)], axis=-2)
  return fused.reshape(*lead, -1)


def fuse_qkv(cfg: ModelConfig, params: dict, shardings: dict | None = None,
             donate: bool = False) -> dict:
  """The checkpoint layout (q_proj, k_proj, v_proj per layer) -> the `fused_qkv` layout
  (qkv_proj), layer by layer on the device. `shardings`: the fused tree's
  (`sharding.param_shardings` of a `fused_qkv` config); None keeps the default placement.
  `donate`: delete each layer's three input arrays once its fused weight exists, so that at
  most one layer's q|k|v weights exist twice (the input tree's q/k/v arrays become unusable)."""
  if not cfg.fused_qkv:
    raise ValueError("fuse_qkv builds the fused_qkv=True layout; pass that config")
  fusers = {}

  def fuser(sharding):
    if sharding not in fusers:
      fusers[sharding] = jax.jit(functools.partial(_fused_columns, cfg), out_shardings=sharding)
    return fusers[sharding]

  out = dict(params)
  for i in range(cfg.n_layers):
    name = f"layers_{i}"
    layer = dict(params[name])
    missing = [p for p in QKV if p not in layer]
    if missing:
      raise ValueError(f"{name} lacks {missing}: fuse_qkv takes the checkpoint layout "
                       "(q_proj, k_proj, v_proj); were the params fused already?")
    target = None if shardings is None else shardings[name]["qkv_proj"]
    inputs = [layer.pop(p) for p in QKV]
    layer["qkv_proj"] = {
        leaf: fuser(None if target is None else target[leaf])(*(w[leaf] for w in inputs))
        for leaf in inputs[0]}
    if donate:
      jax.block_until_ready(layer["qkv_proj"])
      for w in inputs:
        for array in w.values():
          array.delete()
    out[name] = layer
  return out
