"""main.py's default: the demo dLLM trained here (demo_model/, LLaDA's HF layout, 8.8M
parameters, `python -m focus_jax.training.train`) on a freshly generated long-context task, dense
(vanilla) and Focus side by side, on the CPU, with the expected answer.

`demo_model/` is loaded as a Hugging Face directory (`focus_jax.load` reads its config.json and
safetensors with the converter's validation). Try --config.task=kv or vt, --config.seed=N for
another prompt, --config.task_prompt_length=4064 for a longer one, --config.task_depth=0.9.
"""

import os

from focus_jax.run_config import default_config
from focus_jax.training import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  c = default_config()
  c.model = os.path.join(ROOT, "demo_model")
  c.dtype = "float32"  # the CPU is faster in float32 than in the checkpoint's bf16
  c.task = "passkey"
  # (pad_to 64 left-pads it to 2048: with gen_length 16, a 2064-token canvas; about a minute on
  # a CPU)
  c.task_prompt_length = 2032
  c.gen_length = 16  # answers are 6-10 words, then eos
  c.steps = 16
  c.block_length = tasks.BLOCK_LENGTH  # 4: the answer spans two or three blocks
  c.modes = ("vanilla", "focus")
  # 8 layers: the first 2 dense (sinks from layer 1), then sparse with the reported rho, window
  # and alpha.
  c.decoding.focus.l_dense = 2
  c.decoding.focus.diagnostics = True
  return c
