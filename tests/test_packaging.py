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


def _import_top_level_kernels(cwd, env=None):
  """`import kernels` in a fresh interpreter: (its file, or None if it failed; stderr). When no
  `kernels` distribution is installed, the failure must name `focus_jax.kernels`."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"],
                       cwd=cwd, capture_output=True, text=True, env=env)
  try:
    importlib.metadata.version("kernels")
  except importlib.metadata.PackageNotFoundError:
    assert out.returncode != 0 and "focus_jax.kernels" in out.stderr, out.stderr
    return None, out.stderr
  assert out.returncode == 0, out.stderr
  return os.path.realpath(out.stdout.strip()), out.stderr


def test_top_level_kernels_at_the_repository_root_is_the_installed_package():
  """Python run at the repository root sees kernels/ as a top-level `kernels`, the import name of
  Hugging Face's package that transformers imports (`from kernels import ...`): the folder hands
  that import to the installed package, or fails naming `focus_jax.kernels` when there is none."""
  found, _ = _import_top_level_kernels(ROOT)
  if found is None:
    return
  assert not found.startswith(os.path.realpath(ROOT) + os.sep)
  ours = subprocess.run([sys.executable, "-c", "import focus_jax.kernels as k; print(k.__file__)"],
                        cwd=ROOT, capture_output=True, text=True, check=True)
  assert os.path.realpath(ours.stdout.strip()) == os.path.join(os.path.realpath(ROOT), "kernels",
                                                                "__init__.py")


def test_top_level_kernels_skips_other_checkouts_on_the_path(tmp_path):
  """Two checkouts on sys.path (a worktree and PYTHONPATH): each folder's hand-off skips the
  other instead of recursing between them."""
  import shutil  # pylint: disable=g-import-not-at-top
  entries = []
  for name in ("a", "b"):
    folder = tmp_path / name / "kernels"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "kernels", "__init__.py"), folder / "__init__.py")
    entries.append(str(tmp_path / name))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(entries)}
  found, stderr = _import_top_level_kernels(str(tmp_path), env)
  assert "RecursionError" not in stderr
  assert found is None or not found.startswith(os.path.realpath(str(tmp_path)) + os.sep)
