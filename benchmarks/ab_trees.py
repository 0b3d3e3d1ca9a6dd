"""Same-machine A/B of commits: H200 machines differ by about 3%, and one machine's runs of one
build spread by 1-2%, so code is compared only inside one device call, in interleaved rounds.

Here (a git checkout): pack each side into .ab/<name>/ (gitignored; carry it to the device):

    python benchmarks/ab_trees.py pack base=3669961 new=WORKTREE

On the device (after `source benchmarks/gpu_env.sh`; carry [".whl", ".ab"]):

    python3 benchmarks/ab_trees.py run --rounds=2 --out=$OUT/ab.json -- \\
        --model=llada_8b --contexts=8192 --modes=focus --generate_up_to=0 --entry_repeats=1

`run` installs each tree under /tmp/site_<name> and runs that tree's own benchmarks/e2e.py with
the arguments after `--`, round by round in the packed order (base, new, base, new, ...). It
writes every row tagged with its tree, commit and round, and prints the median cached-step and
refresh time per (variant, tree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKTREE = "WORKTREE"
# What a tree needs to install and benchmark: the package's folders and the benchmark scripts.
PACKED = ("pyproject.toml", "focus_jax", "models", "kernels", "checkpoints_convert", "configs",
          "training", "benchmarks")
SKIPPED = ("benchmarks/results/",)  # large and not needed to run


def _git(*args: str) -> str:
  return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                        text=True).stdout


def _files(rev: str) -> list[str]:
  """Paths of a commit (or of the working tree: tracked and untracked, not ignored)."""
  if rev == WORKTREE:
    listing = _git("ls-files", "-co", "--exclude-standard", "--", *PACKED)
  else:
    listing = _git("ls-tree", "-r", "--name-only", rev, "--", *PACKED)
  return [p for p in listing.splitlines() if p and not p.startswith(SKIPPED)]


def pack(specs: list[str], out_dir: str) -> list[str]:
  """name=rev ... -> out_dir/<name>/ holding that revision's files and a TREE file naming it.
  Each tree is written to a temporary folder and renamed, so a failed pack leaves none half-done."""
  names = []
  for spec in specs:
    name, sep, rev = spec.partition("=")
    if not sep or not name.isidentifier() or not rev:
      raise SystemExit(f"pack takes name=rev (rev a commit or {WORKTREE}), got {spec!r}")
    commit = (_git("rev-parse", "HEAD").strip() + "+worktree" if rev == WORKTREE
              else _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip())
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=f".{name}-")
    for path in _files(rev):
      dest = os.path.join(staging, path)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      if rev == WORKTREE:
        shutil.copy2(os.path.join(ROOT, path), dest)
      else:
        with open(dest, "wb") as f:
          f.write(subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True,
                                 capture_output=True).stdout)
    with open(os.path.join(staging, "TREE"), "w") as f:
      json.dump({"name": name, "rev": rev, "commit": commit}, f)
    final = os.path.join(out_dir, name)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    names.append(name)
  with open(os.path.join(out_dir, "ORDER"), "w") as f:
    f.write("\n".join(names) + "\n")
  return names


def _install(tree: str, target: str) -> None:
  shutil.rmtree(target, ignore_errors=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                  "--no-build-isolation", "--no-compile", "--no-cache-dir", "--target", target,
                  tree], check=True, capture_output=True)
  shutil.rmtree(os.path.join(tree, "build"), ignore_errors=True)


def summary(rows: list[dict]) -> list[dict]:
  """Median cached-step and refresh seconds per (context, variant, tree), in first-seen order."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if "error" not in r:
      groups.setdefault((r["context"], r["variant"], r["tree"]), []).append(r)
  return [{"context": c, "variant": v, "tree": t, "rounds": len(g),
           "sparse_step_s": statistics.median(r["sparse_step_s"] for r in g),
           "refresh_s": statistics.median(r["refresh_s"] for r in g)}
          for (c, v, t), g in groups.items()]


def _write_report(out: str, e2e_args: list[str], rounds: int, meta: dict, rows: list) -> dict:
  report = {"e2e_args": e2e_args, "rounds": rounds, "trees": meta, "results": rows,
            "summary": summary(rows)}
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(out + ".tmp", out)
  return report


def run(trees_dir: str, rounds: int, e2e_args: list[str], out: str, install: bool = True,
        timeout_s: int = 600) -> dict:
  with open(os.path.join(trees_dir, "ORDER")) as f:
    names = f.read().split()
  if not names:
    raise SystemExit(f"{trees_dir}/ORDER names no tree: run `ab_trees.py pack` first")
  meta, env_paths = {}, {}
  for name in names:
    tree = os.path.join(trees_dir, name)
    with open(os.path.join(tree, "TREE")) as f:
      meta[name] = json.load(f)
    site = f"/tmp/site_{name}"
    if install:
      _install(tree, site)
    env_paths[name] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
  rows = []
  # Rewritten after every run: a call cut short by its time limit keeps what finished.
  report = _write_report(out, e2e_args, rounds, meta, rows)
  for round_ in range(rounds):
    for name in names:
      result = os.path.join(tempfile.mkdtemp(), "e2e.json")
      cmd = [sys.executable, os.path.join(trees_dir, name, "benchmarks", "e2e.py"), *e2e_args,
             f"--out={result}"]
      proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": env_paths[name]},
                            capture_output=True, text=True, timeout=timeout_s)
      if proc.returncode:
        rows.append({"tree": name, "round": round_, "error": proc.stderr[-2000:]})
      else:
        with open(result) as f:
          rows.extend({**r, "tree": name, "commit": meta[name]["commit"], "round": round_}
                      for r in json.load(f)["results"])
      report = _write_report(out, e2e_args, rounds, meta, rows)
  for s in report["summary"]:
    print(f"{s['context']:>7} {s['variant'][:40]:40} {s['tree'][:12]:12} "
          f"step {s['sparse_step_s'] * 1e3:8.3f} ms  refresh {s['refresh_s']:7.3f} s  "
          f"({s['rounds']} rounds)")
  for r in rows:
    if "error" in r:
      print(f"round {r['round']} tree {r['tree']} failed:\n{r['error']}")
  return report


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("pack", help="name=rev ... into --dir")
  p.add_argument("specs", nargs="+")
  p.add_argument("--dir", default=os.path.join(ROOT, ".ab"))
  r = sub.add_parser("run", help="install the packed trees and run e2e.py in rounds")
  r.add_argument("--dir", default=os.path.join(ROOT, ".ab"))
  r.add_argument("--rounds", type=int, default=2)
  r.add_argument("--out", default="ab.json")
  r.add_argument("--timeout_s", type=int, default=600, help="per e2e.py run")
  r.add_argument("--no_install", action="store_true", help="trees already importable")
  r.add_argument("e2e_args", nargs=argparse.REMAINDER)
  a = parser.parse_args(argv)
  if a.command == "pack":
    print("packed:", ", ".join(pack(a.specs, a.dir)), "into", a.dir)
  else:
    args = a.e2e_args[1:] if a.e2e_args[:1] == ["--"] else a.e2e_args
    run(a.dir, a.rounds, args, a.out, install=not a.no_install, timeout_s=a.timeout_s)


if __name__ == "__main__":
  main(sys.argv[1:])
