"""Reading HF config.json files: what is supported, and clear errors for what is not."""

from __future__ import annotations

import json
import os

import pytest

from focus_jax.models.config import ModelConfig, from_hf_config

LLADA = {"model_type": "llada", "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
         "mlp_hidden_size": 128, "vocab_size": 100, "embedding_size": 104, "rope_theta": 7e6,
         "max_sequence_length": 8192, "mask_token_id": 99, "eos_token_id": 5}


def write(tmp_path, data) -> str:
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(data, f)
  return str(tmp_path)


def test_rope_base_and_sizes_come_from_the_file(tmp_path):
  cfg = from_hf_config(write(tmp_path, LLADA))
  assert cfg.rope_theta == 7e6  # UltraLLaDA's enlarged base is taken as is
  assert cfg.vocab_size == 104  # the embedding size, which can exceed the tokenizer's
  assert (cfg.max_sequence_length, cfg.mask_token_id, cfg.head_dim) == (8192, 99, 16)
  assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_list_valued_ids_take_the_first(tmp_path):
  cfg = from_hf_config(write(tmp_path, dict(LLADA, eos_token_id=[5, 6])))
  assert cfg.eos_token_id == 5
  hash(cfg)  # still usable as a static jit argument


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "rope_scaling"),
    ({"weight_tying": True}, "weight_tying"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"eos_token_id": []}, "empty list"),
])
def test_unsupported_configs_fail_with_the_reason(tmp_path, change, match):
  with pytest.raises(ValueError, match=match):
    from_hf_config(write(tmp_path, dict(LLADA, **change)))


def test_missing_config_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="Hugging Face checkpoint"):
    from_hf_config(str(tmp_path))


def test_eot_id_only_when_the_vocabulary_has_it(tmp_path):
  assert from_hf_config(write(tmp_path, LLADA)).eot_token_id is None  # 104-token vocabulary
  assert from_hf_config(write(tmp_path, dict(LLADA, eot_token_id=3))).eot_token_id == 3
  big = dict(LLADA, vocab_size=126464, embedding_size=126464)
  assert from_hf_config(write(tmp_path, big)).eot_token_id == 126348
