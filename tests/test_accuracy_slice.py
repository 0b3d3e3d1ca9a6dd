"""A CPU slice of benchmarks/accuracy.py: the shipped demo model must answer its tasks in dense
and Focus decoding, so the accuracy yardstick never silently breaks."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "demo_model")


def _accuracy_module():
  spec = importlib.util.spec_from_file_location(
      "accuracy_bench", os.path.join(ROOT, "benchmarks", "accuracy.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(not os.path.exists(os.path.join(MODEL, "config.json")),
                    reason="demo_model/ not shipped")
def test_demo_model_answers_in_dense_and_focus():
  import focus_jax
  acc = _accuracy_module()
  model = focus_jax.load(MODEL, dtype="float32")
  examples = acc.build_examples([1024], [0.5], seeds=1, per_task=1)  # passkey, kv, vt
  result = acc.run(model, examples, ["vanilla", "focus"], block_length=16)
  summary = acc.summarize(result)
  hits = {(r["variant"], r["task"]): r["hit"] for r in result["records"] if r["task"] != "_time"}
  assert hits[("vanilla", "passkey")] and hits[("focus", "passkey")], hits
  assert hits[("vanilla", "kv")] and hits[("focus", "kv")], hits
  assert summary["overall"]["focus"] >= summary["overall"]["vanilla"] - 1 / 3, summary["overall"]
  diag = summary["diagnostics"][0]
  assert 0.5 <= diag["recall_active"] <= 1.0 and 0.0 < diag["retained_mass_sparse_mean"] <= 1.0
