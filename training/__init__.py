"""Training the demo dLLM (installed as `focus_jax.training`): synthetic long-context tasks,
LLaDA's masked-diffusion SFT objective, and export to LLaDA's Hugging Face layout."""
