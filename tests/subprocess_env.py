"""The environment of a test's CPU subprocess."""

from __future__ import annotations

import os


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of a CPU subprocess with `devices` host devices (this session's XLA flags
  kept)."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), **extra)
