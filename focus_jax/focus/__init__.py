"""Focus-dLLM: past-confidence focus, sinks reused across layers, sink-aware block pruning."""

from focus_jax.focus.config import FocusConfig
from focus_jax.focus.denoiser import FocusDenoiser, summarize
