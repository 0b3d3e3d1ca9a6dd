"""Decoding modes inside the one jitted loop: exactness against each other, and one compile.

- a dual cache (and a prefix cache) refreshed at every step is vanilla decoding, token for token;
- Focus with every layer dense, alpha = 1 and I_active = the whole block is the dual cache;
- Focus proper (sparse layers, sinks, pruning, a narrow I_active) decodes every block, reports its
  diagnostics only when asked, and compiles once per configuration.
All on padded batches of 2 with different prompt lengths, LLaDA and Dream semantics.
"""

from __future__ import annotations

import logging

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from focus_jax import pipeline
from focus_jax.decoding import cache as kv
from focus_jax.decoding import make_denoiser
from focus_jax.focus import summarize
from focus_jax.models import Transformer, family, param_map
from focus_jax.models import config as C
from focus_jax.sampling import dream_rule, generate_tokens, llada_rule, loop
from subprocess_env import cpu_env

MASK = 120
PROMPT, GEN, BLOCK = 100, 32, 16


def tiny(family: str) -> C.ModelConfig:
  make = C.llada_family if family == "llada" else C.dream_family
  return make(vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
              mlp_hidden=128, rms_eps=1e-5, rope_theta=10000.0, max_sequence_length=1024,
              mask_token_id=MASK, eos_token_id=1, eot_token_id=2)


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request):
  cfg = tiny(request.param)
  params = Transformer(cfg).init_params(jax.random.key(3))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20.0
  return cfg, params


def prompts(seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 110, size=(2, PROMPT)).astype(np.int32)
  mask = np.ones((2, PROMPT), bool)
  mask[0, :37] = False  # row 0 is a shorter prompt, left-padded
  tokens[0, :37] = 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def rule_for(cfg, threshold=None):
  if cfg.family == "llada":
    return llada_rule(cfg, steps=GEN, gen_length=GEN, block_length=BLOCK, threshold=threshold)
  return dream_rule(steps=GEN, gen_length=GEN, block_length=BLOCK, alg="maskgit_plus",
                    threshold=threshold)


def decode(cfg, params, mode, seed=0, threshold=None, **options):
  tokens, mask = prompts(seed)
  state = generate_tokens(params, tokens, mask, jax.random.key(0), config=cfg,
                          rule=rule_for(cfg, threshold),
                          denoiser=make_denoiser(cfg, mode, **options), gen_length=GEN,
                          block_length=BLOCK)
  return np.asarray(state.tokens[:, PROMPT:]), state


@pytest.mark.parametrize("start", [PROMPT, PROMPT + BLOCK])
def test_window_forward_equals_full_forward_rows(model, start):
  """Vanilla steps and refreshes run only the window's rows through the last layer; their
  logits must be the full forward's at those positions (Dream's shift and left-padding too)."""
  cfg, params = model
  tokens, mask = prompts()
  canvas = jnp.concatenate([tokens, jnp.full((2, GEN), MASK, jnp.int32)], axis=1)
  canvas_mask = jnp.concatenate([mask, jnp.ones((2, GEN), bool)], axis=1)
  full = family.forward_logits(cfg, params, canvas, canvas_mask, implementation="xla")
  window = jax.jit(lambda s: family.forward_logits(
      cfg, params, canvas, canvas_mask, implementation="xla", logits_window=(s, BLOCK)))(
          jnp.int32(start))
  np.testing.assert_allclose(np.asarray(window), np.asarray(full[:, start:start + BLOCK]),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["dual_cache", "prefix_cache"])
def test_cache_refreshed_every_step_is_vanilla(model, mode):
  cfg, params = model
  vanilla, _ = decode(cfg, params, "vanilla")
  cached, _ = decode(cfg, params, mode, refresh_every_step=True)
  np.testing.assert_array_equal(cached, vanilla)
  assert not (vanilla == MASK).any()


def test_cached_modes_are_approximations(model):
  """Without refreshes the caches are approximate: their logits differ from vanilla's (this
  guards the exactness tests above against a cache that silently refreshes every step)."""
  cfg, params = model
  vanilla, _ = decode(cfg, params, "vanilla")
  dual, _ = decode(cfg, params, "dual_cache")
  assert not (dual == MASK).any()
  assert (dual != vanilla).any()


def test_focus_degenerates_to_dual_cache(model):
  cfg, params = model
  dual, _ = decode(cfg, params, "dual_cache")
  focus, _ = decode(cfg, params, "focus", l_dense=cfg.n_layers, dense_tail=0, alpha=1.0,
                    whole_block_active=True)
  np.testing.assert_array_equal(focus, dual)


@pytest.mark.parametrize("selection", ["shared", "per_kv_head"])
def test_focus_sparse_decodes_with_diagnostics(model, selection):
  cfg, params = model
  tokens, state = decode(cfg, params, "focus", l_dense=2, dense_tail=0, alpha=0.5, n_sink=8,
                         prompt_block_size=16, rho=2, window=3, selection=selection,
                         diagnostics=True)
  assert not (tokens == MASK).any()
  stats = summarize(jax.tree.map(np.asarray, state.stats))
  assert stats["refresh_steps"] == GEN // BLOCK
  assert stats["sparse_steps"] == int(state.num_steps) - GEN // BLOCK
  assert 0.0 < stats["recall_focus"] <= stats["recall_active"] <= 1.0
  # rho * k = 2 focus positions (one token a step), each widened to 3: 2 to 6 active a step.
  assert 2.0 <= stats["active_per_sparse_step"] <= 6.0, stats["active_per_sparse_step"]
  mass = stats["retained_mass_per_layer"]
  assert mass[:2] == [1.0, 1.0]  # dense layers keep everything
  assert all(0.0 < m < 1.0 for m in mass[2:]), mass  # sparse layers drop some mass
  kv = stats["kv_tokens_per_layer"]
  assert kv[2] < kv[0] and kv[3] < kv[0]


