"""The environment of a test's CPU subprocess."""

from __future__ import annotations

import os

# XLA:CPU without LLVM's optimisation passes: conftest sets it for the whole suite.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of a CPU subprocess with `devices` host devices (this session's XLA flags
  kept)."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), **extra)


def optimising_env() -> dict[str, str]:
  """The environment of a subprocess whose time goes to running interpreted kernels, not to
  compiling: XLA:CPU's optimisation passes back on (conftest turns them off for the suite), which
  halves the interpreted kernels' time there."""
  flags = os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE, "")
  return dict(os.environ, XLA_FLAGS=flags.strip())
