"""The synthetic tasks: deterministic, exact lengths, the answer really is in the context, and
the word-level tokenizer maps the same words to the same ids."""

from __future__ import annotations

import numpy as np
import pytest

from focus_jax.training import tasks, tokenizer_files


def _contains(haystack: np.ndarray, needle: np.ndarray) -> list[int]:
  n = len(needle)
  windows = np.lib.stride_tricks.sliding_window_view(haystack, n)
  return np.nonzero(np.all(windows == needle, axis=1))[0].tolist()


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [512, 1024, 8192])
def test_lengths_answer_in_context_and_deterministic(task, length):
  ex = tasks.make_example(task, 3, length)
  again = tasks.make_example(task, 3, length)
  other = tasks.make_example(task, 4, length)
  assert len(ex.prompt) == length and ex.prompt[0] == tasks.BOS_ID
  np.testing.assert_array_equal(ex.prompt, again.prompt)
  np.testing.assert_array_equal(ex.answer, again.answer)
  assert not np.array_equal(ex.prompt, other.prompt)
  assert tasks.ANSWER_LEN[0] <= len(ex.answer) <= tasks.ANSWER_LEN[1]
  assert np.isin(ex.answer, tasks.VALUE_IDS).all()
  assert len(_contains(ex.prompt, ex.answer)) == 1  # exactly once: no ambiguity
  assert not np.isin(ex.prompt, [tasks.MASK_ID, tasks.EOS_ID]).any()
  words = ex.prompt_text.split()
  assert "answer" in words[-8:]


def test_question_names_the_right_needle():
  kv = tasks.make_example("kv", 1, 1024)
  key = kv.prompt[-2]  # "... answer : the value of key KEY is"
  at = _contains(kv.prompt, np.concatenate([[key], tasks.ids("is"), kv.answer]))
  assert len(at) == 1
  vt = tasks.make_example("vt", 1, 1024)
  alias = vt.prompt[-2]  # "... answer : var ALIAS ="
  # var ALIAS = var ROOT .  and  var ROOT = answer .
  hop = _contains(vt.prompt, np.concatenate([tasks.ids("var"), [alias], tasks.ids("= var")]))
  assert len(hop) == 1
  root = vt.prompt[hop[0] + 4]
  assert len(_contains(vt.prompt, np.concatenate([tasks.ids("var"), [root], tasks.ids("="),
                                                  vt.answer]))) == 1


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_depth(depth):
  ex = tasks.make_example("passkey", 0, 4096, depth=depth)
  at = _contains(ex.prompt, ex.answer)[0]
  assert abs(at / len(ex.prompt) - depth) < 0.02
  with pytest.raises(ValueError, match="depth"):
    tasks.make_example("passkey", 0, 4096, depth=1.5)


def test_training_batch_layout():
  tokens, prompt_len = tasks.training_batch(np.random.default_rng(0), 4, 1024)
  assert tokens.shape == (4, 1024) and (prompt_len == 1024 - tasks.GEN_LENGTH).all()
  resp = tokens[:, -tasks.GEN_LENGTH:]
  for row in resp:
    n = int(np.argmax(row == tasks.EOS_ID))
    assert tasks.ANSWER_LEN[0] <= n <= tasks.ANSWER_LEN[1]
    assert (row[n:] == tasks.EOS_ID).all()
  again, _ = tasks.training_batch(np.random.default_rng(0), 4, 1024)
  np.testing.assert_array_equal(tokens, again)


def test_copy_stream_spans_appear_twice():
  tokens, target = tasks.copy_batch(np.random.default_rng(0), 3, 1024)
  assert tokens.shape == (3, 1024) and target.any(axis=1).all()
  for row, tgt in zip(tokens, target):
    vals, counts = np.unique(row[tgt], return_counts=True)
    assert (counts == 2).all() and np.isin(vals, tasks.VALUE_IDS).all()


def test_exact_match():
  ans = np.array([5, 6, 7])
  assert tasks.exact_match(np.array([5, 6, 7, tasks.EOS_ID, 9]), ans)
  assert not tasks.exact_match(np.array([5, 6, 7, 8, tasks.EOS_ID]), ans)
  assert not tasks.exact_match(np.array([5, 6, tasks.EOS_ID]), ans)


def test_tokenizer_matches_vocabulary(tmp_path):
  from focus_jax.tokenizer import decode, load_tokenizer
  tokenizer_files.save_tokenizer(str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  ex = tasks.make_example("vt", 0, 600)
  assert tok(ex.prompt_text, add_special_tokens=False)["input_ids"] == ex.prompt.tolist()
  assert tok.eos_token_id == tasks.EOS_ID and tok.mask_token_id == tasks.MASK_ID
  out = decode(tok, list(ex.answer) + [tasks.EOS_ID, 9])
  assert out == ex.answer_text
