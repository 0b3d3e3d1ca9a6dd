"""The demo model's tokenizer: word level over `tasks.VOCAB`, built with `tokenizers`.

Saved as tokenizer.json + tokenizer_config.json (which names the special tokens) so
`focus_jax.tokenizer.load_tokenizer` loads it like any checkpoint's. Ids equal `tasks.WORD_ID`,
so the generators' ids and the tokenizer's agree by construction (a test checks it).
"""

from __future__ import annotations

import json
import os

from focus_jax.training import tasks


def build_tokenizer():
  """A `tokenizers.Tokenizer`: whitespace split, one id per vocabulary word."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.WordLevel(vocab=dict(tasks.WORD_ID), unk_token=tasks.UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tasks.SPECIALS])
  return tok


def save_tokenizer(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
  special = {"bos_token": tasks.BOS, "eos_token": tasks.EOS, "pad_token": tasks.EOS,
             "mask_token": tasks.MASK, "unk_token": tasks.UNK}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 16384,
            "add_bos_token": False, "clean_up_tokenization_spaces": False, **special}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
