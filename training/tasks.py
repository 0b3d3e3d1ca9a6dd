"""Synthetic long-context tasks for the demo dLLM: passkey, multi-key lookup, variable tracking.

Everything is a sequence of words from one fixed vocabulary (`VOCAB`), so a word-level tokenizer
maps words to ids one to one and the generators can emit ids directly (fast enough to feed a GPU
from numpy). Every example is deterministic given (task, seed, lengths, depth).

Layout of one example (LLaDA SFT style, the prompt stays clean, the response is masked):
  prompt   = <|startoftext|> haystack-with-needles  question : ... ? answer : <anchor>
  response = answer words, then <|endoftext|> up to `gen_length`
The answer is `ANSWER_LEN` words (6-10), so with the demo's block_length 4 it spans two or three
generation blocks.

Why this shape (issue 6's diagnosis, in training/train.py): a small model trained from scratch
learns one circuit fast, "find my left neighbour elsewhere in the prompt and copy the word at a
fixed offset from it", and struggles to tell response positions apart on an all-mask canvas. So
every answer word is determined by its left neighbour alone: the prompt ends with an anchor word
that appears in exactly one needle; answer and anchor words are distinct inside an example; the
output vocabularies are small (64 values, 64 names). Decoding then unmasks an answer left to
right, one hop per step, and in the multi-hop task each word needs the one decoded before it.

Tasks (the names are the keys of `TASKS`):
- "passkey":  one needle "the pass key is v1 .. vn . remember it ." at a chosen depth; the prompt
              ends "answer : the pass key is".
- "kv":       2-4 needles "key K v1 .. vn ." with distinct keys and values (multi-key NIAH); the
              question names one key and the prompt ends with it.
- "vt":       RULER-style variable tracking: "var X1 = V ." then "var X2 = X1 .", "var X3 = X2 .",
              ... (6-10 variables) plus a shorter distractor chain from another value; the
              question asks which variables hold V, the prompt ends with V and the answer lists
              the chain in order, X1 .. Xn (the next variable sits two words before the previous
              one in its assignment).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

# --- vocabulary -------------------------------------------------------------------------------

EOS, BOS, EOT, MASK, UNK = "<|endoftext|>", "<|startoftext|>", "<|eot_id|>", "<|mdm_mask|>", "<unk>"
SPECIALS = (EOS, BOS, EOT, MASK, UNK)
FUNCTION_WORDS = (".", "?", ":", "=", "the", "pass", "key", "is", "remember", "it", "what", "was",
                  "are", "values", "of", "var", "vars", "which", "hold", "question", "answer")


def _filler_words(n: int) -> list[str]:
  """Pronounceable consonant-vowel words ("bako", "tisu", ...): the haystack's noise."""
  cons, vows = "bdfgklmnprstvz", "aeiou"
  syll = [c + v for c in cons for v in vows]
  words = [a + b for a, b in itertools.product(syll, syll)]
  rng = np.random.default_rng(1234)
  return sorted(rng.choice(words, size=n, replace=False).tolist())


def _names(n: int) -> list[str]:
  """Upper-case three-letter names for keys and variables ("QZT")."""
  letters = "BCDFGHJKLMNPQRSTVWXZ"
  names = ["".join(t) for t in itertools.product(letters, repeat=3)]
  rng = np.random.default_rng(4321)
  return sorted(rng.choice(names, size=n, replace=False).tolist())


N_FILLER, N_NAMES, N_VALUES = 512, 64, 64
FILLER = _filler_words(N_FILLER)
NAMES = _names(N_NAMES)
VALUES = [str(v) for v in range(10, 10 + N_VALUES)]  # "10" .. "73"
VOCAB: list[str] = list(SPECIALS) + list(FUNCTION_WORDS) + FILLER + NAMES + VALUES
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
assert len(WORD_ID) == len(VOCAB), "vocabulary words must be unique"

EOS_ID, BOS_ID, EOT_ID, MASK_ID, UNK_ID = (WORD_ID[s] for s in SPECIALS)
FILLER_IDS = np.array([WORD_ID[w] for w in FILLER], np.int32)
NAME_IDS = np.array([WORD_ID[w] for w in NAMES], np.int32)
VALUE_IDS = np.array([WORD_ID[w] for w in VALUES], np.int32)
PERIOD_ID = WORD_ID["."]

