"""Writes trained parameters as a LLaDA Hugging Face checkpoint directory.

config.json with LLaDA's own keys (model_type "llada"), bf16 safetensors under LLaDA's tensor
names (from `hf_tensor_specs`, Linear weights transposed back to torch's [out, in]), sharded so
no file exceeds `max_shard_bytes`, with model.safetensors.index.json, plus the tokenizer files.
Loading it goes through the same path as a downloaded LLaDA checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from focus_jax.checkpoints_convert import safetensors_io as st
from focus_jax.models.config import ModelConfig
from focus_jax.models.param_map import hf_tensor_specs
from focus_jax.training import tokenizer_files


def llada_config_json(cfg: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """config.json in LLaDA's key names (as GSAI-ML/LLaDA-8B-* ship it)."""
  if cfg.family != "llada" or cfg.n_heads * cfg.head_dim != cfg.d_model:
    raise ValueError("export writes LLaDA configs with head_dim = d_model / n_heads")
  out = {
      "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": cfg.d_model,
      "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers,
      "mlp_hidden_size": cfg.mlp_hidden, "mlp_ratio": cfg.mlp_hidden // cfg.d_model,
      "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size, "rope": True,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
      "max_sequence_length": cfg.max_sequence_length, "mask_token_id": cfg.mask_token_id,
      "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
      "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
      "activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms",
      "attention_layer_norm": False, "torch_dtype": "bfloat16"}
  out.update(extra or {})
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def export_hf(params, cfg: ModelConfig, out_dir: str, max_shard_bytes: int = 15 << 20,
              extra_config: dict[str, Any] | None = None) -> list[str]:
  """Writes the checkpoint; returns the files written (relative to out_dir)."""
  if cfg.fused_qkv:
    raise ValueError("export_hf writes the HF layout (q_proj, k_proj, v_proj); these params are "
                     "fused_qkv=True: export the unfused params (load with fused_qkv=False)")
  os.makedirs(out_dir, exist_ok=True)
  tensors = []
  for spec in hf_tensor_specs(cfg):
    arr = np.asarray(_get(params, spec.path), np.float32)
    if arr.shape != spec.shape:
      raise ValueError(f"{spec.hf_name}: parameter shape {arr.shape} != expected {spec.shape}")
    if spec.transpose:
      arr = arr.T
    tensors.append((spec.hf_name, np.ascontiguousarray(arr.astype(ml_dtypes.bfloat16))))
  shards, cur, size = [], [], 0
  for name, arr in tensors:
    if cur and size + arr.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append((name, arr))
    size += arr.nbytes
  shards.append(cur)
  files, weight_map, total = [], {}, 0
  for s, shard in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1
             else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
    by_name = dict(shard)
    st.write_safetensors(os.path.join(out_dir, fname),
                         [(n, a.shape, a.dtype) for n, a in shard],
                         lambda n, buf, r0, by_name=by_name: buf.__setitem__(
                             slice(None), by_name[n][r0:r0 + len(buf)]),
                         metadata={"format": "pt"})
    files.append(fname)
    for n, a in shard:
      weight_map[n] = fname
      total += a.nbytes
  if len(shards) > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    files.append("model.safetensors.index.json")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(llada_config_json(cfg, extra_config), f, indent=2)
  tokenizer_files.save_tokenizer(out_dir)
  return files + ["config.json", "tokenizer.json", "tokenizer_config.json"]
