"""HF safetensors checkpoint (LLaDA / UltraLLaDA / Dream) -> self-contained Orbax checkpoint.

Layout of a converted checkpoint:

  out_dir/
    focus_jax_checkpoint.json   manifest; written last, its presence is what makes a dir loadable
    model_config.json           `ModelConfig.to_json()` (dtype = the stored parameter dtype)
    params/<part>/              one Orbax (StandardCheckpointHandler) checkpoint per top-level
                                subtree: embed, layers_0 ... layers_{n-1}, final_norm, lm_head
    tokenizer.json, ...         the tokenizer files of the HF directory, copied as they are

Why one Orbax checkpoint per part: an Orbax save takes the whole pytree at once, so saving the
model in one piece would need every weight in host memory (16 GB for LLaDA-8B in bf16, 32 GB in
float32). Saved part by part the converter holds one part (at most the 1 GB embedding or LM head
in bf16) and the loader restores each part straight onto its target shardings.

The output is atomic: everything is written into a hidden temp dir next to `out_dir` and renamed
into place at the end; the manifest is written last, so even a temp dir left behind by a killed
process does not load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from focus_jax.checkpoints_convert import safetensors_io as st
from focus_jax.models.config import ModelConfig, from_hf_config
from focus_jax.models.param_map import TensorSpec, hf_tensor_specs

MANIFEST = "focus_jax_checkpoint.json"
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
FORMAT = "focus_jax.orbax_parts"
FORMAT_VERSION = 1

# Files that make the output self-contained for tokenization and chat formatting.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json")

# Non-parameter buffers some exporters store; they carry nothing the port needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": st.FLOAT_DTYPES["BF16"]}


class CheckpointMismatchError(ValueError):
  """The HF tensors do not match what the config.json describes."""


def np_dtype(dtype: str) -> np.dtype:
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
  return _NP_DTYPES[dtype]


def check_tensors(tensors: dict[str, st.TensorInfo], specs: list[TensorSpec], source: str) -> None:
  """Raises one error naming every missing, unexpected, mis-shaped or non-float tensor."""
  expected = {s.hf_name: s for s in specs}
  missing = [n for n in expected if n not in tensors]
  unexpected = sorted(n for n in tensors
                      if n not in expected and not n.endswith(IGNORED_SUFFIXES))
  misshaped = [f"{n}: checkpoint {list(tensors[n].shape)}, config expects {list(s.hf_shape)}"
               for n, s in expected.items() if n in tensors and tensors[n].shape != s.hf_shape]
  bad_dtype = [f"{n}: {tensors[n].dtype}" for n in expected
               if n in tensors and tensors[n].dtype not in st.FLOAT_DTYPES]
  if not (missing or unexpected or misshaped or bad_dtype):
    return
  lines = [f"{source}: the checkpoint does not match its config.json "
           f"({len(expected)} tensors expected, {len(tensors)} found):"]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", misshaped),
                       (f"not a float dtype {sorted(st.FLOAT_DTYPES)}", bad_dtype)):
    if items:
      lines.append(f"  {len(items)} {title}:")
      lines.extend(f"    {item}" for item in items)
  lines.append("Check that config.json belongs to these weights (model_type, layer count, "
               "hidden/intermediate sizes, heads, vocabulary) and that no shard is missing.")
  raise CheckpointMismatchError("\n".join(lines))


def group_by_part(specs: list[TensorSpec]) -> dict[str, list[TensorSpec]]:
  """Specs grouped by top-level subtree (embed, layers_i, final_norm, lm_head), in spec order."""
  parts: dict[str, list[TensorSpec]] = {}
  for spec in specs:
    parts.setdefault(spec.path[0], []).append(spec)
  return parts


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_checked_hf(hf_dir: str, dtype: str) -> tuple[ModelConfig, dict[str, st.TensorInfo],
                                                      list[TensorSpec]]:
  """Config, tensor index and specs of an HF dir, validated before any weight is read."""
  np_dtype(dtype)
  config = from_hf_config(hf_dir, dtype)
  tensors = st.index_hf_dir(hf_dir)
  specs = hf_tensor_specs(config)
  check_tensors(tensors, specs, hf_dir)
  return config, tensors, specs


def _release_free_memory() -> None:
  """Hands freed heap back to the OS between parts (glibc keeps it otherwise), so each part's
  peak starts from the baseline instead of on top of the previous part's leftovers."""
  gc.collect()
  libc = ctypes.util.find_library("c")
  if libc:
    try:
      ctypes.CDLL(libc).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
      pass