def test_timed_steps_bracket_the_active_positions():
  """The benchmarks' cached step (step_timing.entry_context) activates 7 positions of a 32-block
  at the default rho and window; spread_context's step activates 29. Decoding runs about 16 a
  row (the demo model at block 32, README): mostly between the two."""
  from focus_jax import step_timing  # pylint: disable=g-import-not-at-top
  from focus_jax.focus import FocusConfig, indicator  # pylint: disable=g-import-not-at-top
  canvas = loop.make_canvas(jnp.ones((2, 64), jnp.int32), None, 64, 32, MASK)
  entry = step_timing.entry_context(canvas, 2)
  cfg = FocusConfig()
  for ctx, live in ((entry, 7), (step_timing.spread_context(entry), 29)):
    focus = indicator.focus_set(ctx.prev_confidence, ctx.masked, ctx.planned_unmask, cfg.rho)
    np.testing.assert_array_equal(jnp.sum(indicator.widen(focus, cfg.window), axis=1), live)


def test_fused_block_selection_decodes_as_the_xla_selection(model):
  """relevance_impl="pallas_gpu" (the fused selection kernel, interpreted here) keeps the same
  prompt blocks in every sparse layer as the XLA relevance + top_k: same tokens, and the same
  attention mass retained per layer (which depends on exactly which blocks were kept)."""
  cfg, params = model
  options = dict(l_dense=2, dense_tail=0, alpha=0.5, n_sink=8, prompt_block_size=8, rho=4,
                 window=3, diagnostics=True)
  ref_tokens, ref = decode(cfg, params, "focus", relevance_impl="xla", **options)
  tokens, state = decode(cfg, params, "focus", relevance_impl="pallas_gpu", **options)
  np.testing.assert_array_equal(tokens, ref_tokens)
  got, want = (summarize(jax.tree.map(np.asarray, s.stats)) for s in (state, ref))
  np.testing.assert_allclose(got["retained_mass_per_layer"], want["retained_mass_per_layer"],
                             rtol=1e-5)
  np.testing.assert_allclose(got["kv_tokens_per_layer"], want["kv_tokens_per_layer"])
  with pytest.raises(ValueError, match="selects per kv head"):
    decode(cfg, params, "focus", relevance_impl="pallas_gpu", selection="shared", **options)


