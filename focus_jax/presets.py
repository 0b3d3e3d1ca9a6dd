"""Named model shapes for random-weight runs: the tiny CPU model and the real 8B/7B shapes.

Random weights of the real shapes are what the benchmarks use (no hub access here); the tiny
model is the smoke run until a trained demo checkpoint is shipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from focus_jax.models import config as C
from focus_jax.models.transformer import Transformer

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>")
_TINY_BYTES = 256


def tiny(dtype: str = "float32") -> C.ModelConfig:
  """LLaDA architecture, byte-level vocabulary (256 bytes + eos, eot, mask)."""
  eos, eot, mask = (_TINY_BYTES + i for i in range(3))
  return C.llada_family(vocab_size=_TINY_BYTES + 8, d_model=128, n_layers=4, n_heads=4,
                        n_kv_heads=4, head_dim=32, mlp_hidden=384, rms_eps=1e-5,
                        rope_theta=10000.0, max_sequence_length=8192, mask_token_id=mask,
                        eos_token_id=eos, eot_token_id=eot, pad_token_id=eos, dtype=dtype)


def ultra_llada_32k(dtype: str = "bfloat16") -> C.ModelConfig:
  """UltraLLaDA's shape at 32K. Its real RoPE base comes from its config.json when loaded from a
  checkpoint; for random weights the base only sets the rotation speed, so LLaDA's is kept."""
  return C.llada_8b(dtype=dtype, max_sequence_length=131072)


PRESETS = {
    "tiny": tiny,
    "llada_8b": lambda dtype="bfloat16": C.llada_8b(dtype=dtype, max_sequence_length=131072),
    "ultra_llada": ultra_llada_32k,
    "dream_7b": C.dream_7b,
}


def preset(name: str, dtype: str | None = None) -> C.ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or give a "
                     "checkpoint path")
  return PRESETS[name]() if dtype is None else PRESETS[name](dtype=dtype)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
  """A byte-level tokenizer matching `tiny()`: any text round-trips; ids 0..255 are the 256
  bytes (in the order of their ByteLevel characters, not byte values), the specials after."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(TINY_SPECIAL_TOKENS))
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", mask_token="<|mdm_mask|>")


def random_params(config: C.ModelConfig, seed: int = 0, shardings=None):
  """Random weights of the config's shapes, made directly on the device(s).

  Normal(0, 0.02) matrices and unit norm weights, leaf by leaf with the hardware RNG
  ("unsafe_rbg": quality is irrelevant here, speed is not: threefry over 8B values and a Flax
  init trace each took minutes on an H100), and nothing passes through host memory. One small
  program per distinct (shape, sharding), not one program making all leaves: compiling that
  took most of a minute for the 8B on a GPU.
  """
  key = jax.random.key(seed, impl="unsafe_rbg")
  shapes = jax.eval_shape(Transformer(config).init_params, jax.random.key(0))
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  shardings = (jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
               if shardings is not None else [None] * len(flat))
  if len(shardings) != len(flat):
    raise ValueError(f"got {len(shardings)} shardings for {len(flat)} parameters")
  keys = jax.random.split(key, len(flat))
  out = [_leaf_maker(_leaf_kind(jax.tree_util.keystr(path)), tuple(leaf.shape),
                     jnp.dtype(leaf.dtype), sh)(k)
         for (path, leaf), sh, k in zip(flat, shardings, keys)]
  return jax.tree.unflatten(treedef, out)


def _leaf_kind(path: str) -> str:
  if "norm" in path:
    return "ones"
  return "zeros" if path.endswith("['bias']") else "normal"


@functools.lru_cache(maxsize=None)
def _leaf_maker(kind: str, shape: tuple[int, ...], dtype, sharding):
  def make(k):
    if kind == "ones":
      return jnp.ones(shape, dtype)
    if kind == "zeros":
      return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
  return jax.jit(make, out_shardings=sharding)

