"""Attention kernels (importable as `focus_jax.kernels`). They know nothing of models."""

if __name__ == "kernels":
  # This folder sits at the repository root, so running Python there (`python main.py`,
  # `python -m pytest`) puts it on sys.path as a top-level `kernels`: the import name of Hugging
  # Face's `kernels` package, which transformers imports. Hand such an import to the installed
  # package; this code itself is only ever `focus_jax.kernels`. Other checkouts of this
  # repository on sys.path (worktrees, PYTHONPATH) are skipped too, by this marker:
  # focus-jax-top-level-kernels-handoff
  import importlib.machinery
  import importlib.util
  import os
  import sys

  _MARKER = b"focus-jax-top-level-kernels-handoff"
  _paths = [p for p in sys.path if isinstance(p, str)]
  while True:
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _paths)
    if _spec is None or _spec.loader is None:
      raise ImportError("no package named `kernels` is installed; the repository's kernels/ "
                        "folder is focus_jax.kernels: import it as `focus_jax.kernels`")
    if not _spec.origin or not os.path.isfile(_spec.origin):
      break
    with open(_spec.origin, "rb") as _f:
      if _MARKER not in _f.read():
        break
    _checkout = os.path.realpath(os.path.dirname(os.path.dirname(_spec.origin)))
    _paths = [p for p in _paths if os.path.realpath(p or os.curdir) != _checkout]
  _module = importlib.util.module_from_spec(_spec)
  sys.modules["kernels"] = _module  # the import system returns this module, not the folder
  _spec.loader.exec_module(_module)