def test_relevance_from_the_focus_slots_keeps_what_every_slot_keeps(model, monkeypatch):
  """The block relevance scores only the leading rho * k slots (k: the schedule's largest, 2
  or more here), where I_focus sits; the other slots weigh nothing. Same tokens and the same
  attention mass retained per layer (which depends on exactly which blocks were kept) as a
  rule without `max_planned_unmask` (it is optional: a user's own sampler), whose relevance
  scores every slot."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from focus_jax.focus.denoiser import FocusDenoiser  # pylint: disable=g-import-not-at-top
  steps = GEN // 2
  cfg, params = model
  tokens, mask = prompts()
  if cfg.family == "llada":
    rule = llada_rule(cfg, steps=steps, gen_length=GEN, block_length=BLOCK)
  else:
    rule = dream_rule(steps=steps, gen_length=GEN, block_length=BLOCK, alg="maskgit_plus")

  @dataclasses.dataclass(frozen=True)
  class Unbounded:
    rule: object
    steps_per_block: int

    def block_schedule(self, masked):
      return self.rule.block_schedule(masked)

    def planned_unmask(self, schedule, step, masked):
      return self.rule.planned_unmask(schedule, step, masked)

    def apply(self, *args):
      return self.rule.apply(*args)

  options = dict(l_dense=2, dense_tail=0, alpha=0.5, n_sink=8, prompt_block_size=8, rho=2,
                 window=3, diagnostics=True)
  sized = []
  real_focus_slots = FocusDenoiser._focus_slots

  def recording(self, ctx, capacity):
    sized.append(real_focus_slots(self, ctx, capacity))
    return sized[-1]

  def run(rule):
    sized.clear()
    generate_tokens.clear_cache()  # traced afresh: `recording` sees every call
    state = generate_tokens(params, tokens, mask, jax.random.key(0), config=cfg, rule=rule,
                            denoiser=make_denoiser(cfg, "focus", **options), gen_length=GEN,
                            block_length=BLOCK)
    return np.asarray(state.tokens[:, PROMPT:]), summarize(jax.tree.map(np.asarray, state.stats))

  monkeypatch.setattr(FocusDenoiser, "_focus_slots", recording)
  got_tokens, got = run(rule)
  assert set(sized) == {2 * rule.max_planned_unmask(BLOCK)}
  assert sized[0] < BLOCK  # fewer than the block's slots
  want_tokens, want = run(Unbounded(rule, rule.steps_per_block))
  assert set(sized) == {None}  # every slot scored
  assert not (want_tokens == MASK).any()
  np.testing.assert_array_equal(got_tokens, want_tokens)
  np.testing.assert_allclose(got["retained_mass_per_layer"], want["retained_mass_per_layer"],
                             rtol=1e-5)
  np.testing.assert_allclose(got["kv_tokens_per_layer"], want["kv_tokens_per_layer"])


def test_focus_diagnostics_are_free_when_off(model):
  cfg, params = model
  _, state = decode(cfg, params, "focus", l_dense=2, dense_tail=0, prompt_block_size=16)
  assert state.stats == {}


@pytest.mark.parametrize("mode", ["dual_cache", "focus"])
def test_generation_hands_back_no_kv_cache(model, mode):
  """The jitted generation's outputs are the canvas, the step count and the (small) diagnostics:
  a KV cache among them would stay allocated for as long as the caller keeps the result."""
  cfg, params = model
  tokens, mask = prompts(0)
  options = dict(l_dense=2, dense_tail=0, prompt_block_size=16, diagnostics=True) \
      if mode == "focus" else {}
  out = jax.eval_shape(lambda p, t, m: generate_tokens(
      p, t, m, jax.random.key(0), config=cfg, rule=rule_for(cfg, None),
      denoiser=make_denoiser(cfg, mode, **options), gen_length=GEN, block_length=BLOCK),
      params, tokens, mask)
  canvas_bytes = tokens.shape[0] * (PROMPT + GEN) * 4
  out_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(out))
  cache_bytes = 2 * cfg.n_layers * tokens.shape[0] * (PROMPT + GEN) * cfg.n_kv_heads \
      * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize
  assert out.tokens.shape == (tokens.shape[0], PROMPT + GEN)
  assert out_bytes < canvas_bytes + 4096 < cache_bytes, (out_bytes, canvas_bytes, cache_bytes)


@pytest.mark.parametrize("mode", ["vanilla", "dual_cache", "focus"])
def test_threshold_parallel_decoding_in_every_mode(model, mode):
  cfg, params = model
  options = dict(l_dense=2, dense_tail=0, prompt_block_size=16) if mode == "focus" else {}
  tokens, state = decode(cfg, params, mode, threshold=0.2, **options)
  assert not (tokens == MASK).any()
  assert int(state.num_steps) < GEN, "threshold decoding should take fewer steps than tokens"


def test_one_compile_per_configuration(model, caplog):
  """The whole generation (all blocks, refresh and sparse steps) is one compiled program, and new
  prompts of the same shape reuse it."""
  cfg, params = model
  options = dict(l_dense=2, dense_tail=0, prompt_block_size=16, n_sink=4)
  generate_tokens.clear_cache()
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    decode(cfg, params, "focus", seed=1, **options)
    first = [r for r in caplog.records if "XLA compilation of jit(generate_tokens)" in r.getMessage()]
    caplog.clear()
    decode(cfg, params, "focus", seed=2, **options)
    second = [r for r in caplog.records
              if "XLA compilation of jit(generate_tokens)" in r.getMessage()]
  assert len(first) == 1, [r.getMessage() for r in first]
  assert not second, [r.getMessage() for r in second]


def test_bad_focus_options_fail_early():
  cfg = tiny("llada")
  with pytest.raises(ValueError, match="alpha"):
    make_denoiser(cfg, "focus", alpha=0.0)
  with pytest.raises(ValueError, match="prompt_block_size"):
    make_denoiser(cfg, "focus", prompt_block_size=12)
  with pytest.raises(ValueError, match="unknown decoding mode"):
    make_denoiser(cfg, "sparse")
  with pytest.raises(ValueError, match="'focus' has no knob 'alpah'; its knobs: l_dense"):
    make_denoiser(cfg, "focus", alpah=0.5)
  with pytest.raises(ValueError, match="'dual_cache' has no knob 'alpha'.*refresh_every_step"):
    make_denoiser(cfg, "dual_cache", alpha=0.5)
  with pytest.raises(ValueError, match="gen_length must be >= 1"):
    llada_rule(cfg, steps=8, gen_length=0, block_length=8)


def test_focus_without_a_sparse_layer_says_so(caplog):
  from focus_jax.focus import config as focus_config  # pylint: disable=g-import-not-at-top
  focus_config.warn_all_dense.cache_clear()
  with caplog.at_level(logging.WARNING):
    make_denoiser(tiny("llada"), "focus")  # 6 dense layers (the default) of 4
    make_denoiser(tiny("llada"), "focus")  # said once
  assert caplog.text.count("leave none of the model's 4 layers sparse") == 1
  assert "lower l_dense below 4" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    make_denoiser(tiny("dream"), "focus", l_dense=0, dense_tail=4, n_sink=0)
  assert "lower dense_tail below 4" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    make_denoiser(tiny("llada"), "focus", l_dense=2)
  assert "sparse" not in caplog.text


@pytest.mark.parametrize("impl", ["xla_gather", "pallas_gpu", "pallas_tpu"])
def test_all_blocks_kernel_equals_dense_attention_over_cache(impl):
  """What GPU/TPU run for dense layers of cached steps (the split-KV kernel with every block
  selected) is dense attention over the non-pad keys; kernels in interpret mode here."""
  from focus_jax.decoding import cache as kv
  from focus_jax.kernels import dense_attention
  rng = np.random.default_rng(0)
  b, length, prompt_len, hq, hkv, d = 2, 320, 260, 4, 2, 128  # TPU tiles: D = 128, L % 64 = 0
  q = jnp.asarray(rng.normal(size=(b, 8, hq, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, length, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, length, hkv, d)), jnp.float32)
  prompt_start = jnp.asarray([0, 77], jnp.int32)
  key_valid = jnp.arange(length)[None, :] >= prompt_start[:, None]
  want = dense_attention.xla_attention(q, k, v, key_valid=key_valid)
  if impl == "xla_gather":
    got = kv.all_blocks_attention(q, k, v, prompt_start, prompt_len, implementation=impl)
  else:
    from focus_jax.kernels import sparse_attention as sa
    nb = -(-prompt_len // kv.DECODE_BLOCK)
    got = sa.block_sparse_attention(
        q, k, v, jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, 1, nb)),
        jnp.full((b, 1), nb, jnp.int32), prompt_start, jnp.full((b,), prompt_len, jnp.int32),
        jnp.full((b,), length, jnp.int32), block_size=kv.DECODE_BLOCK, implementation=impl,
        interpret=True, max_response_len=length - prompt_len)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["dual_cache", "focus"])
@pytest.mark.parametrize("economy,refreshes", [
    ({"refresh_every_blocks": 2}, 1),  # 2 blocks: only block 0 refreshes
    ({"reuse_prompt_kv": True}, 2),  # block 1 refreshes only the response region
])
def test_refresh_economy_options(model, mode, economy, refreshes):
  cfg, params = model
  focus = dict(l_dense=2, dense_tail=0, prompt_block_size=16, diagnostics=True)
  options = dict(focus if mode == "focus" else {}, **economy)
  tokens, state = decode(cfg, params, mode, **options)
  assert not (tokens == MASK).any()
  if mode == "focus":
    stats = summarize(jax.tree.map(np.asarray, state.stats))
    assert stats["refresh_steps"] == refreshes
  baseline, _ = decode(cfg, params, mode, **(focus if mode == "focus" else {}))
  assert (tokens != baseline).any(), "skipping refreshes should be an approximation here"


def refresh_against_exact(cfg, params, mask, policy):
  """The first block's refresh under `policy` and exactly: (relative L2 distance of the window
  logits, the canvas, the policy's cache, the exact cache)."""
  tokens, _ = prompts()
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  cache = kv.KVCache.empty(cfg, 2, canvas.length)
  start = jnp.int32(PROMPT)
  exact, exact_cache = kv.refresh(cfg, params, canvas, cache, start, BLOCK, "xla")
  approx, approx_cache = kv.refresh(cfg, params, canvas, cache, start, BLOCK, "xla", policy)
  rel = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
  return rel, canvas, approx_cache, exact_cache


