"""Tokenizers and chat formatting for LLaDA and Dream, offline.

The tokenizer comes from an HF checkpoint dir or a converted checkpoint dir (the converter copies
the tokenizer files). Remote code is never run: Dream's custom `DreamTokenizer` is Qwen2's BPE, so
it is loaded from its tokenizer.json (or vocab.json + merges.txt) with transformers' own classes.

Chat prompts use the tokenizer's own chat_template when it has one (the released instruct
checkpoints do) and the built-in formats below otherwise, which reproduce those templates:
- LLaDA (Llama-3 style): `<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n{content}`
  `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n` (content stripped, as the
  template's `| trim` does);
- Dream (Qwen ChatML): a default system turn "You are a helpful assistant." unless the messages
  start with one, then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn and
  `<|im_start|>assistant\\n`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

FAMILIES = ("llada", "dream")
DREAM_DEFAULT_SYSTEM = "You are a helpful assistant."
LLADA_BOS = "<|startoftext|>"
# Tokens that end a generation (first one found cuts the text) and mask tokens, by name.
STOP_TOKENS = ("<|endoftext|>", "<|eot_id|>", "<|im_end|>")
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>")

Messages = list[dict[str, str]]


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _needs_remote_code(tok_config: dict[str, Any]) -> bool:
  import transformers  # pylint: disable=g-import-not-at-top
  auto_map = tok_config.get("auto_map") or {}
  if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
    return True
  cls = tok_config.get("tokenizer_class")
  return bool(cls) and not hasattr(transformers, cls)


def load_tokenizer(path: str):
  """The tokenizer of an HF or converted checkpoint dir (local files only, no remote code)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory; pass an HF checkpoint dir or a "
                            "converted checkpoint dir")
  has_json = os.path.exists(os.path.join(path, "tokenizer.json"))
  has_bpe = all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
  has_spm = os.path.exists(os.path.join(path, "tokenizer.model"))
  if not (has_json or has_bpe or has_spm):
    raise FileNotFoundError(
        f"{path} holds no tokenizer (tokenizer.json, vocab.json + merges.txt, or "
        "tokenizer.model); copy the tokenizer files of the HF checkpoint there (the converter "
        "does this when they sit next to config.json)")
  import transformers  # pylint: disable=g-import-not-at-top
  tok_config = _read_json(os.path.join(path, "tokenizer_config.json"))
  try:
    if not _needs_remote_code(tok_config):
      return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                        trust_remote_code=False)
    # Custom tokenizer code (Dream's DreamTokenizer): load the same vocabulary without it.
    if has_json:
      return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    if has_bpe:
      return transformers.Qwen2Tokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e
  raise ValueError(
      f"{path}: tokenizer_config.json asks for custom tokenizer code "
      f"({tok_config.get('tokenizer_class')!r}) and there is no tokenizer.json or "
      "vocab.json + merges.txt to load the vocabulary without it")


def _check_family(family: str) -> None:
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _as_messages(messages: Messages | str) -> Messages:
  if isinstance(messages, str):
    return [{"role": "user", "content": messages}]
  if not messages:
    raise ValueError("messages is empty; pass a string or a list of {'role', 'content'} dicts")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
        m.get("content"), str):
      raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
  return list(messages)


def builtin_chat_format(family: str, messages: Messages | str, bos_token: str | None = None) -> str:
  """The family's chat format with a generation prompt, without a tokenizer template."""
  _check_family(family)
  messages = _as_messages(messages)
  if family == "llada":
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                    f"{m['content'].strip()}<|eot_id|>" for m in messages)
    return (bos_token or LLADA_BOS) + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"
  if messages[0]["role"] != "system":
    messages = [{"role": "system", "content": DREAM_DEFAULT_SYSTEM}] + messages
  turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
  return turns + "<|im_start|>assistant\n"


def format_chat(tokenizer, family: str, messages: Messages | str) -> str:
  """A chat prompt ending in the assistant's generation header."""
  _check_family(family)
  messages = _as_messages(messages)
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return builtin_chat_format(family, messages, getattr(tokenizer, "bos_token", None))


def encode_prompts(tokenizer, texts: Sequence[str | Messages] | str, family: str,
                   chat: bool) -> list[list[int]]:
  """Token ids per prompt. With `chat`, each text (or message list) is chat-formatted first and
  encoded without extra special tokens, since the format already carries the BOS."""
  _check_family(family)
  if isinstance(texts, str):
    texts = [texts]
  out = []
  for text in texts:
    if chat:
      out.append(list(tokenizer(format_chat(tokenizer, family, text),
                                add_special_tokens=False)["input_ids"]))
    else:
      if not isinstance(text, str):
        raise ValueError("chat=False takes plain strings; pass chat=True for message lists")
      out.append(list(tokenizer(text)["input_ids"]))
  return out


def _ids_of(tokenizer, names: Iterable[str]) -> set[int]:
  vocab = tokenizer.get_vocab()
  return {vocab[n] for n in names if n in vocab}


def stop_token_ids(tokenizer) -> set[int]:
  """eos and end-of-turn ids the tokenizer knows (<|endoftext|>, <|eot_id|>, <|im_end|>)."""
  ids = _ids_of(tokenizer, STOP_TOKENS)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return ids


def mask_token_ids(tokenizer) -> set[int]:
  """The diffusion mask token ids (<|mdm_mask|> for LLaDA, <|mask|> for Dream)."""
  ids = _ids_of(tokenizer, MASK_TOKENS)
  if getattr(tokenizer, "mask_token_id", None) is not None:
    ids.add(int(tokenizer.mask_token_id))
  return ids


def decode(tokenizer, ids: Iterable[int], stop_ids: Iterable[int] | None = None,
           mask_ids: Iterable[int] | None = None, skip_special_tokens: bool = True) -> str:
  """Text of generated ids: cut at the first stop id (default: eos / end of turn), mask tokens
  (still-masked canvas positions) dropped."""
  stops = set(stop_token_ids(tokenizer) if stop_ids is None else (int(i) for i in stop_ids))
  masks = set(mask_token_ids(tokenizer) if mask_ids is None else (int(i) for i in mask_ids))
  kept = []
  for i in (int(i) for i in ids):
    if i in stops:
      break
    if i not in masks:
      kept.append(i)
  return tokenizer.decode(kept, skip_special_tokens=skip_special_tokens)


def check_matches_config(tokenizer, config) -> None:
  """Raises if the tokenizer's mask / eos ids disagree with a ModelConfig's (wrong tokenizer)."""
  problems = []
  vocab = tokenizer.get_vocab()
  mask_name = MASK_TOKENS[0] if config.family == "llada" else MASK_TOKENS[1]
  if vocab.get(mask_name, config.mask_token_id) != config.mask_token_id:
    problems.append(f"{mask_name} is {vocab[mask_name]} in the tokenizer, "
                    f"mask_token_id={config.mask_token_id} in the config")
  if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != config.eos_token_id:
    problems.append(f"eos is {tokenizer.eos_token_id} in the tokenizer, "
                    f"eos_token_id={config.eos_token_id} in the config")
  if problems:
    raise ValueError("tokenizer and model config disagree: " + "; ".join(problems) +
                     ". Load the tokenizer from the same checkpoint as the model.")
