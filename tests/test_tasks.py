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
  pool = tasks.NAME_IDS if task == "vt" else tasks.VALUE_IDS
  assert np.isin(ex.answer, pool).all() and len(set(ex.answer.tolist())) == len(ex.answer)
  if task != "vt":
    assert len(_contains(ex.prompt, ex.answer)) == 1  # exactly once: no ambiguity
  assert not np.isin(ex.prompt, [tasks.MASK_ID, tasks.EOS_ID]).any()
  words = ex.prompt_text.split()
  assert "answer" in words[-8:]


def _next_after(prompt: np.ndarray, word: int, offset: int) -> list[int]:
  """The words at `offset` from every occurrence of `word` in the prompt's body (not the
  question, which starts at the last "question")."""
  body = prompt[:np.nonzero(prompt == tasks.WORD_ID["question"])[0][-1]]
  return [int(body[i + offset]) for i in np.nonzero(body == word)[0]
          if 0 <= i + offset < len(body)]


@pytest.mark.parametrize("seed", range(5))
def test_every_answer_word_follows_from_its_left_neighbour(seed):
  """The property the tasks are built on: the anchor (the prompt's last word) and then each
  answer word occur once in the context, and the next answer word sits at a fixed offset from
  that occurrence (+1 for passkey and kv, -2 for variable tracking's "var NEXT = PREV .", where
  the only other match is the word before PREV's own "var", never a name)."""
  for task, offset, pool in (("passkey", 1, tasks.VALUE_IDS), ("kv", 1, tasks.VALUE_IDS),
                             ("vt", -2, tasks.NAME_IDS)):
    ex = tasks.make_example(task, seed, 1024)
    left = int(ex.prompt[-1])
    for word in ex.answer:
      found = [w for w in _next_after(ex.prompt, left, offset) if np.isin(w, pool)]
      assert found == [int(word)], (task, tasks.VOCAB[left])
      left = int(word)


def test_kv_question_names_one_of_several_keys():
  kv = tasks.make_example("kv", 1, 1024)
  key = kv.prompt[-1]
  assert np.isin(key, tasks.NAME_IDS)
  assert len(_contains(kv.prompt, np.concatenate([tasks.ids("key"), [key], kv.answer]))) == 1
  assert np.sum(kv.prompt == tasks.WORD_ID["key"]) >= 3  # >= 2 records + the question


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


def test_induction_stream_repeats_one_run():
  tokens, target = tasks.induction_batch(np.random.default_rng(0), 16, 64)
  assert tokens.shape == (16, 64) and target.any(axis=1).all()
  for row, tgt in zip(tokens, target):
    second = row[tgt]
    assert len(_contains(row, second)) == 2  # the targets copy a run found earlier in the row
    assert len(set(second.tolist())) == len(second)


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