TASKS = ("passkey", "kv", "vt")
GEN_LENGTH = 16  # response region: answer + eos padding
BLOCK_LENGTH = 4  # the demo's generation block: every answer spans 2-3 of them
ANSWER_LEN = (6, 10)  # inclusive range of answer lengths (words)


def ids(words: str) -> np.ndarray:
  return np.array([WORD_ID[w] for w in words.split()], np.int32)


@dataclasses.dataclass
class Example:
  """One prompt and its expected answer, as ids (words are `VOCAB[i]`)."""

  task: str
  prompt: np.ndarray  # [P] int32, starts with BOS
  answer: np.ndarray  # [n] int32 value ids (no eos)
  depth: float  # relative position of the (first queried) needle in the haystack

  def response(self, gen_length: int = GEN_LENGTH) -> np.ndarray:
    """The training target of the response region: the answer then eos padding."""
    if len(self.answer) >= gen_length:
      raise ValueError(f"answer of {len(self.answer)} tokens does not fit gen_length={gen_length}")
    out = np.full(gen_length, EOS_ID, np.int32)
    out[:len(self.answer)] = self.answer
    return out

  @property
  def prompt_text(self) -> str:
    return " ".join(VOCAB[i] for i in self.prompt)

  @property
  def answer_text(self) -> str:
    return " ".join(VOCAB[i] for i in self.answer)


