"""Token-level generation: one jitted function per configuration.

`generate_tokens` runs the whole denoising loop (every block and step) inside a single jit:
the sampler rule, decoding mode, lengths and CFG scale are static; prompts, masks, parameters
and the RNG key are traced, so new prompts of the same shape never recompile.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax
import jax

from focus_jax.decoding.base import Denoiser
from focus_jax.models.config import ModelConfig
from focus_jax.models.transformer import compiler_options
from focus_jax.sampling import loop
from focus_jax.sampling.dream import DreamRule
from focus_jax.sampling.llada import LLaDARule


@flax.struct.dataclass
class GenerateOutput:
  """What a generation hands back: the canvas, the step count and the denoiser's diagnostics.

  Not the loop state: returning it would make the KV cache (16 GiB at 32K for LLaDA-8B) an
  output of the jitted call, alive for as long as the caller keeps the result.
  """

  tokens: jax.Array  # [B, prompt + gen_length] the final canvas
  num_steps: jax.Array  # int32: denoising steps (forward passes) taken
  stats: dict[str, jax.Array]  # Focus diagnostics accumulators; empty when off or not Focus


def steps_per_block(steps: int, gen_length: int, block_length: int) -> int:
  if gen_length < 1:
    raise ValueError(f"gen_length must be >= 1 (the tokens to generate), got {gen_length}")
  if block_length < 1 or gen_length % block_length:
    raise ValueError(f"gen_length ({gen_length}) must be a positive multiple of block_length "
                     f"({block_length}); block_length=gen_length decodes one block (Dream's "
                     "own diffusion_generate does; the cached modes refresh once then)")
  num_blocks = gen_length // block_length
  if steps < num_blocks or steps % num_blocks:
    raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks "
                     f"({num_blocks} = gen_length / block_length)")
  return steps // num_blocks


def llada_rule(config: ModelConfig, *, steps: int, gen_length: int, block_length: int,
               temperature: float = 0.0, remasking: str = "low_confidence",
               threshold: float | None = None, logits_eos_inf: bool = False,
               confidence_eos_eot_inf: bool = False) -> LLaDARule:
  return LLaDARule(steps_per_block=steps_per_block(steps, gen_length, block_length),
                   eos_token_id=config.eos_token_id, eot_token_id=config.eot_token_id,
                   temperature=temperature, remasking=remasking, threshold=threshold,
                   logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf)


def dream_rule(*, steps: int, gen_length: int, block_length: int | None = None,
               alg: str = "entropy", eps: float = 1e-3, temperature: float = 0.0,
               top_p: float | None = None, top_k: int | None = None,
               alg_temp: float | None = None, threshold: float | None = None) -> DreamRule:
  block_length = block_length or gen_length
  return DreamRule(steps_per_block=steps_per_block(steps, gen_length, block_length),
                   block_length=block_length, alg=alg, eps=eps, temperature=temperature,
                   top_p=top_p, top_k=top_k, alg_temp=alg_temp, threshold=threshold)


@functools.partial(jax.jit, static_argnames=("config", "rule", "denoiser", "gen_length",
                                             "block_length", "cfg_scale"))
def generate_tokens(params: Any, prompt: jax.Array, prompt_mask: jax.Array | None,
                    rng: jax.Array, *, config: ModelConfig, rule: LLaDARule | DreamRule,
                    denoiser: Denoiser, gen_length: int, block_length: int,
                    cfg_scale: float = 0.0) -> GenerateOutput:
  """Denoises [prompt | MASK x gen_length]; `.tokens` of the result is the final canvas."""
  chex.assert_rank(prompt, 2)
  if prompt.shape[1] + gen_length > config.max_sequence_length:
    raise ValueError(f"prompt ({prompt.shape[1]}) + gen_length ({gen_length}) exceeds the "
                     f"model's max_sequence_length ({config.max_sequence_length})")
  if cfg_scale and not isinstance(rule, LLaDARule):
    raise ValueError("cfg_scale is LLaDA's classifier-free guidance; Dream has none")
  canvas = loop.make_canvas(prompt, prompt_mask, gen_length, block_length, config.mask_token_id)
  final = loop.run(params, canvas, denoiser, rule, rng, config.mask_token_id, cfg_scale)
  return GenerateOutput(tokens=final.tokens, num_steps=final.num_steps,
                        stats=getattr(final.denoiser_state, "stats", {}))


def compile_generation(params: Any, prompt: jax.Array, prompt_mask: jax.Array | None,
                       rng: jax.Array, **static) -> jax.stages.Compiled:
  """`generate_tokens` lowered and compiled ahead of time with the XLA options its model config
  asks for (`models.transformer.compiler_options`); call the result with the four arrays."""
  lowered = generate_tokens.lower(params, prompt, prompt_mask, rng, **static)
  return lowered.compile(compiler_options(static["config"], prompt.shape[0]))
