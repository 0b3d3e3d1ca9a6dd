"""benchmarks/e2e.py end to end on the tiny preset (CPU): per-variant schedule knobs, rows
extrapolated from step times past --generate_up_to, floors that scale with the batch, and the
throughput plot drawn from its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_variants_and_plot(tmp_path):
  out = tmp_path / "e2e.json"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "e2e.py"), "--model=tiny",
         "--contexts=128,256", "--modes=vanilla,focus,focus+threshold=0.5,dual_cache,dual_cache+batch=2",
         "--gen=32", "--steps=32", "--block=16", "--generate_up_to=128", "--repeats=1",
         f"--out={out}"]
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
  rows = json.loads(out.read_text())["results"]
  assert not [r for r in rows if "error" in r]
  by = {(r["context"], r["variant"]): r for r in rows}
  assert len(by) == 10
  # Up to --generate_up_to the whole generation is timed (and compiled once).
  assert "compile_s" in by[(128, "focus")] and "extrapolated_from_steps" not in by[(128, "focus")]
  # Past it, tokens/s comes from the step times, and the row says so.
  long = by[(256, "focus")]
  assert long["extrapolated_from_steps"] and "compile_s" not in long
  blocks = 32 // 16
  want = long["refresh_s"] + (blocks - 1) * long["later_entry_s"] + (32 - blocks) * long[
      "sparse_step_s"]
  assert abs(long["seconds"] - want) < 1e-9
  # Focus also times a step whose focus positions are spread over the block, and tokens/s
  # with every sparse step one of those.
  assert long["sparse_step_spread_vs_floor"] == pytest.approx(
      long["sparse_step_spread_s"] / long["sparse_step_floor_s"])
  every = long["seconds"] + (32 - blocks) * (long["sparse_step_spread_s"] - long["sparse_step_s"])
  assert long["tokens_per_s_spread"] == pytest.approx(32 / every)
  assert "sparse_step_spread_s" not in by[(256, "dual_cache")]
  # Each row names the split-KV kernels "auto" resolved to (on the CPU: XLA's gather).
  assert long["split_kv_impl"] == {"dense": "xla_gather", "sparse": "xla_gather"}
  assert by[(256, "dual_cache")]["split_kv_impl"] == {"dense": "xla_gather"}
  assert by[(128, "vanilla")]["split_kv_impl"] == {}
  # Threshold decoding always generates: its step count is data-dependent.
  thr = by[(256, "focus+threshold=0.5")]
  # (at most one step a token, and a block one step more past its schedule)
  assert thr["threshold"] == 0.5 and "compile_s" in thr and 2 <= thr["num_steps"] <= 32 + 2
  # Per-variant batch: tokens/s counts every row; the step floor reads every row's KV.
  b2, b1 = by[(256, "dual_cache+batch=2")], by[(256, "dual_cache")]
  assert b2["batch"] == 2 and b1["batch"] == 1
  assert abs(b2["tokens_per_s"] - 2 * 32 / b2["seconds"]) < 1e-6
  # Weights are read once per step, KV once per row: more than one row's floor, under two.
  assert b1["sparse_step_floor_s"] < b2["sparse_step_floor_s"] < 2 * b1["sparse_step_floor_s"]
  # The roofline adds the GEMMs' compute bound: never below the HBM floor; the ratio is against it.
  for r in (b1, b2):
    assert r["sparse_step_floor_s"] <= r["sparse_step_roofline_s"]
    assert r["sparse_step_vs_roofline"] == pytest.approx(r["sparse_step_s"] /
                                                         r["sparse_step_roofline_s"])

  png = tmp_path / "plot.png"
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot_e2e.py"), str(out),
                  f"--out={png}"], check=True, cwd=ROOT, capture_output=True, timeout=300)
  assert png.stat().st_size > 10_000


def test_e2e_compile_only_records_xla_memory_plans(tmp_path):
  """--compile_only: each generation compiled on abstract weights (fused q|k|v layout too), its
  XLA memory plan recorded, nothing timed; the fp8 projections' e4m3 weights are in the
  estimate."""
  out = tmp_path / "plans.json"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "e2e.py"), "--model=tiny",
         "--contexts=128", "--modes=focus,focus+refresh_fp8_matmul=1,dual_cache+fused_qkv=1",
         "--gen=32", "--steps=32", "--block=16", "--compile_only", f"--out={out}"]
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
  rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
  assert len(rows) == 3 and not [r for r in rows.values() if "error" in r]
  for r in rows.values():
    assert r["xla_temp_gib"] > 0 and r["xla_argument_gib"] > 0 and "tokens_per_s" not in r, r
  assert (rows["focus+refresh_fp8_matmul=1"]["memory_estimate_gib"]
          > rows["focus"]["memory_estimate_gib"])
