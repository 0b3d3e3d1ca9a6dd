"""Device-trace and HLO helpers for benchmarks/profile_step.py (no flags: importable by tests).

`kernel_times` sums a Perfetto trace's device events by kernel name; `hlo_sources` maps each
kernel (an HLO instruction of the optimised module) to the line of ours that emitted it, so a
step's time can be read by source line (`by_source`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
  """(time the device ran anything, first start to last end) of [start, end) intervals, in us.

  span - busy is the device's idle time: launch gaps, and the host between traced steps."""
  if not intervals:
    return 0.0, 0.0
  busy, cur_start, cur_end = 0.0, None, None
  for start, end in sorted(intervals):
    if cur_end is None or start > cur_end:
      busy += 0.0 if cur_end is None else cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  busy += cur_end - cur_start
  return busy, max(e for _, e in intervals) - min(s for s, _ in intervals)


def kernel_times(trace_dir: str, counts: dict[str, int] | None = None
                 ) -> tuple[dict[str, float], tuple[float, float, int]]:
  """Device event durations summed by name from the Perfetto JSON trace, and
  (busy, span, number of events). `counts`, if given, is filled with launches per name."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no Perfetto trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, name in pids.items() if "/device:" in name}
  if not device:  # CPU runs: host events (for checking this script without a GPU)
    device = set(pids)
  totals = collections.Counter()
  intervals = []
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device:
      totals[e["name"]] += float(e.get("dur", 0))
      if counts is not None:
        counts[e["name"]] = counts.get(e["name"], 0) + 1
      intervals.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
  return dict(totals), (*busy_and_span(intervals), len(intervals))


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_roots() -> tuple[str, ...]:
  """Where frames of ours live: this checkout, and the installed package when it runs from a
  copy (the GPU machine installs it under /tmp/site: frames there are ours too)."""
  roots = [REPO_ROOT]
  try:
    import focus_jax  # pylint: disable=g-import-not-at-top
    roots.append(os.path.dirname(os.path.dirname(os.path.abspath(focus_jax.__file__))))
  except ImportError:
    pass
  return tuple(dict.fromkeys(roots))


def _under(path: str, roots: tuple[str, ...]) -> str | None:
  """The root `path` lies under, if any."""
  full = os.path.abspath(path)
  return next((r for r in roots if full.startswith(r + os.sep)), None)


def _shown(path: str, roots: tuple[str, ...]) -> str:
  root = _under(path, roots) if os.path.isabs(path) else None
  return os.path.relpath(path, root) if root else path


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(-?\d+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*stack_frame_id=(\d+)")
_INSTRUCTION_LINE = re.compile(
    r'^\s*(?:ROOT )?%([\w.\-]+) = .*source_file="([^"]+)" source_line=(\d+)')


def _hlo_tables(hlo_text: str) -> dict[str, dict[int, str]]:
  """The FileNames / FunctionNames / FileLocations / StackFrames sections of an HLO module."""
  tables, current = {}, None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif not line.strip():
      current = None
    elif current is not None and (m := _TABLE_ROW.match(line)):
      current[int(m.group(1))] = m.group(2).strip('"')
  return tables


def hlo_sources(hlo_text: str, root: str | tuple[str, ...] | None = None) -> dict[str, str]:
  """Instruction name -> "path:line function" of the innermost stack frame under `root` (one
  folder or several; default `code_roots()`).

  The trace names a fusion's kernel by its HLO instruction, so this says which line of ours
  each kernel came from (instructions with no frame under `root` map to their innermost one)."""
  roots = code_roots() if root is None else ((root,) if isinstance(root, str) else tuple(root))
  tables = _hlo_tables(hlo_text)
  files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
  locations = {i: dict((k, int(v)) for k, v in _FIELD.findall(row))
               for i, row in tables.get("FileLocations", {}).items()}
  frames = {i: dict((k, int(v)) for k, v in _FIELD.findall(row))
            for i, row in tables.get("StackFrames", {}).items()}

  def describe(frame_id: int) -> str:
    chain, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc = locations.get(frames[frame_id].get("file_location_id"), {})
      path = files.get(loc.get("file_name_id"), "?")
      chain.append((path, loc.get("line", 0), functions.get(loc.get("function_name_id"), "?")))
      frame_id = frames[frame_id].get("parent_frame_id", 0)
    ours = [c for c in chain if _under(c[0], roots)]
    path, line, function = (ours or chain or [("?", 0, "?")])[0]
    return f"{_shown(path, roots)}:{line} {function}"

  sources = {}
  for line in hlo_text.splitlines():
    if m := _INSTRUCTION.match(line):
      sources[m.group(1)] = describe(int(m.group(2)))
    elif m := _INSTRUCTION_LINE.match(line):  # the older metadata form: the innermost frame only
      sources[m.group(1)] = f"{_shown(m.group(2), roots)}:{m.group(3)}"
  return sources


def dumped_sources(dump_dir: str) -> dict[str, str]:
  """hlo_sources over every optimised module XLA dumped, later compilations winning (the traced
  executable is the last one compiled: kernel names are only unique within a compilation)."""
  files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")),
                 key=os.path.getmtime)
  sources = {}
  for path in files:
    with open(path) as f:
      sources.update(hlo_sources(f.read()))
  # GPU kernels carry the instruction's name with "." spelled "_" (gemm_fusion.684 ->
  # gemm_fusion_684); CPU thunks keep it.
  sources.update({name.replace(".", "_"): where for name, where in sources.items()})
  return sources


_COMPUTATION = re.compile(r"^\s*(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_ANNOTATIONS = re.compile(r",? ?(metadata|backend_config|frontend_attributes)=.*$")


def hlo_kernels(hlo_text: str, width: int = 300) -> dict[str, str]:
  """Instruction name -> "opcode shape <- operands | fused ops", for reading a trace's kernels
  (a transpose XLA inserted has no source frame; its shapes say which tensor it moves).

  Fusions list the opcodes of the computation they call (parameters, tuples and
  get-tuple-elements left out), so `wrapped_transpose` reads as the transpose it wraps."""
  opcodes: dict[str, list[str]] = {}
  current = None
  defs = {}
  for line in hlo_text.splitlines():
    if m := _COMPUTATION.match(line):
      current = opcodes.setdefault(m.group(1), [])
    elif line.strip() == "}":
      current = None
    elif m := _DEFINITION.match(line):
      name, shape, opcode, rest = m.groups()
      if current is not None and opcode not in ("parameter", "tuple", "get-tuple-element",
                                                "constant", "bitcast"):
        current.append(opcode)
      defs[name] = (shape, opcode, _ANNOTATIONS.sub("", rest))
  out = {}
  for name, (shape, opcode, rest) in defs.items():
    called = re.search(r"calls=%([\w.\-]+)", rest)
    operands = [o.strip().lstrip("%") for o in rest.split("), ")[0].rstrip(")").split(",")]
    shown = [f"{o} {defs[o][0]}" if o in defs else o for o in operands if o]
    text = f"{opcode} {shape} <- {', '.join(shown)}"
    if called and called.group(1) in opcodes:
      text += " | " + ",".join(dict.fromkeys(opcodes[called.group(1)]))
    out[name] = text[:width]
  return out


def dumped_kernels(dump_dir: str) -> dict[str, str]:
  """hlo_kernels over every optimised module XLA dumped (later compilations winning), also
  under the GPU kernels' "_" spelling of "."."""
  out = {}
  for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")),
                     key=os.path.getmtime):
    with open(path) as f:
      out.update(hlo_kernels(f.read()))
  out.update({name.replace(".", "_"): text for name, text in out.items()})
  return out


def by_source(per_step: dict[str, float], sources: dict[str, str]) -> list[tuple[str, float, int]]:
  """Kernel time summed by source line: [(source, us, kernels)], largest first. A kernel the HLO
  does not name (a library GEMM, a Pallas call under its own name) stays under its own name."""
  totals, counts = collections.Counter(), collections.Counter()
  for name, us in per_step.items():
    base = name.split("__")[0]  # a kernel launched twice by one instruction: name__1
    key = sources.get(name) or sources.get(base) or f"(kernel) {name}"
    totals[key] += us
    counts[key] += 1
  return [(k, v, counts[k]) for k, v in totals.most_common()]
