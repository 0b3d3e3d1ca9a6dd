"""UltraLLaDA at 32K context, the paper's throughput setting: gen 256, steps 256, block 32.

With the default random weights ("ultra_llada") the prompt is 32K random tokens; point
--config.model at a converted UltraLLaDA checkpoint (its RoPE base is read from its config.json)
and set --config.synthetic_prompt_length=0 with real prompts for text.
--config.decoding.focus.refresh_fp8_attention=True runs the refreshes' attention in fp8 (cuDNN,
Hopper): 18.85 against 16.56 tokens/s on an H100, 0 points lost on the demo model at 1K-8K
(README, 2026-12-06). Pad keys are neutralised, not masked: a batch whose rows are more than
1/32 pads is refused. --config.decoding.focus.refresh_fp8_matmul=True adds the refreshes'
projections in fp8: 23.05 tokens/s on an H200 (16.81 exact). Or
--config.decoding.focus.refresh_prompt_keep=0.25: each 1024-query chunk of the prompt attends to
a quarter of the prompt's 128-key blocks in the refreshes, 23.59 tokens/s on an H200 (README,
2026-12-06, with its accuracy cost on the demo model).
"""

from focus_jax.run_config import default_config


def get_config():
  c = default_config()
  c.model = "ultra_llada"
  c.dtype = "bfloat16"
  c.synthetic_prompt_length = 32768 - 256
  c.gen_length = 256
  c.steps = 256
  c.block_length = 32
  # The SwiGLU streamed on one Hopper GPU. H200 Focus step: 8K 6.04-6.08 vs 6.36 ms, 32K 8.03
  # vs 8.34 ms (whole 32K generations tied: 16.63 vs 16.66 tokens/s).
  c.matmul_impl = "auto"
  return c
