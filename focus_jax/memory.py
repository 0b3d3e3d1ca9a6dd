"""Will a generation fit? A device-memory estimate computed before anything is allocated.

Counted: parameters, the KV cache of the cached modes (every layer, every canvas position), and
the refresh's working set (a full forward over the canvas: a few hidden-sized and MLP-sized
activations of one layer at a time, since layers run one after the other), plus what a refresh
policy adds: fp8 copies of the weights, or selected prompt blocks' head-major K/V and one group
of chunks (`kernels.selected_attention.extra_bytes`). Measured on an H100
(LLaDA-8B, 32K, Focus, 2026-11-23): peak 34.3 GiB; this estimate gives 35.6 GiB.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from focus_jax.decoding.base import Denoiser
from focus_jax.decoding.cache import RefreshPolicy
from focus_jax.kernels import selected_attention
from focus_jax.models.config import ModelConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  params: int
  kv_cache: int
  activations: int
  fp8_weights: int = 0  # the refresh's e4m3 copies of the projections (refresh_fp8_matmul)
  selected_prompt: int = 0  # a refresh's selected prompt blocks (refresh_prompt_keep)

  @property
  def total(self) -> int:
    return (self.params + self.kv_cache + self.activations + self.fp8_weights
            + self.selected_prompt)

  def describe(self) -> str:
    fp8 = f", fp8 weights {self.fp8_weights / GIB:.1f}" if self.fp8_weights else ""
    selected = (f", selected prompt blocks {self.selected_prompt / GIB:.1f}"
                if self.selected_prompt else "")
    return (f"{self.total / GIB:.1f} GiB (parameters {self.params / GIB:.1f}, KV cache "
            f"{self.kv_cache / GIB:.1f}, refresh activations {self.activations / GIB:.1f}{fp8}"
            f"{selected})")


def estimate(config: ModelConfig, batch: int, length: int, mode: str, data: int = 1,
             model: int = 1, denoiser: Denoiser | None = None, prompt_length: int | None = None,
             padded: bool = False) -> MemoryEstimate:
  """Bytes per device for a canvas of `length` tokens (`prompt_length` of them the prompt, by
  default all but 256) on a mesh of `data` x `model` devices (`focus_jax.sharding`): weights
  split over "model" and copied along "data", caches and activations split by rows over "data"
  and caches by kv heads over "model" (an uneven split holds the larger share). `denoiser`: the
  decoding (its refresh policy and attention implementation decide what a refresh holds);
  `padded`: the batch carries pad tokens (a refresh then reorders its keys valid first, and
  selected blocks are gathered)."""
  width = jnp.dtype(config.jnp_dtype).itemsize
  params = config.num_params() * width // model
  rows = -(-batch // data)  # a device's share of the batch
  cache = 0
  if mode != "vanilla":
    kv_heads = -(-config.n_kv_heads // model)
    cache = 2 * config.n_layers * rows * length * kv_heads * config.head_dim * width
  q = config.n_heads * config.head_dim
  per_token = (6 * config.d_model + 3 * q + 3 * config.mlp_hidden) * width
  if padded:  # a refresh reorders K and V valid first for cuDNN (`dense_attention.valid_first`)
    per_token += 2 * config.n_kv_heads * config.head_dim * width
  refresh = getattr(denoiser, "refresh", None) or RefreshPolicy()  # (vanilla has none)
  fp8 = config.projection_params() // model if refresh.fp8_matmul else 0  # 1 byte a weight
  selected = 0
  if refresh.prompt_keep and mode != "vanilla":
    selected = selected_attention.extra_bytes(
        rows, length, config.n_heads, config.n_kv_heads, config.head_dim, config.jnp_dtype,
        prefix=length - 256 if prompt_length is None else prompt_length,
        chunk=refresh.prompt_chunk, block=refresh.prompt_block, keep=refresh.prompt_keep,
        n_global=refresh.prompt_globals, padded=padded,
        implementation=getattr(denoiser, "attention_impl", "auto")) // model
  return MemoryEstimate(params, cache, rows * length * per_token, fp8, selected)


def device_limit(device=None) -> int | None:
  """Usable bytes of the device, or None where the backend does not say (CPU)."""
  device = device or jax.local_devices()[0]  # (on a pod, devices()[0] may be another host's)
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit")


def check_fits(config: ModelConfig, batch: int, length: int, mode: str, data: int = 1,
               model: int = 1, limit: int | None = None, denoiser: Denoiser | None = None,
               prompt_length: int | None = None, padded: bool = False) -> MemoryEstimate:
  """Raises MemoryError, naming the sizes and the fixes, when the estimate exceeds the limit."""
  est = estimate(config, batch, length, mode, data, model, denoiser, prompt_length, padded)
  from_device = limit is None
  limit = device_limit() if from_device else limit
  if limit is not None and est.total > limit:
    # The device's limit is JAX's allocator share of its memory, not all of it.
    share = (f"; JAX may use {os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75')} of "
             f"the device (XLA_PYTHON_CLIENT_MEM_FRACTION, set before JAX starts)"
             if from_device else "")
    raise MemoryError(
        f"{mode} at batch {batch} x {length} tokens needs about {est.describe()} per device, "
        f"more than the {limit / GIB:.1f} GiB available: shorten the prompt or gen_length, lower "
        f"the batch, or shard over more devices (--config.mesh.model=N){share}")
  return est
