"""Tiny random oracles and HF-format checkpoints for the parity and conversion tests.

The oracles are transformers' PyTorch `LlamaForCausalLM` (LLaDA's math: RMSNorm, rotate-half RoPE,
SwiGLU, no biases) and `Qwen2ForCausalLM` (Dream's: the same plus q/k/v biases and GQA), made
bidirectional by running eager attention with an explicit 4-D additive mask. Their weights are
written under LLaDA's and Dream's *own* tensor names (the renaming below is written out by hand
from the public checkpoints' layouts, independently of models/llada.py and models/dream.py), in
two safetensors shards with an index, with config.json files using each family's own keys. The
converter under test never sees a Llama or Qwen2 name.

torch is a test-only dependency; nothing outside tests/ imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


@dataclasses.dataclass(frozen=True)
class TinyShape:
  vocab: int = 96
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  mlp: int = 128
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  max_len: int = 256
  mask_id: int = 95
  eos_id: int = 94


LLADA_SHAPE = TinyShape()
# Dream: GQA (4 query heads on 2 KV heads), Qwen2's eps and a different RoPE base.
DREAM_SHAPE = TinyShape(n_kv_heads=2, rms_eps=1e-6, rope_theta=1e6, mask_id=93, eos_id=92)

# Logit scale: the final norm gives hidden states of RMS ~1, so an LM head with std LOGIT_STD/sqrt(d)
# gives logits of std ~LOGIT_STD (O(1-10)), the regime the 1e-4 tolerance is stated at.
LOGIT_STD = 4.0


def _randomize(model: torch.nn.Module, seed: int, d_model: int) -> None:
  """Weights with O(1) activations everywhere: unit-variance embeddings, fan-in scaled linears,
  norms near (not at) 1 and non-zero biases, so a mis-mapped tensor cannot hide."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      elif name == "lm_head.weight":
        p.copy_(LOGIT_STD / d_model ** 0.5 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def _bidirectional(model: torch.nn.Module) -> torch.nn.Module:
  for module in model.modules():
    if hasattr(module, "is_causal"):
      module.is_causal = False
  return model.eval()


def llada_oracle(seed: int = 0, shape: TinyShape = LLADA_SHAPE) -> LlamaForCausalLM:
  cfg = LlamaConfig(
      vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.mlp,
      num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
      num_key_value_heads=shape.n_kv_heads, rms_norm_eps=shape.rms_eps,
      rope_theta=shape.rope_theta, max_position_embeddings=shape.max_len, attention_bias=False,
      mlp_bias=False, tie_word_embeddings=False, hidden_act="silu", attn_implementation="eager")
  model = LlamaForCausalLM(cfg).to(torch.float32)
  _randomize(model, seed, shape.d_model)
  _check_rope(model, shape)
  return _bidirectional(model)


def dream_oracle(seed: int = 1, shape: TinyShape = DREAM_SHAPE) -> Qwen2ForCausalLM:
  cfg = Qwen2Config(
      vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.mlp,
      num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
      num_key_value_heads=shape.n_kv_heads, rms_norm_eps=shape.rms_eps,
      rope_theta=shape.rope_theta, max_position_embeddings=shape.max_len,
      tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False,
      attn_implementation="eager")
  model = Qwen2ForCausalLM(cfg).to(torch.float32)
  assert model.model.layers[0].self_attn.q_proj.bias is not None, "Qwen2 oracle lost its q bias"
  _randomize(model, seed, shape.d_model)
  _check_rope(model, shape)
  return _bidirectional(model)


def _check_rope(model, shape: TinyShape) -> None:
  """transformers moved rope_theta into rope_parameters; make sure the base really took."""
  head_dim = shape.d_model // shape.n_heads
  want = 1.0 / shape.rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
  got = model.model.rotary_emb.inv_freq.double().numpy()
  np.testing.assert_allclose(got, want, rtol=1e-6, err_msg="oracle RoPE base is not rope_theta")


# --- LLaDA's and Dream's checkpoint layouts ---------------------------------------------------

_LLADA_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight", "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight", "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight", "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight"}


def llada_name(llama_name: str) -> str:
  """Llama tensor name -> LLaDAModelLM tensor name (prefix model.transformer.)."""
  top = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
         "lm_head.weight": "ff_out.weight"}
  if llama_name in top:
    return "model.transformer." + top[llama_name]
  _, _, i, rest = llama_name.split(".", 3)  # model.layers.{i}.{rest}
  return f"model.transformer.blocks.{i}.{_LLADA_BLOCK[rest]}"


def llada_config_json(shape: TinyShape) -> dict:
  """config.json with LLaDA's own keys (as in GSAI-ML/LLaDA-8B-*)."""
  return {
      "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": shape.d_model,
      "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads, "n_layers": shape.n_layers,
      "mlp_hidden_size": shape.mlp, "mlp_ratio": 4, "vocab_size": shape.vocab,
      "embedding_size": shape.vocab, "rope": True, "rope_theta": shape.rope_theta,
      "rms_norm_eps": shape.rms_eps, "max_sequence_length": shape.max_len,
      "mask_token_id": shape.mask_id, "eos_token_id": shape.eos_id, "pad_token_id": shape.eos_id,
      "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
      "activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms",
      "attention_layer_norm": False, "torch_dtype": "bfloat16"}


