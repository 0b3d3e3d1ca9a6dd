"""Dream (Qwen2.5 backbone): what is specific to it beyond `ModelConfig` semantics.

Standard Qwen2 tensor names; q/k/v carry biases, o_proj does not.
"""

from __future__ import annotations

from focus_jax.models.config import ModelConfig
from focus_jax.models.param_map import TensorSpec, build_specs


def hf_tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  return build_specs(
      cfg, embed="model.embed_tokens.weight", final_norm="model.norm.weight",
      lm_head="lm_head.weight", layer_prefix="model.layers.{i}",
      norms={"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"},
      linears={"q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
               "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
               "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
               "down_proj": "mlp.down_proj.weight"},
      biases={"q_proj": "self_attn.q_proj.bias", "k_proj": "self_attn.k_proj.bias",
              "v_proj": "self_attn.v_proj.bias"})
