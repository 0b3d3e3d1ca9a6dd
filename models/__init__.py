"""Flax ports of LLaDA and Dream on one transformer core (importable as `focus_jax.models`)."""

from focus_jax.models.attention import Attention, SelfAttention
from focus_jax.models.config import ModelConfig, dream_7b, from_hf_config, llada_8b
from focus_jax.models.family import align_logits, forward_logits, positions_and_masks
from focus_jax.models.transformer import Transformer, compiler_options