def _haystack(rng: np.random.Generator, n: int) -> np.ndarray:
  """n filler words with a period every 6-14 words (sentence boundaries as natural sinks)."""
  words = FILLER_IDS[rng.integers(0, len(FILLER_IDS), size=n)]
  pos = np.cumsum(rng.integers(6, 15, size=n // 6 + 1))
  words[pos[pos < n]] = PERIOD_ID
  return words


def _insert(hay: np.ndarray, needles: list[np.ndarray], depths: list[float]) -> np.ndarray:
  """Inserts each needle at round(depth * len(hay)) (positions in the original haystack)."""
  order = np.argsort(depths, kind="stable")
  pieces, last = [], 0
  for i in order:
    at = int(round(depths[i] * len(hay)))
    pieces += [hay[last:at], needles[i]]
    last = at
  pieces.append(hay[last:])
  return np.concatenate(pieces)


def _answer_len(rng: np.random.Generator) -> int:
  return int(rng.integers(ANSWER_LEN[0], ANSWER_LEN[1] + 1))


class _Distinct:
  """Draws words of one pool without replacement inside an example."""

  def __init__(self, rng: np.random.Generator, pool: np.ndarray):
    self._words, self._at = pool[rng.permutation(len(pool))], 0

  def take(self, n: int) -> np.ndarray:
    if self._at + n > len(self._words):
      raise ValueError(f"an example needs more than {len(self._words)} distinct words")
    out = self._words[self._at:self._at + n]
    self._at += n
    return out


def _build(task: str, rng: np.random.Generator, prompt_len: int,
           depth: float | None) -> Example:
  values, names = _Distinct(rng, VALUE_IDS), _Distinct(rng, NAME_IDS)
  if task == "passkey":
    answer = values.take(_answer_len(rng))
    needles = [np.concatenate([ids("the pass key is"), answer, ids(". remember it .")])]
    question = ids("question : what was the pass key ? answer : the pass key is")
    depths = [rng.uniform() if depth is None else depth]
  elif task == "kv":
    n_pairs = int(rng.integers(2, 5))
    keys = names.take(n_pairs)
    records = [values.take(_answer_len(rng)) for _ in range(n_pairs)]
    needles = [np.concatenate([ids("key"), [k], v, ids(".")]) for k, v in zip(keys, records)]
    depths = list(rng.uniform(size=n_pairs))
    if depth is not None:
      depths[0] = depth
    answer = records[0]
    question = np.concatenate([ids("question : what are the values of key"), [keys[0]],
                               ids("? answer :"), [keys[0]]])
  elif task == "vt":
    answer = names.take(_answer_len(rng))
    decoy = names.take(int(rng.integers(2, 5)))
    value, decoy_value = values.take(2)
    needles = []
    for chain, start in ((answer, value), (decoy, decoy_value)):
      needles += [np.concatenate([ids("var"), [x], ids("="), [prev], ids(".")])
                  for prev, x in zip(np.concatenate([[start], chain[:-1]]), chain)]
    depths = list(rng.uniform(size=len(needles)))
    if depth is not None:
      depths[0] = depth
    question = np.concatenate([ids("question : which vars hold"), [value], ids("? answer :"),
                               [value]])
  else:
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
  n_hay = prompt_len - 1 - len(question) - sum(len(n) for n in needles)
  if n_hay < 16:
    raise ValueError(f"prompt_len={prompt_len} is too short for task {task!r}")
  body = _insert(_haystack(rng, n_hay), needles, depths)
  prompt = np.concatenate([[BOS_ID], body, question]).astype(np.int32)
  assert len(prompt) == prompt_len
  return Example(task, prompt, np.asarray(answer, np.int32), float(depths[0]))


def make_example(task: str, seed: int, prompt_len: int, depth: float | None = None) -> Example:
  """One example of `task` with exactly `prompt_len` prompt tokens, deterministic in `seed`.

  `depth` in [0, 1] pins the queried needle (None: uniform).
  """
  if depth is not None and not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  # Distinct streams per task and length, so grids of (task, length, seed) never repeat.
  rng = np.random.default_rng([seed, TASKS.index(task) if task in TASKS else 99, prompt_len])
  return _build(task, rng, prompt_len, depth)


def training_batch(rng: np.random.Generator, batch: int, seq_len: int,
                   gen_length: int = GEN_LENGTH) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, seq_len], prompt_len [B]) of a mixed-task batch: prompt then response.

  Tasks are mixed uniformly per row; every row has exactly seq_len tokens (no padding).
  """
  prompt_len = seq_len - gen_length
  tokens = np.empty((batch, seq_len), np.int32)
  for r in range(batch):
    task = TASKS[int(rng.integers(len(TASKS)))]
    ex = _build(task, rng, prompt_len, None)
    tokens[r, :prompt_len] = ex.prompt
    tokens[r, prompt_len:] = ex.response(gen_length)
  return tokens, np.full((batch,), prompt_len, np.int32)


def exact_match(generated: np.ndarray, answer: np.ndarray) -> bool:
  """The generated ids up to the first eos equal the answer."""
  generated = np.asarray(generated)
  stop = np.nonzero(generated == EOS_ID)[0]
  got = generated[:stop[0]] if len(stop) else generated
  return len(got) == len(answer) and bool(np.all(got == answer))


def induction_batch(rng: np.random.Generator, batch: int,
                    seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, L], target [B, L] bool) of the dense induction stream.

  Each row is filler, a run of distinct value and name words, more filler, then the same run
  again, then filler; `target` marks the second copy. Trained like the SFT stream (only the
  targets are masked, the rest stays clean), every masked word whose left (or right) neighbour
  is visible is predictable by the same circuit the tasks need, at random offsets (so a fixed
  relative position cannot solve it), with ten times the targets per row of the SFT stream.
  """
  pool = np.concatenate([VALUE_IDS, NAME_IDS])
  tokens = FILLER_IDS[rng.integers(0, len(FILLER_IDS), size=(batch, seq_len))]
  target = np.zeros((batch, seq_len), bool)
  max_run = min(len(pool), (seq_len - 8) // 2)
  # Runs of half a response region up to half the row (8-28 words at 64 tokens).
  runs = rng.integers(max(2, min(GEN_LENGTH, max_run) // 2), max_run + 1, size=batch)
  for r in range(batch):
    n = int(runs[r])
    words = pool[rng.permutation(len(pool))[:n]]
    gap = seq_len - 2 * n
    a, b = np.sort(rng.integers(0, gap + 1, size=2))
    tokens[r, a:a + n] = words
    second = b + n
    tokens[r, second:second + n] = words
    target[r, second:second + n] = True
  return tokens, target