def test_fp8_refresh_attention(model):
  """The refresh's attention in fp8 (the XLA emulation here): close to the exact refresh, not
  equal to it; every block decodes. Row 0 has 3 pads, which fp8 neutralises instead of masking;
  a row with 37 (28% of it) is refused before anything compiles."""
  cfg, params = model
  mask = prompts()[1].at[0, 3:].set(True)
  rel, canvas, fp8_cache, exact_cache = refresh_against_exact(
      cfg, params, mask, kv.RefreshPolicy(fp8_attention=True))
  assert 1e-4 < rel < 0.1, rel
  real = canvas.attention_mask[:, :, None, None]  # pad rows hold no meaning (Dream: any values)
  k_fp8, k_exact = (jnp.where(real, c.k[-1], 0) for c in (fp8_cache, exact_cache))
  k_rel = float(jnp.linalg.norm(k_fp8 - k_exact) / jnp.linalg.norm(k_exact))
  assert 0 < k_rel < 0.1, k_rel  # the last layer's K comes from fp8-attended layers below
  out, _ = decode(cfg, params, "dual_cache", refresh_fp8_attention=True, attention_impl="xla")
  assert not (out == MASK).any()
  pipeline.check_fp8_pads(np.asarray(mask), GEN)  # 3 of 132: accepted
  with pytest.raises(ValueError, match="37 pad tokens"):
    pipeline.generate_ids(pipeline.Model(cfg, params, None), *map(np.asarray, prompts()),
                          mode="dual_cache", gen_length=GEN, block_length=BLOCK,
                          decoding_options={"refresh_fp8_attention": True})
  with pytest.raises(ValueError, match="fp8_attention"):
    make_denoiser(cfg, "focus", refresh_fp8_attention=True, refresh_prompt_window=32)


def test_fp8_refresh_matmul(model):
  """The refresh's projections in fp8: the window's logits move by e4m3's few percent and every
  block decodes; with fp8 attention too. (This random model is chaotic: fp8 GEMMs change a
  quarter to half of its dual-cache tokens, and Dream's sampler then even picks the mask id.)"""
  cfg, params = model
  rel, *_ = refresh_against_exact(cfg, params, prompts()[1], kv.RefreshPolicy(fp8_matmul=True))
  assert 1e-4 < rel < 0.1, rel
  out, _ = decode(cfg, params, "focus", l_dense=2, dense_tail=0, prompt_block_size=16,
                  refresh_fp8_matmul=True)
  assert not (out == MASK).any()
  exact_tokens, _ = decode(cfg, params, "dual_cache")
  out, state = decode(cfg, params, "dual_cache", refresh_fp8_matmul=True,
                      refresh_fp8_attention=True, attention_impl="xla")
  assert not (out == MASK).any() and (out != exact_tokens).any()
  # (a block whose mask-id prediction outlives its schedule takes one step more)
  assert GEN <= int(state.num_steps) <= GEN + GEN // BLOCK


