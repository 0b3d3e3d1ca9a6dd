"""A random tiny LLaDA-architecture model with a byte-level tokenizer: runs on a CPU in seconds."""

from focus_jax.run_config import default_config


def get_config():
  c = default_config()
  c.model = "tiny"
  c.gen_length = 64
  c.steps = 64
  c.block_length = 16
  return c
