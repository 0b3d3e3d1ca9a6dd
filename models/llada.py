"""LLaDA / UltraLLaDA: what is specific to them beyond `ModelConfig` semantics.

The checkpoint layout (`LLaDAModelLM`, prefix `model.transformer.`): `ff_proj` is the SwiGLU gate,
`up_proj` the up projection, `ff_out` inside a block the down projection, and the top-level
`ff_out` the LM head.
"""

from __future__ import annotations

from focus_jax.models.config import ModelConfig
from focus_jax.models.param_map import TensorSpec, build_specs

PREFIX = "model.transformer"


def hf_tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  return build_specs(
      cfg, embed=f"{PREFIX}.wte.weight", final_norm=f"{PREFIX}.ln_f.weight",
      lm_head=f"{PREFIX}.ff_out.weight", layer_prefix=PREFIX + ".blocks.{i}",
      norms={"attn_norm": "attn_norm.weight", "mlp_norm": "ff_norm.weight"},
      linears={"q_proj": "q_proj.weight", "k_proj": "k_proj.weight", "v_proj": "v_proj.weight",
               "o_proj": "attn_out.weight", "gate_proj": "ff_proj.weight",
               "up_proj": "up_proj.weight", "down_proj": "ff_out.weight"},
      biases={})
