"""Dream-v0-Instruct-7B. Set --config.model to a converted checkpoint or HF directory; the default
"dream_7b" runs random weights of the real shape."""

from focus_jax.run_config import default_config, dream_sampler


def get_config():
  c = default_config()
  c.model = "dream_7b"
  c.dtype = "bfloat16"
  c.gen_length = 256
  c.steps = 256
  c.block_length = 32
  c.sampler = dream_sampler()
  return c
