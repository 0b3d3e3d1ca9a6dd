"""focus_jax.pipeline's entry points refuse bad input early, naming the problem and the fix."""

from __future__ import annotations

import types

import numpy as np
import pytest

import focus_jax
from focus_jax import pipeline


@pytest.fixture(scope="module")
def tiny():
  return focus_jax.load("tiny")


def test_pad_prompts_takes_arrays_and_names_empty_input():
  tokens, mask = pipeline.pad_prompts(np.array([[1, 2, 3]]), pad_id=0, pad_to=4)
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(mask, [[False, True, True, True]])
  with pytest.raises(ValueError, match="no prompts given"):
    pipeline.pad_prompts([], pad_id=0)
  with pytest.raises(ValueError, match=r"prompt rows \[1\] have none"):
    pipeline.pad_prompts([[1], []], pad_id=0)


def test_generate_ids_refuses_ids_outside_the_vocabulary(tiny):
  prompt = np.array([[5, 7, tiny.config.vocab_size, 2]], np.int32)
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 264\)"):
    pipeline.generate_ids(tiny, prompt, np.ones_like(prompt, bool), gen_length=8, steps=8,
                          block_length=8)
  with pytest.raises(ValueError, match="integer token ids"):
    pipeline.generate_ids(tiny, prompt.astype(np.float32), None, gen_length=8, steps=8,
                          block_length=8)


@pytest.mark.parametrize("mask, says", [
    ([[True, True, True, False]], "row 0 is not a left padding"),  # right padding
    ([[False, True, False, True]], "row 0 is not a left padding"),  # a gap
    ([[False, False, False, False]], "at least one token"),
    ([[True, True]], "must have the prompt's shape"),
])
def test_generate_ids_refuses_masks_that_are_not_a_left_padding(tiny, mask, says):
  prompt = np.array([[5, 7, 9, 2]], np.int32)
  with pytest.raises(ValueError, match=says):
    pipeline.generate_ids(tiny, prompt, np.asarray(mask), gen_length=8, steps=8,
                          block_length=8)


def test_a_left_padded_batch_passes(tiny):
  prompt, mask = pipeline.pad_prompts([[5, 7, 9], [4]], pad_id=0, pad_to=1)
  pipeline.check_prompt(tiny.config, prompt, mask)
  pipeline.check_prompt(tiny.config, prompt[:1], None)


def test_load_refuses_a_bad_matmul_impl_before_reading_weights(monkeypatch):
  from focus_jax import checkpoints_convert  # pylint: disable=g-import-not-at-top

  def never(*args, **kwargs):
    raise AssertionError("weights were read before matmul_impl was checked")

  monkeypatch.setattr(checkpoints_convert, "load_model", never)
  with pytest.raises(ValueError, match="matmul_impl must be one of"):
    focus_jax.load("/some/checkpoint", matmul_impl="palas_gpu")


def test_sampler_options_of_another_family_name_the_right_config(tiny):
  with pytest.raises(ValueError, match=r"\['alg'\] are not llada's.*configs/llada_8b\.py"):
    pipeline.sampler_rule(tiny.config, steps=8, gen_length=8, block_length=8, alg="entropy")
  dream = tiny.config.replace(family="dream")
  with pytest.raises(ValueError, match=r"\['remasking'\] are not dream's.*configs/dream_7b\.py"):
    pipeline.sampler_rule(dream, steps=8, gen_length=8, block_length=8,
                          remasking="low_confidence")


def test_load_reads_the_tokenizer_before_the_weights(tmp_path, monkeypatch):
  """A broken tokenizer file fails before any weight is read; a good one is checked against the
  model config (the demo checkpoint's)."""
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from focus_jax import checkpoints_convert  # pylint: disable=g-import-not-at-top
  demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model")
  model = focus_jax.load(demo)
  assert model.tokenizer is not None
  broken = tmp_path / "demo"
  shutil.copytree(demo, broken)
  (broken / "tokenizer.json").write_text("{ not json")

  def never(*args, **kwargs):
    raise AssertionError("weights were read before the tokenizer")

  monkeypatch.setattr(checkpoints_convert, "load_model", never)
  with pytest.raises(Exception) as err:
    focus_jax.load(str(broken))
  assert not isinstance(err.value, AssertionError), err.value


def test_pad_to_stops_rounding_where_the_model_has_no_room(tiny, monkeypatch):
  """Rounding up to pad_to stops at the room the model has beside the generation (a prompt that
  fits unpadded is never refused for its padding); a prompt too long anyway is left to the
  length check."""
  tokens, mask = pipeline.pad_prompts([[1] * 8], pad_id=0, pad_to=64, max_length=20)
  assert tokens.shape == (1, 20) and mask.sum() == 8 and mask[0, -8:].all()
  assert pipeline.pad_prompts([[1] * 30], pad_id=0, pad_to=64, max_length=20)[0].shape == (1, 64)
  seen = {}

  def generate_ids(model, prompt, mask, **kw):
    seen["shape"] = prompt.shape
    return types.SimpleNamespace(tokens=prompt)

  monkeypatch.setattr(pipeline, "generate_ids", generate_ids)
  monkeypatch.setattr(pipeline, "decode_rows", lambda *a: [])
  limit = tiny.config.max_sequence_length
  pipeline.generate("a" * 8, tiny, chat=False, pad_to=64, gen_length=limit - 20)
  assert seen["shape"] == (1, 20)
