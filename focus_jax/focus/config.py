"""Focus-dLLM's knobs. Reported values are the defaults; the unpublished ones are decided here.

Decided (the paper does not publish them), each configurable:
- n_sink = 32 sink tokens. Sinks are few (the first token, delimiters); 32 tokens cost nothing
  next to the kept prompt blocks and leave room for several sink clusters.
- prompt_block_size = 64 keys. A multiple of the kernels' tiles (8 x 128 on TPU, 16 rows on GPU);
  512 blocks at 32K keep the relevance scoring cheap, while 64 tokens are fine-grained enough
  to keep a retrieval needle's neighbourhood without much else.
- representative = "bound": Quest's box, the channel-wise min and max of a block's keys, scored
  by their upper bound on the block's largest logit. A block whose one key matches strongly is
  kept, which a lookup needs. "mean" (the mean key: the mean logit over the block) dilutes that
  key by the block size: on the trained demo model, Focus with mean-key blocks answers 54% of
  the 1K prompts that dense answers, with bound blocks all of them (README). "max" (channel-wise
  max alone) is kept for comparison.
- selection = "per_kv_head": each KV head keeps its own prompt blocks (relevance averaged over
  the query heads of its GQA group and over the focus queries); "shared" keeps one set for all
  heads. Per-head selection follows each head's own focus and reads the same number of bytes.
- The sink score is the head-averaged attention probability summed over the active queries at
  the last dense layer (layer l_dense - 1); sinks are chosen among the prompt keys (the response
  region is always attended anyway).
- I_active window: positions i - (w-1)//2 ... i + w//2 around each focus position i, clipped to
  the block (w=8 gives i-3 ... i+4).
"""

from __future__ import annotations

import dataclasses
import functools
import logging


@dataclasses.dataclass(frozen=True)
class FocusConfig:
  l_dense: int = 6  # layers 0 .. l_dense-1 attend densely; sinks come from layer l_dense-1
  dense_tail: int = 0  # final layers kept dense (Dream-7B: 4)
  rho: int = 4  # I_focus = top rho*k masked positions by past confidence
  window: int = 8  # I_active = I_focus widened by this local window
  alpha: float = 0.5  # fraction of prompt blocks kept in sparse layers
  n_sink: int = 32
  prompt_block_size: int = 64
  representative: str = "bound"  # "bound" | "mean" | "max"
  selection: str = "per_kv_head"  # "per_kv_head" | "shared"
  # Query slots a sparse step runs (static); None: the block length. Beyond it, active positions
  # are dropped by tier (decoded neighbours first, then other masked positions, focus positions
  # last), later positions first within a tier (`indicator.active_slots`).
  active_capacity: int | None = None
  # Test knob: I_active = the whole block (with l_dense = n_layers and alpha = 1 Focus must then
  # reproduce the dual cache exactly).
  whole_block_active: bool = False
  # The split-KV kernels of a step (kernels.sparse_attention): the sparse layers' and, on a GPU
  # or TPU, the dense layers' over the whole cache.
  sparse_impl: str = "auto"
  # Block relevance and top-alpha selection: "xla" (GEMM, softmax, top_k) or "pallas_gpu" (one
  # fused kernel over the focus slots; measured slower on an H100, kernels/block_relevance.py).
  relevance_impl: str = "xla"
  diagnostics: bool = False  # recall, retained attention mass, KV tokens per layer

  def __post_init__(self):
    if self.rho < 1 or self.window < 1:
      raise ValueError(f"rho and window must be >= 1, got rho={self.rho}, window={self.window}")
    if not 0 < self.alpha <= 1:
      raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
    if self.representative not in ("mean", "bound", "max"):
      raise ValueError("representative must be 'mean', 'bound' or 'max', got "
                       f"{self.representative!r}")
    if self.selection not in ("per_kv_head", "shared"):
      raise ValueError(f"selection must be 'per_kv_head' or 'shared', got {self.selection!r}")
    if self.prompt_block_size < 8 or self.prompt_block_size % 8:
      raise ValueError(f"prompt_block_size must be a positive multiple of 8, got "
                       f"{self.prompt_block_size}")
    if self.relevance_impl not in ("xla", "pallas_gpu"):
      raise ValueError("relevance_impl must be 'xla' or 'pallas_gpu', got "
                       f"{self.relevance_impl!r}")
    if self.l_dense < 0 or self.dense_tail < 0 or self.n_sink < 0:
      raise ValueError("l_dense, dense_tail and n_sink must be >= 0")

  def is_dense(self, layer: int, n_layers: int) -> bool:
    return layer < self.l_dense or layer >= n_layers - self.dense_tail

  def sink_layer(self, n_layers: int) -> int | None:
    """The layer whose attention finds the sinks: the last of the leading dense layers."""
    if self.n_sink == 0 or self.l_dense == 0 or self.l_dense >= n_layers:
      return None
    return self.l_dense - 1

  def check(self, n_layers: int) -> None:
    sparse = [l for l in range(n_layers) if not self.is_dense(l, n_layers)]
    if not sparse and not self.whole_block_active:
      # (a warning, not an error: tiny test models run Focus's defaults, 6 dense layers, too)
      warn_all_dense(self.l_dense, self.dense_tail, n_layers)
    if sparse and self.n_sink and self.l_dense == 0:
      raise ValueError("sinks are found in a dense layer: l_dense must be >= 1 when n_sink > 0")


@functools.cache  # once per setting
def warn_all_dense(l_dense: int, dense_tail: int, n_layers: int) -> None:
  fix = (f"lower l_dense below {n_layers - dense_tail}" if dense_tail < n_layers
         else f"lower dense_tail below {n_layers}")
  logging.warning(
      "Focus: l_dense=%d and dense_tail=%d leave none of the model's %d layers sparse, so no "
      "prompt block is pruned and there are no sinks; %s for Focus's sparse attention",
      l_dense, dense_tail, n_layers, fix)
