"""focus-jax: fast long-context inference for diffusion LLMs (LLaDA, UltraLLaDA, Dream) in JAX.

The repository's top-level folders are installed as subpackages of this one:
`models/` -> `focus_jax.models`, `kernels/` -> `focus_jax.kernels`,
`checkpoints_convert/` -> `focus_jax.checkpoints_convert`.
"""

__version__ = "0.1.0"

from focus_jax.pipeline import Generation, Model, generate, generate_ids, load