def test_fp8_weights_are_made_once_before_the_loop(model):
  """With fp8 projections the denoiser adds the e4m3 weights to the params before its loop, and
  a refresh that reads them equals one that quantises every weight itself (same scales, same
  e4m3 values); other policies leave the params alone."""
  cfg, params = model
  policy = kv.RefreshPolicy(fp8_matmul=True)
  denoiser = make_denoiser(cfg, "dual_cache", refresh_fp8_matmul=True)
  prepared = denoiser.prepare_params(params)
  weights = prepared[kv.REFRESH_FP8_WEIGHTS]
  assert set(weights) == {f"layers_{i}" for i in range(cfg.n_layers)}
  w8t = weights["layers_0"]["down_proj"]["kernel"]
  assert w8t.dtype == jnp.float8_e4m3fn and w8t.shape == (cfg.d_model, cfg.mlp_hidden)
  assert make_denoiser(cfg, "focus").prepare_params(params) is params
  tokens, mask = prompts()
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  cache = kv.KVCache.empty(cfg, 2, canvas.length)
  run = lambda p: kv.refresh(cfg, p, canvas, cache, jnp.int32(PROMPT), BLOCK, "xla", policy)[0]
  np.testing.assert_array_equal(np.asarray(run(prepared)), np.asarray(run(params)))
  # ... and the refresh does read them: other e4m3 weights give other logits.
  doubled = jax.tree.map(lambda x: x * 2 if x.ndim == 0 else x, weights)
  assert not np.allclose(np.asarray(run({**params, kv.REFRESH_FP8_WEIGHTS: doubled})),
                         np.asarray(run(params)))


def _eqns(jaxpr, inside_loop=False):
  """(equation, whether it runs inside a while loop) for every equation, nested ones too."""
  for eqn in jaxpr.eqns:
    yield eqn, inside_loop
    loop = inside_loop or eqn.primitive.name == "while"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub, loop)


def test_fp8_weights_are_quantised_outside_the_denoising_loop(model):
  """The structure that keeps XLA from hoisting weight copies out of the loop (the 45 GiB the
  H100 could not hold, README): every projection weight becomes e4m3 once, before the loop;
  inside it only activations are quantised."""
  cfg, params = model
  tokens, mask = prompts()
  shapes = {leaf.shape for name, leaf in jax.tree_util.tree_leaves_with_path(params)
            if "layers_" in jax.tree_util.keystr(name) and leaf.ndim == 2}
  jaxpr = jax.make_jaxpr(lambda p: generate_tokens(
      p, tokens, mask, jax.random.key(0), config=cfg, rule=rule_for(cfg, None),
      denoiser=make_denoiser(cfg, "dual_cache", refresh_fp8_matmul=True), gen_length=GEN,
      block_length=BLOCK))(params).jaxpr
  to_e4m3 = [(eqn, inside) for eqn, inside in _eqns(jaxpr)
             if eqn.primitive.name == "convert_element_type"
             and eqn.params["new_dtype"] == jnp.float8_e4m3fn]
  weights = [inside for eqn, inside in to_e4m3 if eqn.invars[0].aval.shape in shapes]
  assert len(weights) == 7 * cfg.n_layers and not any(weights), weights
  assert any(inside for eqn, inside in to_e4m3), "activations are quantised in the loop"


def test_prefix_cache_steps_rewrite_the_rows_from_the_block_on(model):
  """A prefix-cache step rewrites the K/V of every row from its block on (Dream: from the row
  before it, whose query gives the block's first logit), the canvas's last included, and no
  row before. Dream's shifted queries used to stop one row short of the canvas's end."""
  from focus_jax import step_timing  # pylint: disable=g-import-not-at-top
  cfg, params = model
  tokens, mask = prompts()
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  denoiser = make_denoiser(cfg, "prefix_cache")
  entry = step_timing.entry_context(canvas, 2)
  last = entry.replace(block_index=jnp.int32(1), block_start=jnp.int32(PROMPT + BLOCK))
  _, _, before = denoiser.window_logits(params, canvas, denoiser.init_state(params, canvas),
                                        last)  # the last block's entry: a full refresh
  decoded = canvas.replace(tokens=canvas.tokens.at[:, -3:].set(7))
  _, _, after = denoiser.window_logits(params, decoded, before, last.replace(block_entry=False))
  changed = np.any(np.asarray(after.k[-1] != before.k[-1]), axis=(2, 3))
  first = PROMPT + BLOCK - (1 if cfg.logit_shift else 0)
  np.testing.assert_array_equal(changed[:, first:], True)
  np.testing.assert_array_equal(changed[:, :first], False)


@pytest.mark.parametrize("sparse_impl", ["auto", "xla_gather"])
def test_split_kv_kernel_is_named_for_every_call_of_a_step(sparse_impl, monkeypatch):
  """Focus's `sparse_impl` names the kernel of its dense layers' calls over the whole cache
  (the sink layer's included), not only of its sparse layers, and the caches' `split_kv_impl`
  theirs: on a GPU, `pallas_gpu` then runs Triton's kernel everywhere, whatever "auto" would
  pick (the CPU runs these calls in XLA, so the GPU/TPU path is forced here)."""
  from focus_jax import step_timing  # pylint: disable=g-import-not-at-top
  seen, all_blocks = [], kv.all_blocks_attention

  def recording(*args, implementation="auto", **kwargs):
    seen.append(implementation)
    return all_blocks(*args, implementation="xla_gather", **kwargs)

  monkeypatch.setattr(kv, "uses_split_kv", lambda k, impl="auto": impl == "auto")
  monkeypatch.setattr(kv, "all_blocks_attention", recording)
  jax.clear_caches()
  cfg = tiny("llada")
  params = Transformer(cfg).init_params(jax.random.key(3))
  tokens, mask = prompts()
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  denoiser = make_denoiser(cfg, "focus", l_dense=2, prompt_block_size=16,
                           sparse_impl=sparse_impl)
  entry = step_timing.entry_context(canvas, 2)

  def steps(den):
    """Traces (jitted: one compile, not an op-by-op run) an entry step, then a cached step;
    `seen` holds the cached step's calls."""
    step = jax.jit(lambda p, s, c: den.window_logits(p, canvas, s, c)[2])
    state = step(params, den.init_state(params, canvas), entry)
    seen.clear()
    step.lower(params, state, entry.replace(block_entry=False))

  steps(denoiser)
  assert seen == [sparse_impl] * 2, seen  # layer 0, and layer 1 (the sinks')
  # The caches name theirs with `split_kv_impl` (every layer's call over the cache).
  steps(make_denoiser(cfg, "dual_cache", split_kv_impl=sparse_impl))
  assert seen == [sparse_impl] * cfg.n_layers, seen