def dream_config_json(shape: TinyShape) -> dict:
  """config.json with Dream's (Qwen2-style) keys (as in Dream-org/Dream-v0-*-7B)."""
  return {
      "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": shape.d_model,
      "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_kv_heads,
      "num_hidden_layers": shape.n_layers, "intermediate_size": shape.mlp,
      "vocab_size": shape.vocab, "rope_theta": shape.rope_theta, "rms_norm_eps": shape.rms_eps,
      "max_position_embeddings": shape.max_len, "tie_word_embeddings": False,
      "hidden_act": "silu", "mask_token_id": shape.mask_id, "eos_token_id": shape.eos_id,
      "pad_token_id": shape.eos_id, "bos_token_id": shape.eos_id, "use_sliding_window": False,
      "torch_dtype": "bfloat16"}


def hf_state(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
  """The oracle's weights under the family's checkpoint names, in the model's order."""
  rename = llada_name if family == "llada" else (lambda n: n)  # Dream keeps Qwen2's names
  return {rename(n): p.detach().clone().contiguous() for n, p in model.named_parameters()}


def write_sharded(state: dict[str, torch.Tensor], config: dict, out_dir: str,
                  dtype: torch.dtype = torch.float32, n_shards: int = 2) -> str:
  """Writes config.json, n safetensors shards and model.safetensors.index.json."""
  os.makedirs(out_dir, exist_ok=True)
  names = list(state)
  bounds = np.linspace(0, len(names), n_shards + 1).astype(int)
  weight_map, total = {}, 0
  for s in range(n_shards):
    shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
    tensors = {n: (state[n].to(dtype) if state[n].is_floating_point() else state[n]).contiguous()
               for n in names[bounds[s]:bounds[s + 1]]}
    save_file(tensors, os.path.join(out_dir, shard), metadata={"format": "pt"})
    for n, t in tensors.items():
      weight_map[n] = shard
      total += t.numel() * t.element_size()
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return out_dir


def write_hf_checkpoint(model: torch.nn.Module, family: str, out_dir: str,
                        dtype: torch.dtype = torch.float32, shape: TinyShape | None = None,
                        n_shards: int = 2) -> str:
  shape = shape or (LLADA_SHAPE if family == "llada" else DREAM_SHAPE)
  config = llada_config_json(shape) if family == "llada" else dream_config_json(shape)
  return write_sharded(hf_state(model, family), config, out_dir, dtype, n_shards)


# --- the oracle's forward with each family's padding semantics --------------------------------

def oracle_logits(model: torch.nn.Module, family: str, tokens: np.ndarray,
                  attention_mask: np.ndarray | None = None) -> np.ndarray:
  """float32 logits [B, L, V] aligned like `forward_logits`.

  LLaDA: positions arange(L), only pad keys masked. Dream: positions cumsum(mask)-1 with pads at 1,
  pad keys and pad queries masked, then logits shifted right by one. Masked entries get the dtype's
  finite minimum, so a fully masked (pad) query row stays finite.
  """
  tokens_t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  b, l = tokens_t.shape
  valid = torch.ones(b, l, dtype=torch.bool) if attention_mask is None else torch.as_tensor(
      np.asarray(attention_mask)).bool()
  dtype = next(model.parameters()).dtype
  if family == "llada":
    positions = torch.arange(l).expand(b, l)
    allowed = valid[:, None, None, :].expand(b, 1, l, l)
  else:
    positions = valid.long().cumsum(-1) - 1
    positions = torch.where(valid, positions, torch.ones_like(positions))
    allowed = valid[:, None, None, :] & valid[:, None, :, None]
  mask = torch.zeros(b, 1, l, l, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
  with torch.no_grad():
    logits = model(input_ids=tokens_t, attention_mask=mask, position_ids=positions).logits
  logits = logits.float()
  if family == "dream":
    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
  return logits.numpy()


def left_padded_batch(rng: np.random.Generator, lengths: list[int], total: int, vocab: int,
                      pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of random tokens (never the pad id), left-padded to `total`."""
  tokens = np.full((len(lengths), total), pad_id, np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for r, n in enumerate(lengths):
    tokens[r, total - n:] = rng.integers(0, vocab - 4, size=n)
    mask[r, total - n:] = 1
  return tokens, mask


# --- tiny tokenizers ---------------------------------------------------------------------------

LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|mdm_mask|>"]
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]

# LLaDA-8B-Instruct's chat template (Llama-3 style, bos prepended to the first turn).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# Qwen2.5's ChatML template (Dream-v0-Instruct-7B ships it), without the tool-calling branches.
DREAM_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Diffusion language models unmask many tokens per step.",
    "What is the capital of France? Paris is the capital of France.",
    "You are a helpful assistant. Answer the question step by step.",
    "1 + 1 = 2, and 12 * 12 = 144.",
]


def write_tokenizer(out_dir: str, family: str, chat_template: bool = True) -> str:
  """A byte-level BPE tokenizer trained offline on a few sentences, with the family's specials,
  saved as tokenizer.json + tokenizer_config.json (+ special_tokens_map.json)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  specials = LLADA_SPECIALS if family == "llada" else DREAM_SPECIALS
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS, trainer)
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  if family == "llada":
    special_map = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>"}
    template = LLADA_CHAT_TEMPLATE
  else:
    special_map = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "mask_token": "<|mask|>"}
    template = DREAM_CHAT_TEMPLATE
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
            **special_map}
  if chat_template and template is not None:
    config["chat_template"] = template
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special_map, f, indent=2)
  return out_dir
