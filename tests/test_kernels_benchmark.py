"""benchmarks/kernels.py --smoke on the CPU: the GPU benchmark's phases run end to end on tiny
shapes in interpret mode and write their JSON (so a change to a kernel's contract cannot leave
the benchmark broken until the next GPU session)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from subprocess_env import optimising_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("check", "live", "relevance", "waves", "focus_call", "fp8_dense", "fp8_matmul",
          "fp8_gemm_forms", "selected_prompt", "dense_padded")


def test_smoke_phases_run_and_write_their_results(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--smoke",
       "--phases", ",".join(PHASES), "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=900, env=optimising_env())
  assert out.returncode == 0, out.stderr[-3000:]
  (name,) = os.listdir(tmp_path)
  with open(tmp_path / name) as f:
    res = json.load(f)
  assert all(res[phase] for phase in PHASES), res
  assert all(row["ok"] for row in res["check"]), res["check"]
  layouts = {(row["layout"], row["live_queries"]) for row in res["live"]}
  assert layouts == {(lay, n) for lay in ("llada8b", "dream7b") for n in (7, 32)}, res["live"]
  # Timed, but in interpret mode on a CPU that other tests share: t(2 iterations) - t(1) minus
  # the loop's overhead can come out negative there, so the number only has to exist.
  assert all(math.isfinite(row["us"]) for row in res["live"] + res["waves"]), (res["live"],
                                                                              res["waves"])
  assert all(row["same_blocks"] for row in res["relevance"]), res["relevance"]
  # (Mosaic GPU's Focus call: not in the smoke run; test_sparse_attention interprets it)
  calls = {(row["layout"], row["impl"]) for row in res["focus_call"]}
  assert calls == {("llada8b", "pallas_gpu"), ("dream7b", "pallas_gpu")}, res["focus_call"]
  assert all(row["ok"] for row in res["focus_call"]), res["focus_call"]
  # Off a GPU, fp8 attention is the emulation itself; either way it errs by fp8's few percent,
  # more on peaked logits, where bfloat16 stays at its 0.2%.
  for row in res["fp8_dense"]:
    assert row["fp8_err"] == row["emulation_err"], row
    assert row["bf16_err"][1] < 0.005 < row["fp8_err"][1] < 0.2, row
  # fp8 GEMMs: e4m3's few percent (bfloat16: its 0.2%)
  for row in res["fp8_matmul"]:
    assert row["bf16_err"] < 0.005 < row["fp8_err"] < 0.08, row
  # Every form runs; each fp8 form quantises (the CPU keeps e4m3 round trips, barrier or not).
  forms = {row["form"]: row for row in res["fp8_gemm_forms"]}
  assert set(forms) == {"bf16", "converted_and_scaled", "converted_and_scaled_no_barrier",
                        "direct_f32_out", "direct_bf16_out", "prequantised_gemm",
                        "prequantised_transposed_gemm"}, forms
  assert forms["bf16"]["rel_err"] < 0.005, forms["bf16"]
  for name, row in forms.items():
    if name not in ("bf16", "prequantised_gemm", "prequantised_transposed_gemm"):
      assert 0.005 < row["rel_err"] < 0.08, row
  # Selected prompt blocks: every layout timed dense and selected, and its batched call right.
  sel = res["selected_prompt"]
  assert {(row["layout"], row["variant"]) for row in sel} == {
      (lay, v) for lay in ("llada8b", "dream7b")
      for v in ("dense", "selected", "selected_padded", "check")}, sel
  checks = [row for row in sel if row["variant"] == "check"]
  assert sorted(row["pads"] for row in checks) == [0, 0, 40, 40] and all(
      row["ok"] for row in checks), sel  # pages read in place, and gathered with a pad mask
  assert all(0 < row["flop_share"] < 1 and math.isfinite(row["ms"]) for row in sel
             if row["variant"] in ("selected", "selected_padded")), sel
  # A padded batch's dense refresh: timed padded and unpadded, and its two parts (the length
  # mask with every key valid, the valid-first reorder); cuDNN's bias only on a GPU.
  padded = res["dense_padded"]
  assert {(row["layout"], row["variant"]) for row in padded} == {
      (lay, v) for lay in ("llada8b", "dream7b")
      for v in ("padded", "unpadded", "lengths_all_valid", "reorder_only", "check")}, padded
  assert all(row["ok"] for row in padded if row["variant"] == "check"), padded
  # Key channels offset in every token: smoothing takes them out; unsmoothed fp8 pays for them.
  for row in res["fp8_dense"]:
    if row["common_channels"]:
      assert row["fp8_unsmoothed_err"][1] > 1.2 * row["fp8_err"][1], row
  assert all(math.isfinite(row["us"]) for row in res["focus_call"]), res["focus_call"]

