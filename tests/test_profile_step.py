"""benchmarks/profile_step.py on the tiny preset (CPU): kernels are attributed to our source lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "benchmarks"))  # after site-packages: benchmarks/kernels.py must not shadow the `kernels` package

import trace_attribution  # noqa: E402  (a script folder, not a package)

HLO = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  ROOT %e = f32[4]{0} exponential(%p), metadata={op_name="jit(f)/exp" stack_frame_id=2}
}

ENTRY %main (x: f32[4]) -> f32[4] {
  ROOT %loop_exponential_fusion = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/exp" stack_frame_id=2}
  %other_fusion.3 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/exp" stack_frame_id=3}
}

FileNames
1 "/repo/focus_jax/focus/pruning.py"
2 "/site-packages/jax/nn.py"

FunctionNames
1 "block_relevance"
2 "softmax"

FileLocations
1 {file_name_id=1 function_name_id=1 line=90 end_line=90 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=7 end_line=7 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=2 parent_frame_id=0}
"""


def test_hlo_sources_pick_the_innermost_frame_of_ours():
  sources = trace_attribution.hlo_sources(HLO, root="/repo")
  # The library frame (jax's softmax) is skipped for the caller's line in the repository.
  assert sources["loop_exponential_fusion"] == "focus_jax/focus/pruning.py:90 block_relevance"
  # No frame of ours: the innermost frame.
  assert sources["other_fusion.3"] == "/site-packages/jax/nn.py:7 softmax"
  # Several roots (a checkout and an installed copy): a frame under either is ours.
  assert trace_attribution.hlo_sources(HLO, root=("/elsewhere", "/repo")) == sources
  assert trace_attribution.code_roots()[0] == ROOT
  rows = trace_attribution.by_source({"loop_exponential_fusion": 3.0, "other_fusion.3": 1.0,
                                 "cutlass_gemm": 5.0}, sources)
  assert rows == [("(kernel) cutlass_gemm", 5.0, 1),
                  ("focus_jax/focus/pruning.py:90 block_relevance", 3.0, 1),
                  ("/site-packages/jax/nn.py:7 softmax", 1.0, 1)]


def test_profile_step_attributes_kernels_on_the_tiny_model(tmp_path):
  out = tmp_path / "profile.json"
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--model=tiny",
         "--context=128", "--modes=focus", "--steps=2", "--top=400", "--fused_qkv",
         "--phase=spread",
         f"--out={out}"]
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
  written = json.loads(out.read_text())
  assert written["fused_qkv"] is True and written["phase"] == "spread"
  report = written["modes"]["focus"]
  places = [where for where, _, _ in report["by_source_us_per_step"]]
  assert any(p.startswith("focus_jax/focus/") for p in places), places
  assert any(p.startswith("models/") or p.startswith("kernels/") for p in places), places
  assert any("_fused_qkv" in p for p in places), places  # the fused projection ran


def test_hlo_kernels_name_the_fused_ops_and_operand_shapes():
  kernels = trace_attribution.hlo_kernels(HLO)
  # A fusion reads as the ops of the computation it calls, with its operands' shapes resolved
  # from their definitions (here the entry's parameter, defined by the fused computation's name).
  assert kernels["loop_exponential_fusion"].startswith("fusion f32[4]{0} <- x")
  assert kernels["loop_exponential_fusion"].endswith("| exponential")
  text = """HloModule t

ENTRY %main (w: bf16[64,16]) -> bf16[16,64] {
  %w.1 = bf16[64,16]{1,0} parameter(0)
  ROOT %wrapped_transpose = bf16[16,64]{1,0} fusion(%w.1), kind=kInput, calls=%wt, metadata={op_name="x"}
}
"""
  assert trace_attribution.hlo_kernels(text)["wrapped_transpose"] == (
      "fusion bf16[16,64]{1,0} <- w.1 bf16[64,16]{1,0}")
