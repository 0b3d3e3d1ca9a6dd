"""Samplers: LLaDA's and Dream's unmasking rules over one jitted denoising loop."""

from focus_jax.sampling.dream import DreamRule
from focus_jax.sampling.generate import compile_generation, dream_rule, generate_tokens, llada_rule
from focus_jax.sampling.llada import LLaDARule
