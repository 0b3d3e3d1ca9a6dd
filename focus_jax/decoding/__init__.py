"""Decoding modes: how each denoising step computes its logits (vanilla, caches, Focus)."""

from focus_jax.decoding.base import Canvas, Denoiser, StepContext
from focus_jax.decoding.vanilla import VanillaDenoiser