def test_dual_cache_steps_rewrite_the_whole_block(model):
  """A dual-cache step rewrites the K/V of every row of its block (Dream: and of the row before
  it, whose query gives the block's first logit) and of no row outside. Dream's shifted queries
  used to stop one row short, so a decoded last token kept its entry-step K/V to the block's
  end, the mask token's."""
  from focus_jax import step_timing  # pylint: disable=g-import-not-at-top
  cfg, params = model
  tokens, mask = prompts()
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  denoiser = make_denoiser(cfg, "dual_cache")
  entry = step_timing.entry_context(canvas, 2)  # block 0's entry: a full refresh
  _, _, before = denoiser.window_logits(params, canvas, denoiser.init_state(params, canvas),
                                        entry)
  decoded = canvas.replace(tokens=canvas.tokens.at[:, PROMPT + BLOCK - 3:PROMPT + BLOCK].set(7))
  _, _, after = denoiser.window_logits(params, decoded, before, entry.replace(block_entry=False))
  changed = np.any(np.asarray(after.k[-1] != before.k[-1]), axis=(2, 3))
  first = PROMPT - (1 if cfg.logit_shift else 0)
  np.testing.assert_array_equal(changed[:, first:PROMPT + BLOCK], True)
  np.testing.assert_array_equal(changed[:, :first], False)
  np.testing.assert_array_equal(changed[:, PROMPT + BLOCK:], False)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_block_zero_always_enters_with_a_full_refresh(every):
  """The response refresh drops block 0's logit rows (`kv.response_refresh`), and the later
  steps need a cache: whatever the cadence, block 0 is a full refresh, later entries a
  response refresh on the cadence and a cached step between."""
  policy = kv.RefreshPolicy(every_blocks=every, reuse_prompt_kv=True)
  kinds = [int(kv.entry_kind(policy, jnp.int32(block))) for block in range(6)]
  assert kinds == [kv.FULL_REFRESH] + [kv.RESPONSE_REFRESH if block % every == 0
                                       else kv.CACHED_STEP for block in range(1, 6)]


def test_refresh_economy_rejects_bad_cadence():
  with pytest.raises(ValueError, match="every_blocks"):
    make_denoiser(tiny("llada"), "dual_cache", refresh_every_blocks=0)


