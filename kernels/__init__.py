"""Attention kernels (importable as `focus_jax.kernels`). They know nothing of models."""

if __name__ == "kernels":
  # This folder sits at the repository root, so running Python there (`python main.py`,
  # `python -m pytest`) puts it on sys.path as a top-level `kernels`: the import name of Hugging
  # Face's `kernels` package, which transformers imports. Hand such an import to the installed
  # package; this code itself is only ever `focus_jax.kernels`.
  import importlib.machinery
  import importlib.util
  import os
  import sys

  _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
  _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
  if _spec is None or _spec.loader is None:
    raise ImportError("no package named `kernels` is installed; the repository's kernels/ folder "
                      "is focus_jax.kernels: import it as `focus_jax.kernels`")
  _module = importlib.util.module_from_spec(_spec)
  sys.modules["kernels"] = _module  # the import system returns this module, not the folder
  _spec.loader.exec_module(_module)
