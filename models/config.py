"""Architecture description shared by LLaDA and Dream.

One frozen dataclass says everything the transformer core needs; the two families differ only in
the fields below marked per-family (bias, RoPE precision, logit shift, padding semantics). The
config is hashable so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal, get_args

import jax.numpy as jnp

Family = Literal["llada", "dream"]

# ModelConfig.matmul_impl's choices (benchmarks list them in their flags).
MatmulImpl = Literal["xla", "pallas_gpu", "auto", "pallas_gpu_mlp"]
MATMUL_IMPLS = get_args(MatmulImpl)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and semantics of one dLLM."""

  family: Family
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_hidden: int
  rms_eps: float
  rope_theta: float
  max_sequence_length: int
  mask_token_id: int
  eos_token_id: int
  # Extra ids that end a turn (LLaDA's <|eot_id|>, Dream's <|im_end|>).
  eot_token_id: int | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"  # parameter and activation dtype: "float32" or "bfloat16"

  # --- per-family semantics -------------------------------------------------------------
  qkv_bias: bool = False
  # LLaDA rotates q/k in float32; Dream (Qwen2) casts cos/sin to the activation dtype first.
  rope_in_float32: bool = True
  # Dream predicts token j from position j-1.
  logit_shift: bool = False
  # "key_only": LLaDA, positions stay arange(L) and only pad keys are masked.
  # "positions_and_queries": Dream, positions are cumsum(mask)-1 and pad queries are masked too.
  padding: Literal["key_only", "positions_and_queries"] = "key_only"

  # --- execution (not architecture) ---------------------------------------------------------
  # How the projections' matmuls run (`kernels/matmul.py`): "xla"; "pallas_gpu", a
  # weight-streaming Pallas kernel for calls of few rows (a cached step's query slots), XLA for
  # the rest; "pallas_gpu_mlp", only the fused SwiGLU up-projection streams; "auto",
  # "pallas_gpu_mlp" on a single Hopper GPU (compute capability 9.x), XLA otherwise. The LLaDA
  # configs ask for "auto" (faster there on an H200); it is slower for Dream-7B's shape. On that
  # GPU at batch 1, "auto" also asks XLA to merge a layer's q, k and v dots into one GEMM; above
  # batch 1, on any GPU, no dots merge (whatever the impl). Both are compile options
  # (`transformer.compiler_options`) that `sampling.compile_generation` and `step_timing` apply;
  # code that jits the model itself passes them to `jax.jit(..., compiler_options=...)`.
  matmul_impl: MatmulImpl = "xla"
  # One [d_model, kv_heads * (q_per_kv + 2) * head_dim] weight per layer for the q, k and v
  # projections (grouped by KV head: its q heads, then its k, then its v; sharding its columns
  # over "kv_heads" keeps groups whole where the model axis divides the KV heads). Checkpoints
  # and `training.export` keep the three HF projections;
  # `param_map.fuse_qkv` builds the fused weight at load (`focus_jax.load(..., fused_qkv=True)`).
  # Without it XLA merges sibling dots by concatenating their weights inside a Triton GEMM (about
  # 310 TFLOP/s at batch 8). H200, 2026-12-04: LLaDA-8B 8K Focus step at batch 8 13.37 -> 12.93
  # ms; batch 1 and Dream-7B unchanged (5.98 / 5.99 ms; 5.69 / 5.65 ms), so it is opt-in.
  fused_qkv: bool = False
  # Every projection multiplies in float8 e4m3 with per-tensor scales (`transformer.Fp8Dense`; the
  # lm head stays in `dtype`), its weights read from the FP8_WEIGHTS collection when the caller
  # made them once (`transformer.fp8_weights`), else quantised per call. Decoding sets it for the
  # forward of a refresh (`RefreshPolicy.fp8_matmul`), whose GEMMs are compute-bound.
  fp8_matmul: bool = False

  def __post_init__(self):
    if self.matmul_impl not in MATMUL_IMPLS:
      raise ValueError(f"matmul_impl must be one of {MATMUL_IMPLS}, got {self.matmul_impl!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")

  @property
  def jnp_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def projection_params(self) -> int:
    """The blocks' projection weights (q, k, v, o, gate, up, down) over all layers: what runs
    in fp8 under `fp8_matmul`."""
    d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
    return self.n_layers * d * (2 * q + 2 * kv + 3 * self.mlp_hidden)

  def num_params(self) -> int:
    """Parameter count, for memory planning and FLOP floors."""
    d, v = self.d_model, self.vocab_size
    biases = self.n_heads * self.head_dim + 2 * self.n_kv_heads * self.head_dim
    per_layer = (biases if self.qkv_bias else 0) + 2 * d  # (and two norms)
    return self.projection_params() + self.n_layers * per_layer + 2 * v * d + d

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> ModelConfig:
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**data)


def llada_family(**fields) -> ModelConfig:
  """LLaDA / UltraLLaDA semantics with the given shape."""
  return ModelConfig(family="llada", qkv_bias=False, rope_in_float32=True, logit_shift=False,
                     padding="key_only", **fields)


def dream_family(**fields) -> ModelConfig:
  """Dream (Qwen2.5 backbone) semantics with the given shape."""
  return ModelConfig(family="dream", qkv_bias=True, rope_in_float32=False, logit_shift=True,
                     padding="positions_and_queries", **fields)


