"""Throughput against context length from `e2e.py` results, next to the paper's numbers.

    python benchmarks/plot_e2e.py benchmarks/results/e2e_h100.json benchmarks/results/e2e_h200.json \
        --out=benchmarks/results/e2e_throughput.png

One line per (GPU, variant, model when not LLaDA-8B) over the rows with the paper's schedule
(gen 256, steps 256, block 32, batch 1, no threshold); rows whose tokens/s came from step times
(64K, 128K) are drawn hollow. Name files oldest first: a later file's row replaces an earlier
one of the same GPU, model, variant and context (a re-measurement after a change). The paper's
UltraLLaDA figures (read off its chart, H200 per third-party notes; see
../shared/design/focus-dllm.md) are the dashed grey lines.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "benchmarks/results/e2e_throughput.png", "PNG to write")

# UltraLLaDA, batch 1, tokens/s, from the paper's chart (../shared/design/focus-dllm.md).
PAPER = {
    "paper Focus-dLLM": {8192: 25.23, 16384: 19.30, 24576: 14.36, 28672: 12.61, 32768: 10.98},
    "paper Fast-dLLM": {8192: 19.28, 16384: 11.06, 24576: 7.33, 28672: 6.19, 32768: 5.33},
    "paper vanilla": {8192: 2.67, 16384: 1.06, 24576: 0.59, 28672: 0.46, 32768: 0.37},
}


def paper_schedule(row: dict[str, Any]) -> bool:
  return (row.get("gen") == 256 and row.get("steps") == 256 and row.get("block") == 32
          and row.get("batch") == 1 and not row.get("threshold") and "error" not in row)


def series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, bool]]]:
  """{"GPU variant": [(context, tokens/s, extrapolated), ...]} sorted by context; later rows
  replace earlier ones at the same context."""
  out: dict[str, dict[int, tuple[int, float, bool]]] = {}
  for r in filter(paper_schedule, rows):
    gpu = r["gpu"].replace("NVIDIA ", "").split(" ")[0]
    model = r.get("model", "llada_8b")
    name = f"{gpu} {r['variant']}" + ("" if model == "llada_8b" else f" ({model})")
    out.setdefault(name, {})[r["context"]] = (
        r["context"], r["tokens_per_s"], bool(r.get("extrapolated_from_steps")))
  return {k: sorted(v.values()) for k, v in out.items()}


def main(argv):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if len(argv) < 2:
    raise app.UsageError("name one or more e2e.py JSON files")
  rows = []
  for path in argv[1:]:
    with open(path) as f:
      rows += json.load(f)["results"]
  fig, ax = plt.subplots(figsize=(11, 5.2))
  colors = plt.cm.tab20.colors  # more series than the default cycle's 10 colours
  for i, (name, pts) in enumerate(series(rows).items()):
    xs = [p[0] for p in pts]
    line, = ax.plot(xs, [p[1] for p in pts], marker="o", label=name,
                    color=colors[i % len(colors)])
    hollow = [p for p in pts if p[2]]
    if hollow:
      ax.plot([p[0] for p in hollow], [p[1] for p in hollow], "o", mfc="white",
              color=line.get_color())
  for name, pts in PAPER.items():
    ax.plot(list(pts), list(pts.values()), "--", color="grey",
            marker={"paper Focus-dLLM": "s", "paper Fast-dLLM": "^"}.get(name, "v"),
            alpha=0.7, label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ticks = sorted({r["context"] for r in rows if paper_schedule(r)} | {8192, 32768})
  ax.set_xticks(ticks, [f"{t // 1024}K" for t in ticks])
  ax.set_xlabel("prompt length (tokens)")
  ax.set_ylabel("tokens/s (gen 256, steps 256, block 32, batch 1)")
  ax.set_title("LLaDA-8B shape unless named, random bf16 weights (hollow: from step times)",
               fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(FLAGS.out, dpi=120)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
