"""Loading parameters onto the target devices: from a converted checkpoint or straight from HF.

Both paths produce the plain (unboxed) parameter dict `Transformer` uses, every array placed with
the sharding `focus_jax.sharding.param_shardings` gives it, and both go one part / one tensor at a
time, so host memory never holds the whole model.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm.auto import tqdm

from focus_jax import sharding as sharding_lib
from focus_jax.checkpoints_convert import convert as conv
from focus_jax.checkpoints_convert import safetensors_io as st
from focus_jax.models.config import ModelConfig, from_hf_config
from focus_jax.models.param_map import hf_tensor_specs


def _get_path(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def load_checkpoint(ckpt_dir: str, mesh: Mesh | None = None,
                    dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Restores a converted checkpoint onto `mesh` (default: `make_mesh()`).

  `dtype` ("float32" / "bfloat16") casts on restore; None keeps the stored dtype. The returned
  config's dtype is the dtype of the returned params.
  """
  manifest = conv.read_manifest(ckpt_dir)
  # A checkpoint holds the HF projections; `pipeline.load(fused_qkv=True)` fuses after loading.
  config = conv.read_config(ckpt_dir).replace(fused_qkv=False)
  if dtype is not None:
    conv.np_dtype(dtype)
    config = config.replace(dtype=dtype)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh()
  shardings = sharding_lib.param_shardings(config, mesh)
  parts = conv.group_by_part(hf_tensor_specs(config))
  if list(parts) != list(manifest["parts"]):
    raise ValueError(f"{ckpt_dir}: the manifest lists parts {manifest['parts']} but "
                     f"model_config.json implies {list(parts)}; the checkpoint is corrupt, "
                     "convert it again")
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  params: dict[str, Any] = {}
  for part, specs in parts.items():
    path = os.path.abspath(os.path.join(ckpt_dir, conv.PARAMS_DIR, part))
    target: dict[str, Any] = {}
    for spec in specs:
      conv.set_path(target, spec.path[1:], jax.ShapeDtypeStruct(
          spec.shape, config.jnp_dtype, sharding=_get_path(shardings, spec.path)))
    try:
      params[part] = checkpointer.restore(path, args=ocp.args.StandardRestore(target))
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise ValueError(f"{ckpt_dir}: cannot restore part {part!r} ({type(e).__name__}: {e}); "
                       "the checkpoint is incomplete or corrupt, convert it again") from e
  checkpointer.close()
  return config, params


def load_hf(hf_dir: str, mesh: Mesh | None = None, dtype: str = "bfloat16",
            progress: bool = False) -> tuple[ModelConfig, dict]:
  """Loads an HF safetensors checkpoint directly, tensor by tensor, onto `mesh`.

  Same validation as the converter (every bad tensor named before anything is read).
  """
  config, tensors, specs = conv.read_checked_hf(hf_dir, dtype)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh()
  shardings = sharding_lib.param_shardings(config, mesh)
  dst = conv.np_dtype(dtype)
  params: dict[str, Any] = {}
  for spec in tqdm(specs, desc="load", unit="tensor", disable=not progress):
    arr = st.read_tensor(tensors[spec.hf_name], dst, spec.transpose)
    conv.set_path(params, spec.path, jax.device_put(arr, _get_path(shardings, spec.path)))
    del arr
  return config, params


def is_converted_dir(path: str) -> bool:
  return os.path.exists(conv.manifest_path(path))


def is_hf_dir(path: str) -> bool:
  return (os.path.exists(os.path.join(path, "config.json"))
          and bool(glob.glob(os.path.join(path, "*.safetensors"))))


def read_model_config(path: str) -> ModelConfig:
  """The ModelConfig of a converted checkpoint or an HF dir, without reading any weight."""
  _check_model_dir(path)
  return conv.read_config(path) if is_converted_dir(path) else from_hf_config(path)


def _check_model_dir(path: str) -> None:
  """Raises, naming the fix, unless path is a converted checkpoint or an HF checkpoint dir."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory; pass a converted checkpoint dir or a "
                            "Hugging Face checkpoint dir")
  if is_converted_dir(path) or is_hf_dir(path):
    return
  if os.path.isdir(os.path.join(path, conv.PARAMS_DIR)):
    raise ValueError(f"{path} has {conv.PARAMS_DIR}/ but no {conv.MANIFEST}: it is an "
                     "unfinished conversion; delete it and convert again")
  raise ValueError(
      f"{path} is neither a converted checkpoint (no {conv.MANIFEST}) nor a Hugging Face "
      "checkpoint (needs config.json and *.safetensors); convert one with "
      "`python -m focus_jax.checkpoints_convert --hf_dir=... --out_dir=...`")


def load_model(path: str, mesh: Mesh | None = None,
               dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Loads a converted checkpoint or an HF dir (detected from the files it holds).

  For an HF dir, `dtype=None` means bfloat16.
  """
  _check_model_dir(path)
  if is_converted_dir(path):
    return load_checkpoint(path, mesh=mesh, dtype=dtype)
  return load_hf(path, mesh=mesh, dtype=dtype or "bfloat16")