def _copy_tokenizer_files(hf_dir: str, dst: str) -> list[str]:
  copied = []
  for name in sorted(os.listdir(hf_dir)):
    is_code = name.startswith("tokenization_") and name.endswith(".py")
    if name in TOKENIZER_FILES or is_code:
      shutil.copy2(os.path.join(hf_dir, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def _write_into(tmp: str, hf_dir: str, config: ModelConfig, tensors: dict[str, st.TensorInfo],
                specs: list[TensorSpec], progress: bool) -> None:
  with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
    f.write(config.to_json())
  tokenizer_files = _copy_tokenizer_files(hf_dir, tmp)
  dst_dtype = np_dtype(config.dtype)
  parts = group_by_part(specs)
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  total = sum(int(np.prod(s.hf_shape)) * dst_dtype.itemsize for s in specs)
  with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
    for part, part_specs in parts.items():
      bar.set_postfix_str(part)
      tree: dict[str, Any] = {}
      for spec in part_specs:
        arr = st.read_tensor(tensors[spec.hf_name], dst_dtype, spec.transpose)
        set_path(tree, spec.path[1:], arr)
      checkpointer.save(os.path.join(tmp, PARAMS_DIR, part), args=ocp.args.StandardSave(tree))
      del tree, arr
      _release_free_memory()
      bar.update(sum(int(np.prod(s.hf_shape)) * dst_dtype.itemsize for s in part_specs))
  checkpointer.close()
  manifest = {"format": FORMAT, "version": FORMAT_VERSION, "family": config.family,
              "dtype": config.dtype, "parts": list(parts), "tokenizer_files": tokenizer_files,
              "source": os.path.abspath(hf_dir)}
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)


def convert_hf_checkpoint(hf_dir: str, out_dir: str, dtype: str = "bfloat16",
                          overwrite: bool = False, progress: bool = True) -> str:
  """Converts an HF LLaDA/Dream checkpoint dir into a converted checkpoint at `out_dir`.

  Validates every tensor against config.json before writing anything, streams one part at a
  time, and renames the finished output into place. Returns the absolute output path.
  """
  config, tensors, specs = read_checked_hf(hf_dir, dtype)
  out_dir = os.path.abspath(out_dir)
  src = os.path.realpath(hf_dir)
  if src == os.path.realpath(out_dir) or src.startswith(os.path.realpath(out_dir) + os.sep):
    raise ValueError(f"out_dir {out_dir} would replace the HF checkpoint {hf_dir} it is "
                     "converted from; choose an out_dir outside it")
  if os.path.lexists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to "
                          "replace it, or choose another out_dir")
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  stale = sorted(f for f in os.listdir(parent) if f.startswith(f".{name}.tmp-"))
  if stale:  # a killed conversion's leftovers (or one running now): never loaded, not removed
    logging.warning("%s holds unfinished conversions %s (a killed run's; delete them if none is "
                    "running)", parent, stale)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    _write_into(tmp, hf_dir, config, tensors, specs, progress)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: readable as a plain mkdir's
    _fsync_tree(tmp)  # on disk before the rename publishes it (a crash or power loss)
    if os.path.lexists(out_dir):
      if not overwrite:  # it appeared while converting
        raise FileExistsError(f"{out_dir} appeared during the conversion; pass overwrite=True "
                              "(--overwrite) to replace it, or choose another out_dir")
      # Two renames: the old output moves aside (and comes back if the second one fails).
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(out_dir, os.path.join(old, name))
      try:
        os.rename(tmp, out_dir)
      except BaseException:
        os.rename(os.path.join(old, name), out_dir)
        os.rmdir(old)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
    _fsync_path(parent)  # the rename itself
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _fsync_path(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root: str) -> None:
  """Every file and directory under root flushed to disk: what the manifest promises exists."""
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      _fsync_path(os.path.join(dirpath, name))
    _fsync_path(dirpath)


def _umask() -> int:
  """The process's file mode creation mask (read by setting it, then restoring it)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def manifest_path(ckpt_dir: str) -> str:
  return os.path.join(ckpt_dir, MANIFEST)


def read_manifest(ckpt_dir: str) -> dict[str, Any]:
  path = manifest_path(ckpt_dir)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{ckpt_dir} is not a converted focus-jax checkpoint (no {MANIFEST}); if it is the "
        "leftover of an interrupted conversion, delete it and convert again")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format {manifest.get('format')!r} version "
                     f"{manifest.get('version')!r} is not {FORMAT!r} v{FORMAT_VERSION}; convert "
                     "the HF checkpoint again with this version of focus_jax")
  return manifest


def read_config(ckpt_dir: str) -> ModelConfig:
  with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
    return ModelConfig.from_json(f.read())

