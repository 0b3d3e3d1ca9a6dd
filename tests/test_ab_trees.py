"""benchmarks/ab_trees.py: packing commits for a same-machine A/B, and the interleaved rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "benchmarks"))  # after site-packages: benchmarks/kernels.py must not shadow the `kernels` package
import ab_trees  # noqa: E402  pylint: disable=g-import-not-at-top


def test_pack_a_commit_and_the_worktree(tmp_path):
  names = ab_trees.pack(["base=HEAD", "new=WORKTREE"], str(tmp_path))
  assert names == ["base", "new"]
  assert (tmp_path / "ORDER").read_text().split() == ["base", "new"]
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                        check=True).stdout.strip()
  for name, commit in (("base", head), ("new", head + "+worktree")):
    tree = tmp_path / name
    assert json.loads((tree / "TREE").read_text())["commit"] == commit
    for path in ("pyproject.toml", "focus_jax/__init__.py", "models/transformer.py",
                 "kernels/matmul.py", "benchmarks/e2e.py"):
      assert (tree / path).is_file(), (name, path)
    assert not (tree / "benchmarks" / "results").exists()  # large, not needed to run
    assert not (tree / "tests").exists()
  assert (tmp_path / "base" / "models" / "transformer.py").read_bytes() == subprocess.run(
      ["git", "show", "HEAD:models/transformer.py"], cwd=ROOT, capture_output=True,
      check=True).stdout
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging left behind


def test_pack_rejects_bad_specs(tmp_path):
  with pytest.raises(SystemExit, match="name=rev"):
    ab_trees.pack(["HEAD"], str(tmp_path))
  with pytest.raises(subprocess.CalledProcessError):
    ab_trees.pack(["x=not-a-commit"], str(tmp_path))
  assert not os.path.exists(tmp_path / "x")


def _fake_tree(root, name, step_s):
  """A tree whose e2e.py writes one row with a fixed step time (and echoes its arguments)."""
  bench = root / name / "benchmarks"
  bench.mkdir(parents=True)
  (root / name / "TREE").write_text(json.dumps({"name": name, "rev": name, "commit": name}))
  (bench / "e2e.py").write_text(textwrap.dedent(f"""
      import json, sys
      out = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--out=")][0]
      row = dict(context=8, variant="focus", sparse_step_s={step_s}, refresh_s=1.0,
                 args=sys.argv[1:-1])
      json.dump(dict(results=[row]), open(out, "w"))
  """))


def test_run_interleaves_rounds_and_summarises(tmp_path, capsys):
  _fake_tree(tmp_path, "base", 0.006)
  _fake_tree(tmp_path, "new", 0.005)
  (tmp_path / "ORDER").write_text("base\nnew\n")
  out = tmp_path / "ab.json"
  report = ab_trees.run(str(tmp_path), 3, ["--model=tiny"], str(out), install=False)
  assert [(r["tree"], r["round"]) for r in report["results"]] == [
      (t, k) for k in range(3) for t in ("base", "new")]
  assert all(r["args"] == ["--model=tiny"] for r in report["results"])
  by_tree = {s["tree"]: s for s in report["summary"]}
  assert by_tree["base"]["sparse_step_s"] == 0.006 and by_tree["new"]["rounds"] == 3
  assert by_tree["new"]["sparse_step_s"] == 0.005
  assert json.loads(out.read_text())["summary"] == report["summary"]
  assert "5.000 ms" in capsys.readouterr().out
