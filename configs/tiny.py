"""A random tiny LLaDA-architecture model with a byte-level tokenizer: runs on a CPU in seconds."""

from focus_jax.run_config import default_config


def get_config():
  c = default_config()
  c.model = "tiny"
  c.gen_length = 64
  c.steps = 64
  c.block_length = 16
  # Its 4 layers: the first 2 dense (sinks from layer 1), then sparse over 16-token prompt
  # blocks (the defaults, 6 dense layers and blocks of 128, would leave Focus all dense).
  c.decoding.focus.l_dense = 2
  c.decoding.focus.prompt_block_size = 16
  return c
