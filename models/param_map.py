"""How an HF checkpoint's tensors map onto the core's parameter tree.

Each family module (llada.py, dream.py) names its HF tensors; `build_specs` turns them into
`TensorSpec`s: the path in our tree, the HF tensor(s) and shape(s) it is made of, and whether they
are torch Linears ([out, in], transposed into Flax's [in, out]). q, k and v become one fused
parameter. The converter, the direct HF loader and the HF exporter all read these lists; nothing
else knows HF names.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from focus_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One parameter of ours and the HF tensor(s) it is made of.

  Most parameters are one HF tensor. The fused q|k|v projection is three (`kv_groups` set): in
  our orientation q [.., Hq*D], k and v [.., Hkv*D] interleave per KV head into
  [.., Hkv, g + 2, D] (the g query heads of the group, then its k, then its v).
  """

  hf_names: tuple[str, ...]
  path: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  transpose: bool = False  # torch Linear [out, in] -> Flax [in, out], per HF tensor
  kv_groups: tuple[int, int, int] | None = None  # (Hkv, g, head_dim) of a fused q|k|v

  @property
  def hf_parts(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(zip(self.hf_names, self.hf_shapes))

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape in our tree."""
    shapes = [tuple(reversed(s)) if self.transpose else s for s in self.hf_shapes]
    if self.kv_groups is None:
      return shapes[0]
    hkv, g, d = self.kv_groups
    return shapes[0][:-1] + (hkv, g + 2, d)

  def assemble(self, parts: list[np.ndarray]) -> np.ndarray:
    """Our parameter from its HF tensors, each already in our orientation (transposed)."""
    if self.kv_groups is None:
      return parts[0]
    hkv, g, d = self.kv_groups
    q, k, v = (p.reshape(p.shape[:-1] + (hkv, -1, d)) for p in parts)
    return np.concatenate([q, k, v], axis=-2)

  def split(self, value: np.ndarray) -> list[np.ndarray]:
    """The inverse of `assemble`: the HF tensors (in our orientation) of a parameter."""
    if self.kv_groups is None:
      return [value]
    g = self.kv_groups[1]
    lead = value.shape[:-3]
    return [p.reshape(lead + (-1,)) for p in np.split(value, [g, g + 1], axis=-2)]


def tensor(hf_name: str, path: tuple[str, ...], hf_shape: tuple[int, ...],
           transpose: bool = False) -> TensorSpec:
  return TensorSpec((hf_name,), path, (hf_shape,), transpose)


def linear(hf_name: str, path: tuple[str, ...], out_features: int, in_features: int):
  return tensor(hf_name, path + ("kernel",), (out_features, in_features), transpose=True)


QKV = ("q_proj", "k_proj", "v_proj")


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(out, in) of every HF Linear of one block, by the name of its role."""
  q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model, cfg.mlp_hidden
  return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
          "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


def build_specs(cfg: ModelConfig, *, embed: str, final_norm: str, lm_head: str,
                layer_prefix: str, norms: dict[str, str], linears: dict[str, str],
                biases: dict[str, str]) -> list[TensorSpec]:
  """Specs for a pre-norm block stack given the family's HF names (per-layer names are relative
  to `layer_prefix.format(i)`; `linears` and `biases` are keyed by role, q/k/v fused here)."""
  specs = [tensor(embed, ("embed", "embedding"), (cfg.vocab_size, cfg.d_model))]
  shapes = layer_shapes(cfg)
  groups = (cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim)
  for i in range(cfg.n_layers):
    pre, ours = layer_prefix.format(i=i), f"layers_{i}"
    for our_name, hf in norms.items():
      specs.append(tensor(f"{pre}.{hf}", (ours, our_name, "weight"), (cfg.d_model,)))
    specs.append(TensorSpec(tuple(f"{pre}.{linears[r]}" for r in QKV),
                            (ours, "qkv_proj", "kernel"), tuple(shapes[r] for r in QKV),
                            transpose=True, kv_groups=groups))
    if cfg.qkv_bias:
      specs.append(TensorSpec(tuple(f"{pre}.{biases[r]}" for r in QKV),
                              (ours, "qkv_proj", "bias"), tuple(shapes[r][:1] for r in QKV),
                              kv_groups=groups))
    for our_name, hf in linears.items():
      if our_name not in QKV:
        specs.append(linear(f"{pre}.{hf}", (ours, our_name), *shapes[our_name]))
  specs.append(tensor(final_norm, ("final_norm", "weight"), (cfg.d_model,)))
  specs.append(linear(lm_head, ("lm_head",), cfg.vocab_size, cfg.d_model))
  return specs


def hf_tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """The expected HF tensors of a checkpoint with this config."""
  from focus_jax.models import dream, llada  # pylint: disable=g-import-not-at-top
  return {"llada": llada.hf_tensor_specs, "dream": dream.hf_tensor_specs}[cfg.family](cfg)