def test_caches_and_params_follow_the_mesh():
  """On a 2-device mesh (model axis) parameters and every KV cache buffer are sharded over the
  KV heads, and Focus still decodes (a subprocess, for the forced host device count)."""
  import subprocess
  import sys
  code = """
import jax, jax.numpy as jnp, numpy as np
assert jax.device_count() == 2, jax.devices()
import focus_jax
from focus_jax import pipeline, sharding
from focus_jax.decoding import make_denoiser
from focus_jax.sampling import loop
mesh = sharding.make_mesh(data=1, model=2)
model = focus_jax.load("tiny", mesh=mesh)
kernel = model.params["layers_0"]["k_proj"]["kernel"]
assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 2, kernel.sharding
canvas = loop.make_canvas(jnp.ones((1, 128), jnp.int32), None, 32, 16, model.config.mask_token_id)
d = make_denoiser(model.config, "focus", cache_sharding=sharding.kv_sharding(mesh))
state = jax.jit(lambda: d.init_state(model.params, canvas))()
for buf in state.cache.k + state.cache.v:
  assert buf.sharding.is_equivalent_to(sharding.kv_sharding(mesh), 4), buf.sharding
  assert buf.addressable_shards[0].data.shape[2] == model.config.n_kv_heads // 2
out = pipeline.generate_ids(model, np.ones((1, 128), np.int32), np.ones((1, 128), bool),
                            mode="focus", gen_length=32, steps=32, block_length=16,
                            decoding_options={"l_dense": 2, "prompt_block_size": 16})
assert out.tokens.shape == (1, 32) and not (out.tokens == model.config.mask_token_id).any()
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_env(2),
                       timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_forward_returns_each_layers_kv_as_the_refresh_stores_it(model):
  """`SelfAttention(return_kv=True)` hands back every layer's K/V; a cache refresh writes the
  same values in place."""
  from focus_jax.decoding import cache as kv
  from focus_jax.models import SelfAttention, family
  from focus_jax.sampling import loop
  cfg, params = model
  tokens, mask = prompts(4)
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  positions, key_valid, query_valid = family.positions_and_masks(cfg, canvas.attention_mask,
                                                                 canvas.tokens.shape)
  _, layer_kv, _ = Transformer(cfg).apply(
      {"params": params}, canvas.tokens, positions,
      SelfAttention(key_valid=key_valid, query_valid=query_valid, return_kv=True))
  logits, cache = kv.refresh(cfg, params, canvas, kv.KVCache.empty(cfg, 2, canvas.length),
                             jnp.int32(PROMPT), BLOCK)
  assert len(layer_kv) == cfg.n_layers
  for (k, v), kc, vc in zip(layer_kv, cache.k, cache.v):
    np.testing.assert_allclose(np.asarray(kc), np.asarray(k), atol=1e-6)
    np.testing.assert_allclose(np.asarray(vc), np.asarray(v), atol=1e-6)
  full = family.forward_logits(cfg, params, canvas.tokens, canvas.attention_mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, PROMPT:PROMPT + BLOCK]),
                             atol=1e-4)


def test_dream_config_gets_its_dense_tail():
  """Dream-7B's dense final layers come from the family default, also through the run config."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "dream_7b.py")
  spec = importlib.util.spec_from_file_location("dream_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  knobs = {k: v for k, v in mod.get_config().decoding.focus.items() if v is not None}
  assert make_denoiser(tiny("dream"), "focus", **knobs).focus.dense_tail == 4
  assert make_denoiser(tiny("llada"), "focus", **knobs).focus.dense_tail == 0


def test_compile_generation_hands_the_configs_xla_options_to_the_compiler(model, monkeypatch):
  """`compile_generation` compiles with `compiler_options(config, batch)`: the same tokens as
  the plain jitted call with a real option, and an option XLA does not know fails the compile
  (so the options do reach it)."""
  from focus_jax.sampling import compile_generation, generate as gen_module  # pylint: disable=g-import-not-at-top
  cfg, params = model
  prompt, mask = prompts()
  kwargs = dict(config=cfg, rule=rule_for(cfg), denoiser=make_denoiser(cfg, "dual_cache"),
                gen_length=GEN, block_length=BLOCK)
  args = (params, prompt, mask, jax.random.key(0))
  want = generate_tokens(*args, **kwargs).tokens
  monkeypatch.setattr(gen_module, "compiler_options",
                      lambda c, b: ({"xla_gpu_dot_merger_threshold_mb": 128}
                                    if c is cfg and b == prompt.shape[0] else {}))
  np.testing.assert_array_equal(compile_generation(*args, **kwargs)(*args).tokens, want)
  monkeypatch.setattr(gen_module, "compiler_options", lambda c, b: {"xla_no_such_option": 1})
  with pytest.raises(Exception, match="xla_no_such_option"):
    compile_generation(*args, **kwargs)


def test_fused_qkv_refresh_and_cached_step_match(model):
  """One q|k|v weight per layer (`ModelConfig.fused_qkv`) is a layout, not an approximation: a
  refresh's logits and cache, and a cached step's hidden states over that cache, match the
  three-weight model's in float32 (GQA here)."""
  cfg, params = model
  fused_cfg = cfg.replace(fused_qkv=True)
  fused = param_map.fuse_qkv(fused_cfg, params)
  tokens, mask = prompts()
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  start = jnp.int32(PROMPT)
  slots = jnp.asarray([[3, 0, 7, 12], [15, 1, 2, 9]], jnp.int32)
  queries = kv.QuerySet(start + slots, jnp.ones((2, 4), bool), jnp.ones((2, 4), bool))

  def run(c, p):
    logits, cache = kv.refresh(c, p, canvas, kv.KVCache.empty(c, 2, canvas.length), start, BLOCK,
                               "xla")
    hidden, _, _ = kv.cached_forward(c, p, canvas, cache, queries, "xla")
    return logits, cache.k[-1], cache.v[0], hidden

  for got, want in zip(run(fused_cfg, fused), run(cfg, params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["dual_cache", "focus"])
def test_response_refresh_rewrites_every_response_row(model, mode):
  """A later block's entry under reuse_prompt_kv rewrites the K/V of every response row and of
  no prompt row. Dream's shifted queries (j - 1 for the logits of j) used to leave the canvas's
  last row as block 0's refresh wrote it, and rewrite the last prompt row."""
  from focus_jax import step_timing  # pylint: disable=g-import-not-at-top
  cfg, params = model
  tokens, mask = prompts()
  canvas = loop.make_canvas(tokens, mask, GEN, BLOCK, MASK)
  options = dict(l_dense=2, dense_tail=0, prompt_block_size=16) if mode == "focus" else {}
  denoiser = make_denoiser(cfg, mode, reuse_prompt_kv=True, **options)
  entry = step_timing.entry_context(canvas, 2)  # block 0: a full refresh
  _, _, state = denoiser.window_logits(params, canvas, denoiser.init_state(params, canvas), entry)
  decoded = canvas.replace(tokens=canvas.tokens.at[:, PROMPT:PROMPT + BLOCK].set(7))
  later = entry.replace(block_index=jnp.int32(1), block_start=jnp.int32(PROMPT + BLOCK))
  _, _, after = denoiser.window_logits(params, decoded, state, later)
  before, after = (getattr(s, "cache", s) for s in (state, after))
  # The last layer's keys of a response row depend on the decoded tokens through attention.
  changed = np.any(np.asarray(after.k[-1] != before.k[-1]), axis=(2, 3))
  np.testing.assert_array_equal(changed[:, PROMPT:], True)
  np.testing.assert_array_equal(changed[:, :PROMPT], False)


@pytest.mark.parametrize("mode,options", [
    ("dual_cache", {}), ("prefix_cache", {}), ("focus", {}), ("focus", {"reuse_prompt_kv": True}),
    ("focus", {"whole_block_active": True})])
def test_cached_steps_write_inside_their_declared_window(model, mode, options, monkeypatch):
  """Every cached step's K/V write goes through `write_rows_in_window`, and what it stores equals
  the scatter of the same slots: the windows the denoisers declare hold every position they
  write (Dream's shift, the response refresh, padded Focus slots). Decoded tokens alone cannot
  show this: the tiny model's tokens barely depend on the cache."""
  window_write, checks = kv.write_rows_in_window, []

  def checked(buffer, positions, values, write, start, window):
    got = window_write(buffer, positions, values, write, start, window)
    want = kv.write_rows(buffer, positions, values.astype(buffer.dtype), write)
    jax.debug.callback(lambda same: checks.append(bool(same)), jnp.array_equal(got, want))
    return got

  monkeypatch.setattr(kv, "write_rows_in_window", checked)
  jax.clear_caches()  # trace afresh, through the patched function
  cfg, params = model
  decode(cfg, params, mode, **options)
  assert checks and all(checks), f"{checks.count(False)} of {len(checks)} writes differ"


def test_fuse_qkv_refuses_the_wrong_config_or_layout(model):
  cfg, params = model
  with pytest.raises(ValueError, match="fused_qkv=True"):
    param_map.fuse_qkv(cfg, params)
  fused = param_map.fuse_qkv(cfg.replace(fused_qkv=True), params)
  with pytest.raises(ValueError, match="fused already"):
    param_map.fuse_qkv(cfg.replace(fused_qkv=True), fused)


@pytest.mark.parametrize("start,window", [(10, 8), (0, 8), (27, 8), (5, 32), (-3, 8)])
def test_window_cache_write_equals_the_scatter(start, window):
  """`write_rows_in_window` (a cached step's K/V write into its block) stores exactly what the
  scatter stores: unordered slots, padding slots (write False), slots at the window's ends, a
  window past the buffer's end or start (clamped), and a bf16 buffer fed float32 values."""
  rng = np.random.default_rng(start + 100 * window)
  b, length = 3, 32
  buffer = jnp.asarray(rng.standard_normal((b, length, 2, 4)), jnp.bfloat16)
  lo, hi = max(start, 0), min(start + window, length)
  a = min(6, hi - lo)
  positions = jnp.asarray(np.stack([rng.choice(np.arange(lo, hi), a, replace=False)
                                    for _ in range(b)]), jnp.int32)
  write = jnp.asarray(rng.random((b, a)) < 0.7)
  values = jnp.asarray(rng.standard_normal((b, a, 2, 4)), jnp.float32)
  want = kv.write_rows(buffer, positions, values.astype(jnp.bfloat16), write)
  got = kv.write_rows_in_window(buffer, positions, values, write, jnp.int32(start), window)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert not np.array_equal(np.asarray(got, np.float32), np.asarray(buffer, np.float32))


def test_a_block_entered_by_a_cached_step_decodes_every_position(model):
  """A block entered without a refresh starts with no confidences (-inf): its masked positions
  must still outrank decoded ones for I_focus, or a narrow I_active (rho 2, window 3) runs only
  decoded positions once the first ones are committed, and the block never finishes."""
  cfg, params = model
  focus = dict(l_dense=2, dense_tail=0, n_sink=8, prompt_block_size=16, rho=2, window=3,
               attention_impl="xla")
  tokens, state = decode(cfg, params, "focus", refresh_every_blocks=2, **focus)
  assert not (tokens == MASK).any(), (tokens == MASK).sum(1)
  assert int(state.num_steps) == GEN  # one token a step, as scheduled


class _PredictsTheMaskOnce:
  """A rule whose model predicts the mask token at each block's first step (a real model may):
  that position stays masked past the block's schedule."""

  def __init__(self, rule):
    self.rule = rule

  def __getattr__(self, name):
    return getattr(self.rule, name)

  def apply(self, rng, logits, tokens, masked, schedule, step):
    logits = jnp.where(step == 0, logits.at[..., MASK].set(1e4), logits)
    return self.rule.apply(rng, logits, tokens, masked, schedule, step)


@pytest.mark.parametrize("mode", ["dual_cache", "focus"])
def test_a_predicted_mask_token_does_not_stall_later_blocks(model, mode):
  """Past the schedule the mask token is not predicted and every mask left is planned, so the
  block ends at most one step later and leaves later blocks their steps. (Before, with more
  steps than tokens, LLaDA's schedule ended on a count of 0: Focus ran no position and spent the
  whole step budget, and the dual cache ran out of steps one short.)"""
  cfg, params = model
  tokens, mask = prompts()
  steps = 4 * GEN  # 64 steps a block of 16: most scheduled counts are 0
  rule = (llada_rule(cfg, steps=steps, gen_length=GEN, block_length=BLOCK)
          if cfg.family == "llada" else
          dream_rule(steps=steps, gen_length=GEN, block_length=BLOCK, alg="maskgit_plus"))
  options = dict(l_dense=2, dense_tail=0, prompt_block_size=16) if mode == "focus" else {}
  state = generate_tokens(params, tokens, mask, jax.random.key(0), config=cfg,
                          rule=_PredictsTheMaskOnce(rule),
                          denoiser=make_denoiser(cfg, mode, **options), gen_length=GEN,
                          block_length=BLOCK)
  assert not (np.asarray(state.tokens[:, PROMPT:]) == MASK).any()
  assert steps <= int(state.num_steps) <= steps + GEN // BLOCK  # a schedule and one step more
