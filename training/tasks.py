"""Synthetic long-context tasks for the demo dLLM: passkey, multi-key lookup, variable tracking.

Everything is a sequence of words from one fixed vocabulary (`VOCAB`), so a word-level tokenizer
maps words to ids one to one and the generators can emit ids directly (fast enough to feed a GPU
from numpy). Every example is deterministic given (task, seed, lengths, depth).

Layout of one example (LLaDA SFT style, the prompt stays clean, the response is masked):
  prompt   = <|startoftext|> haystack-with-needles  question : ... ? answer : <lead-in>
  response = answer words, then <|endoftext|> up to `gen_length`
The answer is `ANSWER_LEN` value words (16-24 by default), so with block_length 8 it spans
several generation blocks. The prompt ends with the words that precede the value in the needle
("the pass key is", "the value of key KEY is", "var NAME ="), so a small model can learn the
lookup as an induction pattern (from scratch, a bare "answer :" stayed at chance in 6K steps).

Tasks (the names are the keys of `TASKS`):
- "passkey":  one needle "the pass key is v1 .. vn . remember it ." at a chosen depth;
              question "what is the pass key ?".
- "kv":       4-8 needles "the value of key KEY is v1 .. vn ." with distinct keys; the question
              asks for one key's value (multi-key NIAH).
- "vt":       RULER-style variable tracking with 2 hops: "var A = v1 .. vn ." and
              "var B = var A ." (plus a distractor chain); question "what is the value of var B ?".
Value words are drawn without replacement inside an example, so copying a value is unambiguous.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

# --- vocabulary -------------------------------------------------------------------------------

EOS, BOS, EOT, MASK, UNK = "<|endoftext|>", "<|startoftext|>", "<|eot_id|>", "<|mdm_mask|>", "<unk>"
SPECIALS = (EOS, BOS, EOT, MASK, UNK)
FUNCTION_WORDS = (".", "?", ":", "=", "the", "pass", "key", "is", "remember", "it", "what",
                  "value", "of", "var", "question", "answer")


def _filler_words(n: int) -> list[str]:
  """Pronounceable consonant-vowel words ("bako", "tisu", ...): the haystack's noise."""
  cons, vows = "bdfgklmnprstvz", "aeiou"
  syll = [c + v for c in cons for v in vows]
  words = [a + b for a, b in itertools.product(syll, syll)]
  rng = np.random.default_rng(1234)
  return sorted(rng.choice(words, size=n, replace=False).tolist())


def _key_names(n: int) -> list[str]:
  """Upper-case three-letter names for keys and variables ("QZT")."""
  letters = "BCDFGHJKLMNPQRSTVWXZ"
  names = ["".join(t) for t in itertools.product(letters, repeat=3)]
  rng = np.random.default_rng(4321)
  return sorted(rng.choice(names, size=n, replace=False).tolist())


N_FILLER, N_KEYS, N_VALUES = 512, 256, 900
FILLER = _filler_words(N_FILLER)
KEYS = _key_names(N_KEYS)
VALUES = [str(v) for v in range(100, 100 + N_VALUES)]  # "100" .. "999"
VOCAB: list[str] = list(SPECIALS) + list(FUNCTION_WORDS) + FILLER + KEYS + VALUES
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
assert len(WORD_ID) == len(VOCAB), "vocabulary words must be unique"

EOS_ID, BOS_ID, EOT_ID, MASK_ID, UNK_ID = (WORD_ID[s] for s in SPECIALS)
FILLER_IDS = np.array([WORD_ID[w] for w in FILLER], np.int32)
KEY_IDS = np.array([WORD_ID[w] for w in KEYS], np.int32)
VALUE_IDS = np.array([WORD_ID[w] for w in VALUES], np.int32)
PERIOD_ID = WORD_ID["."]

TASKS = ("passkey", "kv", "vt")
GEN_LENGTH = 32  # response region: answer + eos padding
ANSWER_LEN = (16, 24)  # inclusive range of answer lengths (value words)


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


def _build(task: str, rng: np.random.Generator, prompt_len: int,
           depth: float | None) -> Example:
  vals = VALUE_IDS[rng.permutation(len(VALUE_IDS))]  # distinct value words for this example
  vcur = 0

  def take_value():
    nonlocal vcur
    n = _answer_len(rng)
    out = vals[vcur:vcur + n]
    vcur += n
    return out

  if task == "passkey":
    answer = take_value()
    needles = [np.concatenate([ids("the pass key is"), answer, ids(". remember it .")])]
    question = ids("question : what is the pass key ? answer : the pass key is")
    depths = [rng.uniform() if depth is None else depth]
  elif task == "kv":
    n_pairs = min(int(rng.integers(4, 9)), max(2, (prompt_len - 40) // 40))
    keys = KEY_IDS[rng.choice(len(KEY_IDS), size=n_pairs, replace=False)]
    values = [take_value() for _ in range(n_pairs)]
    needles = [np.concatenate([ids("the value of key"), [k], ids("is"), v, ids(".")])
               for k, v in zip(keys, values)]
    depths = list(rng.uniform(size=n_pairs))
    if depth is not None:
      depths[0] = depth
    answer = values[0]
    question = np.concatenate([ids("question : what is the value of key"), [keys[0]],
                               ids("? answer : the value of key"), [keys[0]], ids("is")])
  elif task == "vt":
    names = KEY_IDS[rng.choice(len(KEY_IDS), size=4, replace=False)]  # 2 chains of 2 variables
    values = [take_value(), take_value()]
    needles, depths = [], []
    for c in range(2):
      root, alias = names[2 * c], names[2 * c + 1]
      needles.append(np.concatenate([ids("var"), [root], ids("="), values[c], ids(".")]))
      needles.append(np.concatenate([ids("var"), [alias], ids("= var"), [root], ids(".")]))
      depths += list(rng.uniform(size=2))
    if depth is not None:
      depths[0] = depth
    answer = values[0]
    question = np.concatenate([ids("question : what is the value of var"), [names[1]],
                               ids("? answer : var"), [names[1]], ids("=")])
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


def copy_batch(rng: np.random.Generator, batch: int, seq_len: int,
               n_pairs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, L], target [B, L] bool) of the auxiliary copy stream.

  Each row is haystack with `n_pairs` spans of 8-24 value words, every span present twice at
  random places; `target` marks the span tokens, the only predictable ones. Trained with masks
  over the whole row (LLaDA's pretraining form), it gives thousands of copy targets per batch,
  so the lookup ("the token after the same context elsewhere") is learned fast; the SFT stream
  then only has to point it at the queried needle.
  """
  n_pairs = n_pairs or min(36, max(2, seq_len // 64))  # 36 x 24 < 900 distinct values
  tokens = np.empty((batch, seq_len), np.int32)
  target = np.zeros((batch, seq_len), bool)
  for r in range(batch):
    vals = VALUE_IDS[rng.permutation(len(VALUE_IDS))]
    spans, at = [], 0
    for _ in range(n_pairs):
      n = int(rng.integers(8, 25))
      spans.append(vals[at:at + n])
      at = (at + n) % (len(vals) - 24)
    needles = spans + spans
    n_hay = seq_len - sum(len(s) for s in needles)
    row = _insert(_haystack(rng, n_hay), needles, list(rng.uniform(size=len(needles))))
    tokens[r] = row
    target[r] = np.isin(row, np.concatenate(spans))
  return tokens, target
