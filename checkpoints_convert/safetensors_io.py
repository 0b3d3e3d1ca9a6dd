"""Reading (and writing) safetensors without torch, one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each name to
{dtype, shape, data_offsets}, then the raw bytes. Parsing only the headers lets the converter
validate a whole 16 GB checkpoint before it reads a single weight, and reading each tensor with
positioned reads into an anonymous buffer (not a memory map, whose file pages would count towards
the process's RSS until unmapped) keeps at most one tensor in memory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

# safetensors dtype names -> numpy dtypes (bf16 through ml_dtypes). Only floating tensors are
# model weights; anything else is reported as a dtype error by the converter.
FLOAT_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16)}
OTHER_DTYPES: dict[str, np.dtype] = {
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
_ALL_DTYPES = {**FLOAT_DTYPES, **OTHER_DTYPES}
_NAME_OF = {v: k for k, v in _ALL_DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


class SafetensorsError(ValueError):
  """A safetensors file or index is malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor's bytes live."""

  name: str
  file: str
  dtype: str  # safetensors dtype name, e.g. "BF16"
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in `file`
  nbytes: int

  @property
  def np_dtype(self) -> np.dtype:
    return _ALL_DTYPES[self.dtype]


def read_header(path: str) -> dict[str, TensorInfo]:
  """Parses one file's header (no tensor data is read) and checks every offset against the file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      raise SafetensorsError(f"{path}: header length {n} is invalid for a {size}-byte file; "
                             "the file is truncated or not safetensors")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
  base = 8 + n
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
    begin, end = (int(x) for x in meta["data_offsets"])
    if dtype not in _ALL_DTYPES:
      raise SafetensorsError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    want = math.prod(shape) * _ALL_DTYPES[dtype].itemsize
    if end - begin != want or base + end > size:
      raise SafetensorsError(
          f"{path}: tensor {name!r} ({dtype}{list(shape)}) has data_offsets [{begin}, {end}] "
          f"(expected {want} bytes within a {size}-byte file); the file is truncated or corrupt")
    out[name] = TensorInfo(name, path, dtype, shape, base + begin, want)
  return out


def index_hf_dir(hf_dir: str) -> dict[str, TensorInfo]:
  """All tensors of an HF checkpoint directory: sharded (with the index json) or single-file.

  Without an index, every *.safetensors file in the directory is read. A name stored twice, or an
  index entry that its shard does not contain, is an error.
  """
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise SafetensorsError(f"{index_path}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
    missing = [s for s in files if not os.path.exists(os.path.join(hf_dir, s))]
    if missing:
      raise SafetensorsError(f"{index_path} names shard(s) that do not exist: {missing}")
  else:
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
    weight_map = None
    if not files:
      raise FileNotFoundError(
          f"{hf_dir}: no {INDEX_FILE}, {SINGLE_FILE} or other *.safetensors file; pass the "
          "directory of a Hugging Face checkpoint saved in safetensors format (convert .bin "
          "checkpoints with transformers' save_pretrained(safe_serialization=True) first)")
  tensors: dict[str, TensorInfo] = {}
  for shard in files:
    for name, info in read_header(os.path.join(hf_dir, shard)).items():
      if name in tensors:
        raise SafetensorsError(f"{hf_dir}: tensor {name!r} is stored in both "
                               f"{os.path.basename(tensors[name].file)} and {shard}")
      tensors[name] = info
  if weight_map is not None:
    problems = [f"{name} -> {shard}" for name, shard in weight_map.items()
                if name not in tensors or os.path.basename(tensors[name].file) != shard]
    if problems:
      raise SafetensorsError(f"{index_path}: these index entries do not match the shards' "
                             f"headers: {problems[:20]}{' ...' if len(problems) > 20 else ''}")
  return tensors


def _read_exact(f, offset: int, buf: np.ndarray) -> None:
  view = memoryview(buf.reshape(-1).view(np.uint8))
  f.seek(offset)
  got = 0
  while got < len(view):
    n = f.readinto(view[got:])
    if not n:
      raise SafetensorsError(f"{f.name}: unexpected end of file at byte {offset + got}")
    got += n


def read_tensor(info: TensorInfo, dtype: np.dtype | str | None = None, transpose: bool = False,
                chunk_bytes: int = 64 << 20) -> np.ndarray:
  """Materializes one tensor (cast to `dtype`, optionally transposed) in a fresh buffer.

  Rows are read in chunks of about `chunk_bytes` and cast/transposed into the output, so the peak
  is the output plus one chunk, never two copies of a 1 GB embedding.
  """
  src = info.np_dtype
  dst = np.dtype(dtype) if dtype is not None else src
  shape = info.shape
  if transpose and len(shape) != 2:
    raise ValueError(f"{info.name}: only 2-D tensors can be transposed, got shape {shape}")
  out = np.empty(shape[::-1] if transpose else shape, dst)
  if out.size == 0:
    return out
  rows = shape[0] if shape else 1
  row_shape = shape[1:]
  row_bytes = math.prod(row_shape) * src.itemsize
  per_chunk = max(1, chunk_bytes // max(row_bytes, 1))
  flat_out = out.reshape(1) if not shape else out
  with open(info.file, "rb", buffering=0) as f:
    for r0 in range(0, rows, per_chunk):
      r1 = min(rows, r0 + per_chunk)
      buf = np.empty((r1 - r0,) + row_shape, src)
      _read_exact(f, info.offset + r0 * row_bytes, buf)
      if transpose:
        out[:, r0:r1] = buf.T
      elif shape:
        flat_out[r0:r1] = buf
      else:
        flat_out[0] = buf.reshape(())
  return out


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      fill: Callable[[str, np.ndarray, int], None],
                      metadata: dict[str, str] | None = None,
                      chunk_bytes: int = 64 << 20) -> None:
  """Writes a safetensors file without holding more than one chunk of any tensor in memory.

  `tensors` gives (name, shape, dtype) in file order; `fill(name, rows, row0)` fills, in place, the
  chunk of leading-axis rows that starts at row `row0`. Used to build large synthetic checkpoints
  for the memory benchmark.
  """
  entries, offset = {}, 0
  specs = list(tensors)
  for name, shape, dtype in specs:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    entries[name] = {"dtype": _NAME_OF[np.dtype(dtype)], "shape": list(shape),
                     "data_offsets": [offset, offset + n]}
    offset += n
  if metadata:
    entries["__metadata__"] = metadata
  header = json.dumps(entries, separators=(",", ":")).encode()
  header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for name, shape, dtype in specs:
      dtype = np.dtype(dtype)
      rows = shape[0] if shape else 1
      row_elems = math.prod(shape[1:])
      per_chunk = max(1, chunk_bytes // max(row_elems * dtype.itemsize, 1))
      for r0 in range(0, rows, per_chunk):
        r1 = min(rows, r0 + per_chunk)
        buf = np.empty((r1 - r0,) + tuple(shape[1:]), dtype)
        fill(name, buf, r0)
        f.write(buf.tobytes())