# Token ids of the released checkpoints (models.md). HF config.json files of LLaDA carry them too.
LLADA_MASK_ID, LLADA_EOS_ID, LLADA_EOT_ID = 126336, 126081, 126348
DREAM_MASK_ID, DREAM_EOS_ID, DREAM_IM_END_ID = 151666, 151643, 151645


def llada_8b(dtype: str = "bfloat16", rope_theta: float = 500000.0,
             max_sequence_length: int = 4096) -> ModelConfig:
  return llada_family(
      vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
      mlp_hidden=12288, rms_eps=1e-5, rope_theta=rope_theta,
      max_sequence_length=max_sequence_length, mask_token_id=LLADA_MASK_ID,
      eos_token_id=LLADA_EOS_ID, eot_token_id=LLADA_EOT_ID, pad_token_id=LLADA_EOS_ID,
      dtype=dtype)


def dream_7b(dtype: str = "bfloat16") -> ModelConfig:
  return dream_family(
      vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
      mlp_hidden=18944, rms_eps=1e-6, rope_theta=1e6, max_sequence_length=131072,
      mask_token_id=DREAM_MASK_ID, eos_token_id=DREAM_EOS_ID, eot_token_id=DREAM_IM_END_ID,
      pad_token_id=DREAM_EOS_ID, dtype=dtype)


def _require(hf: dict, key: str, path: str) -> Any:
  if key not in hf:
    raise ValueError(f"{path}: config.json has no {key!r}; is this a LLaDA or Dream checkpoint?")
  return hf[key]


def from_hf_config(hf_dir: str, dtype: str = "bfloat16") -> ModelConfig:
  """Reads an HF config.json (LLaDA, UltraLLaDA or Dream) into a ModelConfig.

  RoPE base and context length come from the file, never from defaults, so UltraLLaDA's enlarged
  base is picked up as-is.
  """
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: pass the directory of a Hugging Face checkpoint")
  with open(path) as f:
    hf = json.load(f)
  model_type = hf.get("model_type", "")
  if hf.get("rope_scaling"):
    raise ValueError(f"{path}: rope_scaling={hf['rope_scaling']!r} is not supported (only a plain "
                     "rope_theta); convert a checkpoint whose RoPE base is in rope_theta")
  for key in ("eos_token_id", "pad_token_id", "mask_token_id"):
    if isinstance(hf.get(key), list):  # some configs list several ids: the first is the main one
      if not hf[key]:
        raise ValueError(f"{path}: {key} is an empty list")
      hf[key] = hf[key][0]
  if model_type == "llada":
    d_model = _require(hf, "d_model", path)
    n_heads = _require(hf, "n_heads", path)
    n_kv = hf.get("n_kv_heads") or n_heads
    mlp = hf.get("mlp_hidden_size") or hf.get("mlp_ratio", 4) * d_model
    if hf.get("include_bias") or hf.get("include_qkv_bias"):
      raise ValueError(f"{path}: LLaDA checkpoints with biases are not supported")
    if hf.get("weight_tying"):
      raise ValueError(f"{path}: weight_tying=true is not supported (released LLaDA is untied)")
    vocab = hf.get("embedding_size") or _require(hf, "vocab_size", path)
    return llada_family(
        vocab_size=vocab,
        d_model=d_model, n_layers=_require(hf, "n_layers", path), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=d_model // n_heads, mlp_hidden=mlp,
        rms_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=_require(hf, "rope_theta", path),
        max_sequence_length=hf.get("max_sequence_length", 4096),
        mask_token_id=hf.get("mask_token_id", LLADA_MASK_ID),
        eos_token_id=hf.get("eos_token_id", LLADA_EOS_ID),
        # <|eot_id|> of the released vocabulary; a smaller vocabulary must name its own.
        eot_token_id=hf.get("eot_token_id", LLADA_EOT_ID if vocab > LLADA_EOT_ID else None),
        pad_token_id=hf.get("pad_token_id", LLADA_EOS_ID), dtype=dtype)
  if model_type == "Dream" or model_type == "dream":
    hidden = _require(hf, "hidden_size", path)
    n_heads = _require(hf, "num_attention_heads", path)
    if hf.get("tie_word_embeddings"):
      raise ValueError(f"{path}: tie_word_embeddings=true is not supported (Dream-7B is untied)")
    return dream_family(
        vocab_size=_require(hf, "vocab_size", path), d_model=hidden,
        n_layers=_require(hf, "num_hidden_layers", path), n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hidden // n_heads,
        mlp_hidden=_require(hf, "intermediate_size", path), rms_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", 1e6),
        max_sequence_length=hf.get("max_position_embeddings", 131072),
        mask_token_id=hf.get("mask_token_id", DREAM_MASK_ID),
        eos_token_id=hf.get("eos_token_id", DREAM_EOS_ID), eot_token_id=DREAM_IM_END_ID,
        pad_token_id=hf.get("pad_token_id", DREAM_EOS_ID), dtype=dtype)
  raise ValueError(
      f"{path}: model_type {model_type!r} is not supported; expected 'llada' or 'Dream'")
