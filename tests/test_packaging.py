"""The install layout: every package folder is listed, and nothing generic lands top-level."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_listed():
  tool = _setuptools()
  listed = set(tool["packages"])
  mapping = tool["package-dir"]
  found = set()
  for name, folder in mapping.items():
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      if "__init__.py" in files and "__pycache__" not in dirpath:
        rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
        found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
  assert found == listed, f"pyproject packages: missing {sorted(found - listed)}, " \
                          f"stale {sorted(listed - found)}"
  assert all(n == "focus_jax" or n.startswith("focus_jax.") for n in listed)


def test_public_api_imports_in_a_clean_interpreter():
  code = ("import focus_jax, focus_jax.models, focus_jax.kernels, focus_jax.checkpoints_convert;"
          "import importlib.util as u;"
          "assert u.find_spec('focus_jax.focus') and u.find_spec('focus_jax.sampling');"
          "print(focus_jax.generate.__name__)")
  out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "generate"


def test_top_level_kernels_at_the_repository_root_is_the_installed_package():
  """Python run at the repository root sees kernels/ as a top-level `kernels`, the import name of
  Hugging Face's package that transformers imports (`from kernels import ...`): the folder hands
  that import to the installed package, or fails naming `focus_jax.kernels` when there is none."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  code = "import kernels, sys; print(kernels.__file__)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  try:
    importlib.metadata.version("kernels")
  except importlib.metadata.PackageNotFoundError:
    assert out.returncode != 0 and "focus_jax.kernels" in out.stderr, out.stderr
    return
  assert out.returncode == 0, out.stderr
  assert not os.path.realpath(out.stdout.strip()).startswith(os.path.realpath(ROOT) + os.sep)
  ours = subprocess.run([sys.executable, "-c", "import focus_jax.kernels as k; print(k.__file__)"],
                        cwd=ROOT, capture_output=True, text=True, check=True)
  assert os.path.realpath(ours.stdout.strip()) == os.path.join(os.path.realpath(ROOT), "kernels",
                                                                "__init__.py")
