"""Block-sparse attention kernels (GPU Pallas-Triton, TPU Pallas-Mosaic) and their shared parts.

The public entry point is `focus_jax.kernels.sparse_attention`.
"""
