"""`python main.py --config=configs/tiny.py` end to end: text and a timing row for every mode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_tiny_runs_every_mode(tmp_path):
  """From another folder too; configs/tiny.py's Focus has sparse layers (its 4 layers: 2
  dense)."""
  cmd = [sys.executable, os.path.join(ROOT, "main.py"),
         f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", "--config.gen_length=32",
         "--config.steps=32", "--config.block_length=16",
         "--config.modes=('vanilla','prefix_cache','dual_cache','focus')",
         "--config.decoding.focus.diagnostics=True",
         "--config.prompts=('What is 2+2?', 'Name a colour.')"]
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  for mode in ("vanilla", "prefix_cache", "dual_cache", "focus"):
    assert f"=== {mode} ===" in text
    assert any(line.startswith(mode + " ") for line in text.splitlines()), text
  assert "recall_focus" in text and "retained_mass_per_layer" in text
  assert "seconds_in_refresh_steps" in text and "seconds_in_sparse_steps" in text
  assert "tokens/s" in text
  mass = next(line for line in text.splitlines() if "retained_mass_per_layer" in line)
  assert mass.count("1.0") < 4, mass  # sparse layers keep less than all the mass
  assert sum(line.startswith("'") for line in text.splitlines()) == 8  # 2 prompts x 4 modes


def test_main_rejects_unknown_mode():
  cmd = [sys.executable, "main.py", "--config=configs/tiny.py", "--config.modes=('sparse',)"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "unknown decoding mode 'sparse'" in out.stderr


def test_main_refuses_bad_settings_before_loading_the_model():
  """A mode typo is refused before the model is even looked for (this path does not exist); a
  schedule that does not divide, or a Focus knob out of range behind a dense mode, before any
  weight is drawn (the 8B preset's would take minutes and more memory than a CI machine has);
  a misspelt preset names the presets."""
  base = [sys.executable, "main.py", "--config=configs/tiny.py"]
  for flags, says in ((["--config.model=/nonexistent/checkpoint",
                        "--config.modes=('vanilla','focsu')"], "unknown decoding mode 'focsu'"),
                      (["--config.model=llada_8b", "--config.gen_length=32",
                        "--config.block_length=16", "--config.steps=3"],
                       "steps (3) must be a positive multiple"),
                      (["--config.model=llada_8b", "--config.modes=('vanilla','focus')",
                        "--config.decoding.focus.alpha=1.5"], "alpha must be in (0, 1]"),
                      (["--config.model=tinyy"], "or a preset with random weights: tiny")):
    out = subprocess.run(base + flags, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and says in out.stderr, out.stderr[-2000:]


def test_fp8_refresh_and_pad_to():
  """fp8 attention cannot mask pads: a short prompt left-padded to 64 is refused, naming the
  way out, and runs with --config.pad_to=1 (no padding)."""
  cmd = [sys.executable, "main.py", "--config=configs/tiny.py", "--config.gen_length=32",
         "--config.steps=32", "--config.block_length=16", "--config.modes=('dual_cache',)",
         "--config.decoding.dual_cache.refresh_fp8_attention=True"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "pad tokens" in out.stderr and "--config.pad_to" in out.stderr, out.stderr[-2000:]
  out = subprocess.run(cmd + ["--config.pad_to=1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "=== dual_cache ===" in out.stdout


def test_default_run_answers_the_generated_question(tmp_path):
  """`python main.py` as shipped (configs/demo.py, the trained demo_model/), on a shorter
  prompt so CI stays quick (and without the Focus time split, which test_main_tiny_runs_every_mode
  covers): dense and Focus both print the expected answer, and no time split. Run from another
  folder: the default config is the one next to main.py."""
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config.task_prompt_length=496",
         "--config.seed=3", "--config.time_split=False"]
  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "=== vanilla ===" in text and "=== focus ===" in text
  assert text.count("correct: yes") == 2, text[-3000:]
  assert "recall_focus" in text and "seconds_in_refresh_steps" not in text
  rows = [line.split() for line in text.splitlines() if line.startswith(("vanilla ", "focus "))]
  assert len(rows) == 2 and all(row[-1] == "yes" for row in rows), rows


def test_sampler_settings_of_another_family_are_refused_before_loading(monkeypatch):
  """A LLaDA config file pointed at a Dream model: refused from the model's config alone (the
  7B preset's weights are never drawn), naming the config file that fits."""
  sys.path.insert(0, ROOT)
  import main as main_module  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny.get_config()
  cfg.model = "dream_7b"
  monkeypatch.setattr(main_module.focus_jax, "load", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("loaded")))
  with pytest.raises(ValueError, match=r"not dream's.*configs/dream_7b\.py"):
    main_module._check_before_loading(cfg)  # pylint: disable=protected-access
  cfg.model = "tiny"
  main_module._check_before_loading(cfg)  # pylint: disable=protected-access
