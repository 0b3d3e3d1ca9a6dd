"""What the accelerator can run: kernels pick their implementations by it."""

from __future__ import annotations

import jax


def cuda_capability(device: jax.Device | None = None) -> tuple[int, int] | None:
  """(major, minor) CUDA compute capability of `device` (default: the first device) when it is an
  NVIDIA GPU; None elsewhere, or where it is not "major.minor" (ROCm reports gfx names)."""
  device = device or jax.devices()[0]
  capability = str(getattr(device, "compute_capability", "") or "")
  if device.platform != "gpu":
    return None
  try:
    major, minor = capability.split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


# Our Pallas GPU kernels and cuDNN's flash attention are built and measured from Ampere on;
# older GPUs (a Colab T4 is 7.5) take the XLA paths under "auto".
AMPERE = (8, 0)


def gpu_at_least(capability: tuple[int, int] = AMPERE) -> bool:
  """Whether the default backend is a GPU of at least this CUDA compute capability (a GPU that
  reports none, ROCm, counts as one)."""
  if jax.default_backend() != "gpu":
    return False
  have = cuda_capability()
  return have is None or have >= capability


def is_hopper() -> bool:
  """Whether the default backend is a Hopper GPU (H100 / H200: compute capability 9.x), the one
  the Mosaic GPU kernels' wgmma and TMA are written for."""
  have = cuda_capability()
  return have is not None and have[0] == 9
