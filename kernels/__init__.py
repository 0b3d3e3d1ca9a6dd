"""Attention kernels (importable as `focus_jax.kernels`). They know nothing of models."""
