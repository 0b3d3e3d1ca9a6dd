"""CLI: python -m focus_jax.checkpoints_convert --hf_dir=... --out_dir=... [--dtype=bfloat16]."""

from __future__ import annotations

from absl import app, flags

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (LLaDA / Dream).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the converted checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored parameter dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing out_dir.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["hf_dir", "out_dir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  from focus_jax.checkpoints_convert import convert_hf_checkpoint  # pylint: disable=g-import-not-at-top
  out = convert_hf_checkpoint(_HF_DIR.value, _OUT_DIR.value, dtype=_DTYPE.value,
                              overwrite=_OVERWRITE.value, progress=_PROGRESS.value)
  print(f"converted {_HF_DIR.value} -> {out}")


if __name__ == "__main__":
  app.run(main)
