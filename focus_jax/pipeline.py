"""Strings in, text out: `load` a model and `generate` with any sampler and decoding mode.

    import focus_jax
    model = focus_jax.load("/path/to/converted-or-hf-checkpoint")   # or "tiny"
    texts = focus_jax.generate(["What is 2+2?"], model, mode="focus", gen_length=128)

Prompts are left-padded to a multiple of `pad_to` (at most to what the model has room for
beside the generation) so that prompts of similar length share one compiled program; RoPE depends only on position differences and pads are masked, so padding does
not change the result.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from focus_jax import memory, presets, sharding, step_timing
from focus_jax.decoding import make_denoiser
from focus_jax.models import param_map
from focus_jax.models.config import MATMUL_IMPLS, ModelConfig
from focus_jax.sampling import compile_generation, dream_rule, llada_rule, loop


@dataclasses.dataclass
class Model:
  """A model ready to generate: config, parameters on device, tokenizer."""

  config: ModelConfig
  params: Any
  tokenizer: Any
  name: str = ""
  mesh: jax.sharding.Mesh | None = None


def model_config(source: str) -> ModelConfig:
  """The config `load(source)` would give, without drawing or reading any weight."""
  if source in presets.PRESETS:
    return presets.preset(source)
  from focus_jax.checkpoints_convert import read_model_config  # pylint: disable=g-import-not-at-top
  try:
    return read_model_config(source)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (or a preset with random weights: "
                            f"{', '.join(presets.PRESETS)})") from e


def load(source: str = "tiny", *, dtype: str | None = None, seed: int = 0,
         mesh: jax.sharding.Mesh | None = None, matmul_impl: str | None = None,
         fused_qkv: bool | None = None) -> Model:
  """A preset name (random weights: "tiny", "llada_8b", "ultra_llada", "dream_7b") or the path
  of a converted checkpoint or a Hugging Face directory. `matmul_impl` overrides the config's
  `ModelConfig.matmul_impl` (how a cached step's projections run; "auto" suits LLaDA-8B);
  `fused_qkv=True` lays each layer's q, k and v weights out as one (`ModelConfig.fused_qkv`)."""
  if matmul_impl is not None and matmul_impl not in MATMUL_IMPLS:  # before any weight is read
    raise ValueError(f"matmul_impl must be one of {MATMUL_IMPLS}, got {matmul_impl!r}")
  mesh = mesh or sharding.make_mesh()
  if mesh.size > 1:  # before any weight is read
    sharding.check_mesh(model_config(source), mesh)

  def with_impl(c: ModelConfig) -> ModelConfig:
    c = c if matmul_impl is None else c.replace(matmul_impl=matmul_impl)
    return c if fused_qkv is None else c.replace(fused_qkv=fused_qkv)

  def laid_out(config: ModelConfig, params):
    """Params in the layout the config asks for (they come in the checkpoint's)."""
    if not config.fused_qkv:
      return params
    return param_map.fuse_qkv(config, params, sharding.param_shardings(config, mesh), donate=True)

  if source in presets.PRESETS:
    config = with_impl(presets.preset(source, dtype))
    # Drawn in the checkpoint layout, so a seed gives the same model whatever the layout.
    unfused = config.replace(fused_qkv=False)
    params = presets.random_params(unfused, seed, sharding.param_shardings(unfused, mesh))
    tokenizer = presets.tiny_tokenizer() if source == "tiny" else None
    return Model(config, laid_out(config, params), tokenizer, name=f"{source} (random weights)",
                 mesh=mesh)
  from focus_jax import tokenizer as tokenization  # pylint: disable=g-import-not-at-top
  from focus_jax.checkpoints_convert import load_model  # pylint: disable=g-import-not-at-top
  try:  # first: a broken tokenizer file fails before gigabytes of weights are read
    tokenizer = tokenization.load_tokenizer(source)
  except FileNotFoundError as e:  # weights shipped without tokenizer files
    logging.warning("%s: no tokenizer (%s); generate_ids still works with token ids", source, e)
    tokenizer = None
  config, params = load_model(source, mesh=mesh, dtype=dtype)  # the checkpoint's layout
  if tokenizer is not None:
    try:  # a warning, not a refusal: ids set in the config may rightly differ from the files'
      tokenization.check_matches_config(tokenizer, config)
    except ValueError as e:
      logging.warning("%s: %s", source, e)
  config = with_impl(config)
  params = laid_out(config, params)
  return Model(config, params, tokenizer, name=source, mesh=mesh)


GEN_LENGTH = 128  # generate_ids' default generation length


def pad_prompts(token_lists: Sequence[Sequence[int]], pad_id: int, pad_to: int = 64,
                max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads to a common length rounded up to `pad_to`, but not past `max_length` (what the
  model has room for) when the longest prompt fits it: (tokens [B, P], mask [B, P])."""
  if len(token_lists) == 0:
    raise ValueError("no prompts given")
  empty = [row for row, t in enumerate(token_lists) if len(t) == 0]
  if empty:
    raise ValueError(f"every prompt must have at least one token; prompt rows {empty} have none")
  if pad_to < 1:
    raise ValueError(f"pad_to must be >= 1 (1: no rounding), got {pad_to}")
  longest = max(len(t) for t in token_lists)
  length = -(-longest // pad_to) * pad_to
  if max_length is not None and longest <= max_length:
    length = min(length, max_length)
  tokens = np.full((len(token_lists), length), pad_id, np.int32)
  mask = np.zeros((len(token_lists), length), bool)
  for row, ids in enumerate(token_lists):
    tokens[row, length - len(ids):] = ids
    mask[row, length - len(ids):] = True
  return tokens, mask


def pad_for_model(model: Model, token_lists: Sequence[Sequence[int]], pad_to: int,
                  gen_length: int) -> tuple[np.ndarray, np.ndarray]:
  """pad_prompts with the model's pad id (its eos where it names none), rounding no further
  than the room the model has beside `gen_length` generated tokens."""
  config = model.config
  room = config.max_sequence_length - gen_length
  longest = max((len(t) for t in token_lists), default=0)
  if longest > room:
    raise ValueError(f"the longest prompt has {longest} tokens, and with gen_length "
                     f"{gen_length} the model ({config.max_sequence_length} positions) has room "
                     f"for {room}: shorten the prompt or gen_length")
  pad_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
  return pad_prompts(token_lists, pad_id, pad_to, max_length=room)


@dataclasses.dataclass
class Generation:
  texts: list[str]  # decoded rows (`generate`); empty from `generate_ids`, which has no text
  tokens: np.ndarray  # [B, gen_length] generated ids
  num_steps: int  # denoising steps (forward passes) taken
  seconds: float  # wall time of the jitted call (after compilation)
  compile_seconds: float
  stats: dict[str, Any]


def sampler_rule(config: ModelConfig, *, steps: int, gen_length: int, block_length: int,
                 **sampler_options):
  rule = llada_rule if config.family == "llada" else dream_rule
  known = set(inspect.signature(rule).parameters) - {"config", "steps", "gen_length",
                                                     "block_length"}
  unknown = sorted(set(sampler_options) - known)
  if unknown:
    raise ValueError(f"sampler options {unknown} are not {config.family}'s; it takes "
                     f"{sorted(known)} (a config file of another family? configs/"
                     f"{'dream_7b' if config.family == 'dream' else 'llada_8b'}.py has this "
                     "family's)")
  if config.family == "llada":
    return llada_rule(config, steps=steps, gen_length=gen_length, block_length=block_length,
                      **sampler_options)
  return dream_rule(steps=steps, gen_length=gen_length, block_length=block_length,
                    **sampler_options)


def check_fp8_pads(prompt_mask: np.ndarray, gen_length: int) -> None:
  """fp8 attention cannot mask pad keys, only neutralise them (each becomes an average key);
  refuses a batch where that could move a row's output by more than FP8_MAX_PAD_FRACTION."""
  from focus_jax.kernels import dense_attention  # pylint: disable=g-import-not-at-top
  pads = np.sum(~np.asarray(prompt_mask, bool), axis=1)
  share = pads / (prompt_mask.shape[1] + gen_length)
  if share.max() > dense_attention.FP8_MAX_PAD_FRACTION:
    row = int(share.argmax())
    raise ValueError(
        f"refresh_fp8_attention: prompt row {row} is {int(pads[row])} pad tokens of "
        f"{prompt_mask.shape[1] + gen_length} ({share[row]:.1%}); fp8 attention cannot mask pads, "
        f"and above {dense_attention.FP8_MAX_PAD_FRACTION:.1%} they could bias its output. Batch "
        "prompts of similar length, pad less (generate's pad_to, main.py's --config.pad_to; 1 "
        "for a single prompt), "
        "or turn refresh_fp8_attention off")


def check_prompt(config: ModelConfig, prompt: np.ndarray, prompt_mask: np.ndarray | None):
  """Raises, naming the problem and the fix, unless prompt is int [B, P] ids inside the
  vocabulary (an embedding lookup would clamp the others silently) and prompt_mask (None: no
  pads) is a [B, P] left padding: each row some pads, then its tokens (`pad_prompts` makes it;
  the caches and Focus's sinks read a row's prompt as starting at its first valid position)."""
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt must be integer token ids [batch, length], got {prompt.dtype}"
                     f"{list(prompt.shape)}; tokenize and pad with pad_prompts")
  bad = (prompt < 0) | (prompt >= config.vocab_size)
  if bad.any():
    row, col = map(int, np.argwhere(bad)[0])
    raise ValueError(f"prompt id {int(prompt[row, col])} at row {row}, position {col} is outside "
                     f"the vocabulary [0, {config.vocab_size}): ids from another tokenizer?")
  if prompt_mask is None:
    return
  mask = np.asarray(prompt_mask)
  if mask.shape != prompt.shape:
    raise ValueError(f"prompt_mask {list(mask.shape)} must have the prompt's shape "
                     f"{list(prompt.shape)}")
  mask = mask.astype(bool)
  left_padded = np.all(mask[:, 1:] >= mask[:, :-1], axis=1) & mask[:, -1]
  if not left_padded.all():
    row = int(np.flatnonzero(~left_padded)[0])
    raise ValueError(f"prompt_mask row {row} is not a left padding (pads first, then at least "
                     "one token); right-padded or gapped prompts are not supported: pad with "
                     "pad_prompts")


def generate_ids(model: Model, prompt: np.ndarray, prompt_mask: np.ndarray, *,
                 mode: str = "vanilla", gen_length: int = GEN_LENGTH, steps: int | None = None,
                 block_length: int = 32, cfg_scale: float = 0.0, seed: int = 0,
                 decoding_options: dict[str, Any] | None = None, time_split: bool = True,
                 **sampler_options) -> Generation:
  """Token-level entry point (prompts already tokenized and padded); compiles once per shape.

  With Focus's diagnostics on, `time_split` also times a refresh and a cached step on their own
  (their own compiles and a few timed calls: seconds on a CPU, more at long context) to split
  the run's seconds between them; False leaves the split out of `stats`.

  prompt [B, P] and prompt_mask [B, P] (or None): host arrays, the same on every process, or
  `jax.Array`s, which may be spread over the processes' devices (each host holding some rows,
  `jax.make_array_from_process_local_data`): those are gathered onto every host first (token
  ids are small next to one step's work)."""
  prompt, prompt_mask = (None if a is None else sharding.to_host(a) for a in (prompt, prompt_mask))
  check_prompt(model.config, prompt, prompt_mask)
  sharding.check_same_on_every_host(prompt=prompt, prompt_mask=prompt_mask, seed=seed)
  rule = sampler_rule(model.config, steps=steps or gen_length, gen_length=gen_length,
                      block_length=block_length, **sampler_options)
  data, heads = 1, 1
  options = dict(decoding_options or {})
  if model.mesh is not None:
    sharding.check_mesh(model.config, model.mesh, batch=prompt.shape[0])
    data, heads = model.mesh.shape["data"], model.mesh.shape["model"]
    options.setdefault("cache_sharding", sharding.kv_sharding(model.mesh))
  denoiser = make_denoiser(model.config, mode, **options)
  # An unpadded batch needs no mask (cuDNN's unmasked path is the fast one).
  mask = None if prompt_mask is None or np.all(prompt_mask) else jnp.asarray(prompt_mask)
  memory.check_fits(model.config, prompt.shape[0] * (2 if cfg_scale else 1),
                    prompt.shape[1] + gen_length, mode, data, heads,
                    denoiser=denoiser, prompt_length=prompt.shape[1],
                    padded=mask is not None)
  if mask is not None and options.get("refresh_fp8_attention"):
    check_fp8_pads(prompt_mask, gen_length)
  args = (model.params, jnp.asarray(prompt), mask, jax.random.key(seed))
  kwargs = dict(config=model.config, rule=rule, denoiser=denoiser, gen_length=gen_length,
                block_length=block_length, cfg_scale=cfg_scale)
  with sharding.kernels_per_device(model.mesh):
    t0 = time.perf_counter()
    compiled = compile_generation(*args, **kwargs)
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - t0
    stats = state.stats
    if stats and time_split:  # Focus diagnostics: the step times of the split below
      canvas = loop.make_canvas(args[1], mask, gen_length, block_length,
                                model.config.mask_token_id)
      times = step_timing.step_times(denoiser, model.params, canvas,
                                     max_planned_unmask=rule.max_planned_unmask(block_length))
    else:
      times = {}
  tokens = sharding.to_host(state.tokens[:, prompt.shape[1]:])
  if stats:  # Focus diagnostics: recall, retained mass, KV tokens per layer, time split
    from focus_jax.focus import summarize  # pylint: disable=g-import-not-at-top
    stats = summarize(jax.tree.map(sharding.to_host, stats))
    if times:
      stats.update(times, seconds_in_refresh_steps=stats["refresh_steps"] * times["refresh_s"],
                   seconds_in_sparse_steps=stats["sparse_steps"] * times["cached_step_s"])
  return Generation(texts=[], tokens=tokens, num_steps=int(sharding.to_host(state.num_steps)),
                    seconds=seconds,
                    compile_seconds=compile_seconds, stats=stats)


def generate(prompts: str | Sequence[str], model: Model | str = "tiny", *, chat: bool = True,
             pad_to: int = 64, **options) -> list[str] | Generation:
  """Generates a completion for each prompt; returns the texts.

  `options` go to `generate_ids` (mode, gen_length, steps, block_length, cfg_scale, seed,
  decoding_options) and to the family's sampler (LLaDA: temperature, remasking, threshold,
  logits_eos_inf, confidence_eos_eot_inf; Dream: alg, temperature, top_p, top_k, alg_temp,
  threshold). Pass `return_details=True` for token ids, step count and timings too.
  """
  return_details = options.pop("return_details", False)
  if isinstance(model, str):
    model = load(model)
  if model.tokenizer is None:
    raise ValueError(f"model {model.name!r} has no tokenizer; use generate_ids with token ids")
  from focus_jax import tokenizer as tokenization  # pylint: disable=g-import-not-at-top
  texts = [prompts] if isinstance(prompts, str) else list(prompts)
  ids = tokenization.encode_prompts(model.tokenizer, texts, model.config.family, chat=chat)
  prompt, mask = pad_for_model(model, ids, pad_to, options.get("gen_length", GEN_LENGTH))
  result = generate_ids(model, prompt, mask, **options)
  result.texts = decode_rows(model, result.tokens)
  return result if return_details else result.texts


def decode_rows(model: Model, tokens: np.ndarray) -> list[str]:
  """Texts of generated rows, cut at the first eos / end-of-turn."""
  from focus_jax import tokenizer as tokenization  # pylint: disable=g-import-not-at-top
  stop = [i for i in (model.config.eos_token_id, model.config.eot_token_id) if i is not None]
  return [tokenization.decode(model.tokenizer, row, stop_ids=stop,
                              mask_ids=[model.config.mask_token_id]) for row in tokens]
