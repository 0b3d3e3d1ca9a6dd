"""Tokenizer loading, chat formats, prompt encoding and decoding, on tiny offline tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import hf_fixtures as hf
import pytest
import torch

from focus_jax import tokenizer as tk
from focus_jax.checkpoints_convert import convert_hf_checkpoint
from focus_jax.models.config import dream_7b, llada_8b

LLADA_EXPECTED = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 1 + 1?"
                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
DREAM_EXPECTED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": " What is 1 + 1? "},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "And 12 * 12?"}]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  return {(family, template): hf.write_tokenizer(str(root / f"{family}_{template}"), family,
                                                 chat_template=template)
          for family in tk.FAMILIES for template in (True, False)}


@pytest.mark.parametrize("family", tk.FAMILIES)
def test_chat_format_template_and_builtin_agree(tok_dirs, family):
  with_template = tk.load_tokenizer(tok_dirs[family, True])
  without = tk.load_tokenizer(tok_dirs[family, False])
  assert with_template.chat_template and not without.chat_template
  expected = LLADA_EXPECTED if family == "llada" else DREAM_EXPECTED
  assert tk.format_chat(with_template, family, "What is 1 + 1?") == expected
  assert tk.format_chat(without, family, "What is 1 + 1?") == expected
  assert tk.builtin_chat_format(family, "What is 1 + 1?") == expected
  # Multi-turn with a system prompt: the built-in format reproduces the template exactly.
  assert (tk.format_chat(with_template, family, CONVERSATION)
          == tk.format_chat(without, family, CONVERSATION))


def test_builtin_formats_multi_turn():
  llada = tk.builtin_chat_format("llada", CONVERSATION)
  assert llada.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief."
                          "<|eot_id|>")
  assert "\n\nWhat is 1 + 1?<|eot_id|>" in llada  # stripped, like the template's | trim
  dream = tk.builtin_chat_format("dream", CONVERSATION)
  assert dream.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
  assert "helpful assistant" not in dream
  assert dream.endswith("<|im_start|>user\nAnd 12 * 12?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family", tk.FAMILIES)
def test_encode_and_decode(tok_dirs, family):
  tok = tk.load_tokenizer(tok_dirs[family, True])
  vocab = tok.get_vocab()
  (chat_ids, plain_ids) = (tk.encode_prompts(tok, ["What is 1 + 1?"], family, chat=True)[0],
                           tk.encode_prompts(tok, "What is 1 + 1?", family, chat=False)[0])
  # Special tokens of the format are single ids; the chat prompt ends with the generation header.
  first = "<|startoftext|>" if family == "llada" else "<|im_start|>"
  assert chat_ids[0] == vocab[first]
  eot = "<|eot_id|>" if family == "llada" else "<|im_end|>"
  assert vocab[eot] in chat_ids
  assert tok.decode(plain_ids) == "What is 1 + 1?"
  # Generated canvas: answer, a still-masked slot, end of turn, then eos padding.
  mask = vocab["<|mdm_mask|>" if family == "llada" else "<|mask|>"]
  answer = tok("Paris is the capital", add_special_tokens=False)["input_ids"]
  canvas = answer[:2] + [mask] + answer[2:] + [vocab[eot]] + answer + [vocab["<|endoftext|>"]] * 3
  assert tk.decode(tok, canvas) == "Paris is the capital"
  assert tk.mask_token_ids(tok) == {mask}
  assert vocab[eot] in tk.stop_token_ids(tok) and vocab["<|endoftext|>"] in tk.stop_token_ids(tok)
  # Explicit stop ids: only eos stops, so the text after <|eot_id|> is kept (specials skipped).
  assert tk.decode(tok, canvas, stop_ids=[vocab["<|endoftext|>"]]) == (
      "Paris is the capital" + "Paris is the capital")
  assert tk.decode(tok, [vocab["<|endoftext|>"]] + answer) == ""


def test_load_from_converted_checkpoint(tmp_path):
  src = str(tmp_path / "hf")
  hf.write_hf_checkpoint(hf.llada_oracle(), "llada", src, dtype=torch.bfloat16)
  hf.write_tokenizer(src, "llada")
  out = convert_hf_checkpoint(src, str(tmp_path / "ckpt"), progress=False)
  a, b = tk.load_tokenizer(src), tk.load_tokenizer(out)
  assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
  assert tk.format_chat(b, "llada", "What is 1 + 1?") == LLADA_EXPECTED


def test_custom_tokenizer_code_is_never_run(tok_dirs, tmp_path):
  """Dream's tokenizer_config names custom code (DreamTokenizer via auto_map). Loading must not
  prompt for or run it: it reads the same vocabulary from tokenizer.json."""
  d = tmp_path / "dream_custom"
  d.mkdir()
  for name in os.listdir(tok_dirs["dream", True]):
    (d / name).write_bytes(open(os.path.join(tok_dirs["dream", True], name), "rb").read())
  config = json.loads((d / "tokenizer_config.json").read_text())
  config.update(tokenizer_class="DreamTokenizer",
                auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  (d / "tokenization_dream.py").write_text("raise RuntimeError('remote code was executed')\n")
  script = textwrap.dedent(f"""
      from focus_jax import tokenizer as tk
      tok = tk.load_tokenizer({str(d)!r})
      print(repr(tk.format_chat(tok, "dream", "What is 1 + 1?")))
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert repr(DREAM_EXPECTED) in proc.stdout


def test_clear_errors(tmp_path, tok_dirs):
  with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
    tk.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    tk.load_tokenizer(str(tmp_path / "missing"))
  tok = tk.load_tokenizer(tok_dirs["llada", False])
  with pytest.raises(ValueError, match="family must be one of"):
    tk.format_chat(tok, "llama", "hi")
  with pytest.raises(ValueError, match="messages is empty"):
    tk.format_chat(tok, "llada", [])
  with pytest.raises(ValueError, match="'role' and 'content'"):
    tk.format_chat(tok, "llada", [{"role": "user"}])
  with pytest.raises(ValueError, match="chat=True"):
    tk.encode_prompts(tok, [[{"role": "user", "content": "hi"}]], "llada", chat=False)


def test_check_matches_config(tok_dirs):
  tok = tk.load_tokenizer(tok_dirs["llada", True])
  vocab = tok.get_vocab()
  config = llada_8b().replace(mask_token_id=vocab["<|mdm_mask|>"],
                              eos_token_id=vocab["<|endoftext|>"])
  tk.check_matches_config(tok, config)
  with pytest.raises(ValueError, match="mask_token_id=126336"):
    tk.check_matches_config(tok, llada_8b())
  with pytest.raises(ValueError, match="disagree"):
    tk.check_matches_config(tk.load_tokenizer(tok_dirs["dream", True]), dream_7b())
