"""Accuracy yardstick: what each decoding approximation costs on the demo model's tasks.

    python benchmarks/accuracy.py                       # the full grid (GPU: ~1-2 min)
    python benchmarks/accuracy.py --lengths=1024 --depths=0.5 --per_task=2   # a CPU slice

A needle-in-a-haystack grid (context length x needle depth, task "passkey") plus the multi-key
("kv") and variable-tracking ("vt") tasks at every length, each decoded with every variant:
vanilla (dense), dual_cache, focus, and each refresh-economy option of focus_jax.decoding
(`refresh_every_blocks=2`, `reuse_prompt_kv`) on the cached modes and on Focus. Exact match =
the generated ids up to the first eos equal the answer. Focus runs with diagnostics, giving the
confidence indicator's recall (the share of committed tokens that were in I_focus / I_active)
and the attention mass its sparse layers retain.

Writes <out>.json (every number), <out>.md (the tables) and <out>_niah.png (heatmaps).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import app, flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("model", os.path.join(ROOT, "demo_model"), "HF or converted checkpoint.")
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"],
                  "Canvas lengths (prompt + gen_length).")
flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Passkey needle depths.")
flags.DEFINE_integer("seeds", 2, "Passkey examples per (length, depth) cell.")
flags.DEFINE_integer("per_task", 8, "kv and vt examples per length.")
flags.DEFINE_list("variants", [], "Variants to run (default: all of VARIANTS).")
flags.DEFINE_integer("block_length", 0, "Generation block length; 0: the tasks' own "
                     "(training.tasks.BLOCK_LENGTH, with gen_length GEN_LENGTH).")
flags.DEFINE_integer("max_rows", 64, "Rows per generate call.")
flags.DEFINE_string("dtype", "", "Parameter dtype; empty: bfloat16 on GPU, float32 on CPU.")
flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "accuracy"),
                    "Output path prefix.")
flags.DEFINE_list("merge", [], "Instead of decoding: merge these result JSONs (e.g. one per "
                  "length, each run in its own time slot) into one table and heatmap.")

# Focus on the demo model's 8 layers: 2 dense (sinks from layer 1), the reported rho, window
# and alpha, and a 64-token prompt block.
FOCUS = {"l_dense": 2, "diagnostics": True}
LOCAL_PROMPT_WINDOW = 256  # the refresh's local prompt window on the demo model's 1K-8K prompts
# The refresh's selected prompt blocks on the demo model's 1K-8K prompts: 128-query chunks and
# 32-key blocks are the 32K defaults (1024, 128) scaled by a quarter, as 8K is 32K's quarter.
SELECTED_PROMPT = {"refresh_prompt_chunk": 128, "refresh_prompt_block": 32,
                   "refresh_prompt_globals": 64}


def variants() -> dict[str, tuple[str, dict[str, Any]]]:
  """Every decoding variant, including each refresh-economy option the decoding package has."""
  from focus_jax import decoding  # pylint: disable=g-import-not-at-top
  out = {"vanilla": ("vanilla", {}), "dual_cache": ("dual_cache", {}), "focus": ("focus", FOCUS)}
  policy = getattr(decoding, "RefreshPolicy", None)
  fields = set(getattr(policy, "__dataclass_fields__", {}))
  economy = {}
  if "every_blocks" in fields:
    economy["refresh/2"] = {"refresh_every_blocks": 2}
  if "reuse_prompt_kv" in fields:
    economy["reuse_prompt"] = {"reuse_prompt_kv": True}
  if "prompt_window" in fields:
    # Prompt queries see 64 global tokens + 256 keys around them + the response in every
    # refresh (1/4 of a 1K prompt, 1/32 of 8K: the 2048 of a 32K run is 1/16).
    economy["local_prompt"] = {"refresh_prompt_window": LOCAL_PROMPT_WINDOW,
                               "refresh_prompt_globals": 64}
  if "prompt_keep" in fields:
    # Prompt queries see a quarter (an eighth) of the prompt's blocks, chosen per query chunk
    # and kv head, and the response.
    economy["selected_prompt"] = {**SELECTED_PROMPT, "refresh_prompt_keep": 0.25}
    economy["selected_prompt/8"] = {**SELECTED_PROMPT, "refresh_prompt_keep": 0.125}
  if "fp8_attention" in fields:
    # The refresh's attention in fp8: cuDNN's fp8 kernel on a GPU, its XLA emulation elsewhere.
    # Each prompt here has 16 pads (1.5% of a 1K row), which fp8 attention neutralises.
    economy["fp8_refresh"] = {"refresh_fp8_attention": True}
  if "fp8_matmul" in fields:
    # ... and its projections too (fp8 GEMMs): the whole refresh in fp8 but the lm head.
    economy["fp8_refresh_all"] = {"refresh_fp8_attention": True, "refresh_fp8_matmul": True}
  for name, opts in economy.items():
    out[f"dual_cache+{name}"] = ("dual_cache", opts)
  for name, opts in economy.items():
    out[f"focus+{name}"] = ("focus", {**FOCUS, **opts})
  # Every prompt block kept (alpha 1): what the sparse-layer query restriction alone costs, so
  # the pruning's own cost is the gap to plain focus.
  out["focus+alpha=1"] = ("focus", {**FOCUS, "alpha": 1.0})
  # Other block representatives than the default Quest bound: the mean key, the channel-wise max.
  out["focus+mean_block"] = ("focus", {**FOCUS, "representative": "mean"})
  out["focus+max_block"] = ("focus", {**FOCUS, "representative": "max"})
  order = ["vanilla", "dual_cache"] + [f"dual_cache+{n}" for n in economy] + ["focus"]
  return {k: out[k] for k in order + [k for k in out if k not in order]}


def build_examples(lengths: list[int], depths: list[float], seeds: int, per_task: int):
  """{length: [Example]}: the passkey grid, then kv and vt (seeds offset from training's)."""
  from focus_jax.training import tasks  # pylint: disable=g-import-not-at-top
  out = {}
  for length in lengths:
    p = length - tasks.GEN_LENGTH
    exs = [tasks.make_example("passkey", 50_000 + s, p, depth=d) for d in depths
           for s in range(seeds)]
    exs += [tasks.make_example(t, 60_000 + i, p) for t in ("kv", "vt") for i in range(per_task)]
    out[length] = exs
  return out


def run(model, examples: dict[int, list], variant_names: list[str], block_length: int = 0,
        max_rows: int = 64, log=print) -> dict[str, Any]:
  """Decodes every example with every variant; returns the per-example hits and diagnostics.
  `block_length` 0 means the tasks' own (`tasks.BLOCK_LENGTH`)."""
  from focus_jax import pipeline  # pylint: disable=g-import-not-at-top
  from focus_jax.training import tasks  # pylint: disable=g-import-not-at-top
  block_length = block_length or tasks.BLOCK_LENGTH
  table = variants()
  unknown = sorted(set(variant_names) - set(table))
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {sorted(table)}")
  records, diagnostics = [], []
  for length, exs in examples.items():
    for name in variant_names:
      mode, options = table[name]
      seconds, stats_sum, n_stats = 0.0, {}, 0
      for r0 in range(0, len(exs), max_rows):
        chunk = exs[r0:r0 + max_rows]
        prompt, mask = pipeline.pad_prompts([e.prompt for e in chunk], tasks.EOS_ID)
        res = pipeline.generate_ids(model, prompt, mask, mode=mode, gen_length=tasks.GEN_LENGTH,
                                    steps=tasks.GEN_LENGTH, block_length=block_length,
                                    decoding_options=dict(options), time_split=False)
        seconds += res.seconds
        for i, (row, e) in enumerate(zip(res.tokens, chunk)):
          records.append({"variant": name, "length": length, "task": e.task,
                          "depth": round(e.depth, 3), "hit": tasks.exact_match(row, e.answer),
                          "example": r0 + i, "tokens": np.asarray(row).tolist()})
        if res.stats:
          n_stats += 1
          for k in ("recall_focus", "recall_active"):
            stats_sum[k] = stats_sum.get(k, 0.0) + res.stats[k]
          layers = np.asarray(res.stats["retained_mass_per_layer"])
          stats_sum["retained_mass_per_layer"] = stats_sum.get("retained_mass_per_layer", 0) + layers
          stats_sum["kv_tokens_per_layer"] = stats_sum.get("kv_tokens_per_layer", 0) + np.asarray(
              res.stats["kv_tokens_per_layer"])
      hits = [r["hit"] for r in records if r["variant"] == name and r["length"] == length]
      line = f"{name:<24} len {length:5d}: exact match {np.mean(hits):6.3f} ({len(hits)}), " \
             f"{seconds:7.2f}s"
      if n_stats:
        d = {k: (v / n_stats).tolist() if isinstance(v, np.ndarray) else v / n_stats
             for k, v in stats_sum.items()}
        d.update(variant=name, length=length)
        diagnostics.append(d)
        line += f", recall focus {d['recall_focus']:.3f} active {d['recall_active']:.3f}"
      log(line)
      records.append({"variant": name, "length": length, "task": "_time", "seconds": seconds})
  return {"records": records, "diagnostics": diagnostics}


def summarize(result: dict[str, Any], focus_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
  """Exact match per (variant, task, length), per (variant, length, depth) for passkey; the
  mean retained mass over Focus's sparse layers."""
  recs = [r for r in result["records"] if r["task"] != "_time"]
  em: dict[str, Any] = {}
  for r in recs:
    em.setdefault(r["variant"], {}).setdefault(r["task"], {}).setdefault(
        str(r["length"]), []).append(r["hit"])
  em = {v: {t: {l: float(np.mean(h)) for l, h in ls.items()} for t, ls in ts.items()}
        for v, ts in em.items()}
  overall = {}
  for v in em:
    hits = [r["hit"] for r in recs if r["variant"] == v]
    overall[v] = float(np.mean(hits))
  niah: dict[str, Any] = {}
  for r in recs:
    if r["task"] == "passkey":
      niah.setdefault(r["variant"], {}).setdefault(str(r["length"]), {}).setdefault(
          str(r["depth"]), []).append(r["hit"])
  niah = {v: {l: {d: float(np.mean(h)) for d, h in ds.items()} for l, ds in ls.items()}
          for v, ls in niah.items()}
  diags = []
  l_dense = (focus_cfg or FOCUS).get("l_dense", 0)
  for d in result["diagnostics"]:
    mass = d["retained_mass_per_layer"]
    sparse = [m for i, m in enumerate(mass) if i >= l_dense and d["kv_tokens_per_layer"][i] > 0]
    diags.append({**d, "retained_mass_sparse_mean": float(np.mean(sparse)) if sparse else None})
  times = {}
  for r in result["records"]:
    if r["task"] == "_time":
      times.setdefault(r["variant"], {})[str(r["length"])] = r["seconds"]
  return {"exact_match": em, "overall": overall, "niah": niah, "diagnostics": diags,
          "seconds": times, "agreement": agreement(recs)}


def agreement(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """{variant: {reference: share of generated tokens equal to the reference's, position by
  position}} for the dense references vanilla and dual_cache: what an approximation changes,
  with or without a model that solves the tasks."""
  out: dict[str, dict[str, float]] = {}
  key = lambda r: (r["length"], r["example"])  # noqa: E731
  for ref in ("vanilla", "dual_cache"):
    base = {key(r): np.asarray(r["tokens"]) for r in records if r["variant"] == ref}
    if not base:
      continue
    for v in sorted({r["variant"] for r in records}):
      same = [np.mean(np.asarray(r["tokens"]) == base[key(r)]) for r in records
              if r["variant"] == v and key(r) in base]
      if same:
        out.setdefault(v, {})[ref] = float(np.mean(same))
  return out


def markdown(summary: dict[str, Any]) -> str:
  em, lines = summary["exact_match"], []
  variants_ = list(em)
  tasks_ = sorted({t for v in em.values() for t in v})
  lengths = sorted({int(l) for v in em.values() for t in v.values() for l in t})
  head = "| variant | task | " + " | ".join(f"{l // 1024}K" if l % 1024 == 0 else str(l)
                                            for l in lengths) + " | all |"
  lines += [head, "|" + " --- |" * (len(lengths) + 3)]
  for v in variants_:
    for t in tasks_:
      cells = [em[v][t].get(str(l)) for l in lengths]
      vals = [c for c in cells if c is not None]
      lines.append(f"| {v} | {t} | " + " | ".join("-" if c is None else f"{100 * c:.1f}"
                                                   for c in cells)
                   + f" | {100 * np.mean(vals):.1f} |")
  agree = summary.get("agreement", {})
  refs = [r for r in ("vanilla", "dual_cache") if any(r in a for a in agree.values())]
  head = ["variant", "overall exact match (%)"] + [f"tokens = {r} (%)" for r in refs]
  lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for v, x in summary["overall"].items():
    cells = [v, f"{100 * x:.1f}"] + [
        f"{100 * agree[v][r]:.1f}" if r in agree.get(v, {}) else "-" for r in refs]
    lines.append("| " + " | ".join(cells) + " |")
  if summary["diagnostics"]:
    lines += ["", "| variant | length | recall I_focus | recall I_active | retained mass "
              "(sparse layers) |", "| --- | --- | --- | --- | --- |"]
    for d in summary["diagnostics"]:
      mass = d["retained_mass_sparse_mean"]
      lines.append(f"| {d['variant']} | {d['length']} | {100 * d['recall_focus']:.1f} | "
                   f"{100 * d['recall_active']:.1f} | "
                   f"{'-' if mass is None else f'{100 * mass:.1f}'} |")
  return "\n".join(lines)


def heatmap(summary: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  niah = summary["niah"]
  names = list(niah)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
  for ax, v in zip(axes[0], names):
    lengths = sorted(niah[v], key=int)
    depths = sorted({d for l in lengths for d in niah[v][l]}, key=float)
    grid = np.array([[niah[v][l].get(d, np.nan) for l in lengths] for d in depths])
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{int(l) // 1024}K" for l in lengths])
    ax.set_yticks(range(len(depths)), [f"{float(d):.2f}" for d in depths])
    for i in range(len(depths)):
      for j in range(len(lengths)):
        ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(v, fontsize=9)
    ax.set_xlabel("context length")
  axes[0][0].set_ylabel("needle depth")
  fig.suptitle("passkey exact match (%), demo model")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def merge(paths: list[str]) -> dict[str, Any]:
  """One summary over several result files: records and Focus diagnostics concatenated."""
  records, diagnostics, setups = [], [], []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    records += data["records"]
    diagnostics += [{k: v for k, v in d.items() if k != "retained_mass_sparse_mean"}
                    for d in data["summary"]["diagnostics"]]
    setups.append(data["summary"].get("setup", {}))
  summary = summarize({"records": records, "diagnostics": diagnostics})
  lengths = sorted({r["length"] for r in records})
  summary["setup"] = {**setups[0], "lengths": lengths, "merged_from": [
      {"file": os.path.basename(p), "command": s.get("command")} for p, s in zip(paths, setups)]}
  return {"summary": summary, "records": records}


def write(result: dict[str, Any], out: str) -> str:
  """JSON, markdown and the NIAH heatmap under the `out` prefix; returns the markdown."""
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  text = markdown(result["summary"])
  with open(out + ".md", "w") as f:
    f.write(text + "\n")
  heatmap(result["summary"], out + "_niah.png")
  return text


def main(argv):
  del argv
  if FLAGS.merge:
    print(write(merge(FLAGS.merge), FLAGS.out))
    return
  import jax  # pylint: disable=g-import-not-at-top
  import focus_jax  # pylint: disable=g-import-not-at-top
  from focus_jax.training import tasks  # pylint: disable=g-import-not-at-top
  dtype = FLAGS.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  model = focus_jax.load(FLAGS.model, dtype=dtype)
  names = FLAGS.variants or list(variants())
  lengths = [int(x) for x in FLAGS.lengths]
  depths = [float(x) for x in FLAGS.depths]
  examples = build_examples(lengths, depths, FLAGS.seeds, FLAGS.per_task)
  t0 = time.perf_counter()
  result = run(model, examples, names, FLAGS.block_length, FLAGS.max_rows)
  summary = summarize(result)
  summary["setup"] = {
      "model": os.path.relpath(FLAGS.model, ROOT) if FLAGS.model.startswith(ROOT) else FLAGS.model,
      "dtype": dtype, "device": str(jax.devices()[0].device_kind), "lengths": lengths,
      "depths": depths, "seeds": FLAGS.seeds, "per_task": FLAGS.per_task,
      "gen_length": tasks.GEN_LENGTH, "steps": tasks.GEN_LENGTH,
      "block_length": FLAGS.block_length or tasks.BLOCK_LENGTH, "focus": FOCUS,
      "variants": {n: variants()[n] for n in names}, "seconds": time.perf_counter() - t0,
      "command": " ".join(sys.argv)}
  print("\n" + write({"summary": summary, "records": result["records"]}, FLAGS.out))


if __name__ == "__main__":
  app.run(main)
