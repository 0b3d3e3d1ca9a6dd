"""Samplers against plain PyTorch re-statements of the reference loops (LLaDA's `generate`,
Dream's `_sample`), token for token, with greedy fp32 decoding on tiny random models.

The reference loops below are written out in the test, step by step as in the public code, and
call the same Flax model for logits (outside any loop); our sampler is the jitted while_loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from focus_jax.decoding import VanillaDenoiser
from focus_jax.models import Transformer, forward_logits
from focus_jax.models import config as C
from focus_jax.sampling import dream_rule, generate_tokens, llada_rule
from focus_jax.sampling.common import torch_linspace_f32

MASK, EOS, EOT = 120, 1, 2
VOCAB = 128


def tiny(family: str):
  make = C.llada_family if family == "llada" else C.dream_family
  return make(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
              n_kv_heads=4 if family == "llada" else 2, head_dim=16, mlp_hidden=128,
              rms_eps=1e-5, rope_theta=10000.0, max_sequence_length=512, mask_token_id=MASK,
              eos_token_id=EOS, eot_token_id=EOT)


@pytest.fixture(scope="module")
def llada():
  cfg = tiny("llada")
  params = Transformer(cfg).init_params(jax.random.key(0))
  # Scale the head so logits are O(1): confidences then spread, and ranks are well separated.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20.0
  return cfg, params


@pytest.fixture(scope="module")
def dream():
  cfg = tiny("dream")
  params = Transformer(cfg).init_params(jax.random.key(1))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20.0
  return cfg, params


def padded_prompts(rng_seed: int = 0, batch: int = 2, length: int = 10):
  rng = np.random.default_rng(rng_seed)
  prompt = rng.integers(3, 110, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  for row in range(batch):
    pads = (2 * row + 1) % length
    prompt[row, :pads] = EOS  # pad id (as LLaDA: pad == eos)
    mask[row, :pads] = False
  return prompt, mask


def model_fn(cfg, params):
  fwd = jax.jit(lambda toks, m: forward_logits(cfg, params, toks, m))

  def call(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    m = None if attention_mask is None else jnp.asarray(attention_mask.numpy().astype(bool))
    return torch.from_numpy(np.array(fwd(jnp.asarray(x.numpy().astype(np.int32)), m)))

  return call


# ----------------------------------------------------------------------------------------------
# Reference re-statements (greedy paths; as in the public code).
# ----------------------------------------------------------------------------------------------
def ref_llada_generate(model, prompt, attention_mask, steps, gen_length, block_length,
                       cfg_scale=0.0, mask_id=MASK, logits_eos_inf=False,
                       confidence_eos_eot_inf=False, threshold=None):
  x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
  x[:, :prompt.shape[1]] = prompt.clone()
  if attention_mask is not None:
    attention_mask = torch.cat(
        [attention_mask, torch.ones((prompt.shape[0], gen_length), dtype=attention_mask.dtype)],
        dim=-1)
  prompt_index = x != mask_id
  num_blocks = gen_length // block_length
  steps = steps // num_blocks
  for num_block in range(num_blocks):
    lo = prompt.shape[1] + num_block * block_length
    hi = lo + block_length
    block_mask_index = x[:, lo:hi] == mask_id
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    num_transfer = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
    for r in range(mask_num.size(0)):
      num_transfer[r, :(mask_num % steps)[r]] += 1
    i = 0
    while (x[:, lo:hi] == mask_id).any():
      mask_index = x == mask_id
      if cfg_scale > 0.0:
        un_x = x.clone()
        un_x[prompt_index] = mask_id
        x_ = torch.cat([x, un_x], dim=0)
        am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        logits = model(x_, am)
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
      else:
        logits = model(x, attention_mask)
      if logits_eos_inf:
        logits[:, :, EOS] = -torch.inf
      logits_with_noise = logits  # temperature 0
      x0 = torch.argmax(logits_with_noise, dim=-1)
      if confidence_eos_eot_inf:
        logits_with_noise[:, :, EOS] = logits[:, :, EOT] = -torch.inf
      p = F.softmax(logits, dim=-1)
      x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
      x0_p[:, hi:] = -np.inf
      x0 = torch.where(mask_index, x0, x)
      confidence = torch.where(mask_index, x0_p, -np.inf)
      transfer_index = torch.zeros_like(x0, dtype=torch.bool)
      for j in range(confidence.shape[0]):
        k = int(mask_index[j, lo:hi].sum()) if threshold is not None else num_transfer[j, i]
        _, select_index = torch.topk(confidence[j], k=k)
        transfer_index[j, select_index] = True
        if threshold is not None:
          for kk in range(1, k):
            if confidence[j, select_index[kk]] < threshold:
              transfer_index[j, select_index[kk]] = False
      x[transfer_index] = x0[transfer_index]
      i += 1
  return x


def ref_dream_generate(model, input_ids, attention_mask, steps, gen_length, alg,
                       block_length=None, eps=1e-3, mask_token_id=MASK):
  """Dream's `_sample` (greedy, alg_temp None) run per block of `block_length`."""
  block_length = block_length or gen_length
  max_length = input_ids.shape[1] + gen_length
  x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
  am = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1)
  num_blocks = gen_length // block_length
  spb = steps // num_blocks
  timesteps = torch.linspace(1, eps, spb + 1)
  for blk in range(num_blocks):
    lo = input_ids.shape[1] + blk * block_length
    hi = lo + block_length
    for i in range(spb):
      mask_index = x == mask_token_id
      mask_index[:, hi:] = False
      logits = model(x, am)  # our forward already applies Dream's shift
      mask_logits = logits[mask_index]
      t, s = timesteps[i], timesteps[i + 1]
      probs = torch.softmax(mask_logits, dim=-1)
      confidence, x0 = probs.max(dim=-1)
      if alg == "topk_margin":
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
      elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
      num_mask_token = mask_index.sum() / mask_index.shape[0]
      n = int(num_mask_token * (1 - s / t)) if i < spb - 1 else int(num_mask_token)
      full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
      full_confidence[mask_index] = confidence
      if n > 0:
        _, transfer_index = torch.topk(full_confidence, n)
        x_ = torch.zeros_like(x) + mask_token_id
        x_[mask_index] = x0.clone()
        rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
        x[rows, transfer_index] = x_[rows, transfer_index]
  return x


def ours(cfg, params, prompt, mask, rule, gen_length, block_length, cfg_scale=0.0, seed=0):
  state = generate_tokens(params, jnp.asarray(prompt), None if mask is None else jnp.asarray(mask),
                          jax.random.key(seed), config=cfg, rule=rule,
                          denoiser=VanillaDenoiser(cfg), gen_length=gen_length,
                          block_length=block_length, cfg_scale=cfg_scale)
  return np.asarray(state.tokens), int(state.num_steps)


# ----------------------------------------------------------------------------------------------
def test_torch_linspace_matches_torch():
  for n in (2, 3, 9, 17, 65, 257):
    np.testing.assert_array_equal(torch_linspace_f32(1.0, 1e-3, n),
                                  torch.linspace(1, 1e-3, n).numpy())


@pytest.mark.parametrize("steps,gen,block", [(16, 32, 8), (8, 16, 16), (32, 16, 8)])
def test_llada_greedy_matches_reference_padded_batch(llada, steps, gen, block):
  cfg, params = llada
  prompt, mask = padded_prompts(0)
  ref = ref_llada_generate(model_fn(cfg, params), torch.from_numpy(prompt).long(),
                           torch.from_numpy(mask).long(), steps, gen, block)
  rule = llada_rule(cfg, steps=steps, gen_length=gen, block_length=block)
  got, _ = ours(cfg, params, prompt, mask, rule, gen, block)
  np.testing.assert_array_equal(got, ref.numpy())
  assert not (got == MASK).any()


def test_llada_cfg_matches_reference(llada):
  cfg, params = llada
  prompt, mask = padded_prompts(1)
  ref = ref_llada_generate(model_fn(cfg, params), torch.from_numpy(prompt).long(),
                           torch.from_numpy(mask).long(), 8, 16, 8, cfg_scale=1.5)
  rule = llada_rule(cfg, steps=8, gen_length=16, block_length=8)
  got, _ = ours(cfg, params, prompt, mask, rule, 16, 8, cfg_scale=1.5)
  np.testing.assert_array_equal(got, ref.numpy())
  plain, _ = ours(cfg, params, prompt, mask, rule, 16, 8)
  assert (plain != got).any(), "guidance should change the output of this model"


def test_llada_eos_options_match_reference(llada):
  cfg, params = llada
  prompt, mask = padded_prompts(2)
  rule_plain = llada_rule(cfg, steps=16, gen_length=16, block_length=8)
  plain, _ = ours(cfg, params, prompt, mask, rule_plain, 16, 8)
  # Make eos and eot the favourite predictions (copies of the two most generated tokens, scaled
  # up), so both options have something to act on.
  counts = np.bincount(plain[:, prompt.shape[1]:].ravel(), minlength=VOCAB)
  first, second = np.argsort(-counts)[:2]
  params = jax.tree.map(lambda x: x, params)
  head = params["lm_head"]["kernel"]
  params["lm_head"]["kernel"] = head.at[:, EOS].set(head[:, first] * 1.2).at[:, EOT].set(
      head[:, second] * 1.2)
  fn = model_fn(cfg, params)
  plain, _ = ours(cfg, params, prompt, mask, rule_plain, 16, 8)
  ref = ref_llada_generate(fn, torch.from_numpy(prompt).long(), torch.from_numpy(mask).long(),
                           16, 16, 8, logits_eos_inf=True)
  rule = llada_rule(cfg, steps=16, gen_length=16, block_length=8, logits_eos_inf=True)
  got, _ = ours(cfg, params, prompt, mask, rule, 16, 8)
  np.testing.assert_array_equal(got, ref.numpy())
  assert (got != plain).any(), "logits_eos_inf had no effect on this model"
  assert not (got[:, prompt.shape[1]:] == EOS).any()


def test_llada_confidence_eos_eot_inf_step(llada):
  """One step on crafted logits (a full loop would rank several zero confidences, whose order
  torch.topk leaves undefined): eot predictions get zero confidence and lose their turn, and so
  do eos predictions, since at temperature 0 the reference's noisy logits are its logits."""
  cfg, _ = llada
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 8, VOCAB)).astype(np.float32)
  logits[:, 2, EOT] = 10.0  # position 2 confidently predicts eot
  logits[:, 4, EOS] = 9.0  # position 4 predicts eos, the runner-up
  masked = np.ones((2, 8), bool)
  masked[1, 5] = False
  tokens = np.where(masked, MASK, 9).astype(np.int32)
  for flag in (False, True):
    rule = llada_rule(cfg, steps=8, gen_length=8, block_length=8, confidence_eos_eot_inf=flag)
    schedule = rule.block_schedule(jnp.asarray(masked))
    new, conf = rule.apply(jax.random.key(0), jnp.asarray(logits), jnp.asarray(tokens),
                           jnp.asarray(masked), schedule, jnp.int32(0))
    t = torch.from_numpy(logits.copy())
    x0 = torch.argmax(t, dim=-1)
    if flag:
      noisy = t  # the reference's add_gumbel_noise returns its input at temperature 0
      noisy[:, :, EOS] = t[:, :, EOT] = -torch.inf
    x0_p = torch.gather(F.softmax(t, dim=-1), -1, x0[..., None])[..., 0]
    ref_conf = torch.where(torch.from_numpy(masked), x0_p, -np.inf)
    # ours carries -log(1 - p) (common.certainty): back to p to compare
    np.testing.assert_allclose(-np.expm1(-np.asarray(conf, np.float64)), ref_conf.numpy(),
                               rtol=1e-5)
    committed = np.argwhere(np.asarray(new) != tokens)
    expected = [[r, int(torch.argmax(ref_conf[r]))] for r in range(2)]
    np.testing.assert_array_equal(committed, expected)
    assert (committed[:, 1] == 2).all() != flag
    if flag:  # neither the eot nor the eos position
      assert not np.isin(committed[:, 1], (2, 4)).any()
      assert (np.asarray(conf)[:, [2, 4]] == 0).all()


def test_llada_threshold_parallel_decoding_matches_reference(llada):
  cfg, params = llada
  prompt, mask = padded_prompts(3, batch=1)
  ref = ref_llada_generate(model_fn(cfg, params), torch.from_numpy(prompt).long(),
                           torch.from_numpy(mask).long(), 16, 16, 8, threshold=0.3)
  rule = llada_rule(cfg, steps=16, gen_length=16, block_length=8, threshold=0.3)
  got, num_steps = ours(cfg, params, prompt, mask, rule, 16, 8)
  np.testing.assert_array_equal(got, ref.numpy())
  assert num_steps < 16, "threshold decoding should need fewer steps than tokens here"


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("block", [None, 8])
def test_dream_greedy_matches_reference_padded_batch(dream, alg, block):
  cfg, params = dream
  prompt, mask = padded_prompts(4)
  gen, steps = 16, 8
  ref = ref_dream_generate(model_fn(cfg, params), torch.from_numpy(prompt).long(),
                           torch.from_numpy(mask).long(), steps, gen, alg, block_length=block)
  rule = dream_rule(steps=steps, gen_length=gen, block_length=block, alg=alg)
  got, _ = ours(cfg, params, prompt, mask, rule, gen, block or gen)
  np.testing.assert_array_equal(got, ref.numpy())
  assert not (got == MASK).any()


@pytest.mark.parametrize("make", [
    lambda cfg: ("llada", llada_rule(cfg, steps=8, gen_length=16, block_length=8,
                                     temperature=0.7)),
    lambda cfg: ("llada", llada_rule(cfg, steps=8, gen_length=16, block_length=8,
                                     remasking="random")),
    lambda cfg: ("dream", dream_rule(steps=8, gen_length=16, alg="origin", temperature=0.8)),
    lambda cfg: ("dream", dream_rule(steps=8, gen_length=16, alg="maskgit_plus",
                                     temperature=1.0, top_p=0.9, top_k=20, alg_temp=0.5)),
], ids=["llada-gumbel", "llada-random", "dream-origin", "dream-sampled"])
def test_stochastic_paths_are_seeded(llada, dream, make):
  family, rule = make(tiny("llada"))
  cfg, params = llada if family == "llada" else dream
  prompt, mask = padded_prompts(5)
  a, _ = ours(cfg, params, prompt, mask, rule, 16, rule.block_length if family == "dream" else 8,
              seed=7)
  b, _ = ours(cfg, params, prompt, mask, rule, 16, rule.block_length if family == "dream" else 8,
              seed=7)
  c, _ = ours(cfg, params, prompt, mask, rule, 16, rule.block_length if family == "dream" else 8,
              seed=8)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any(), "a different seed should change a sampled output"
  assert not (a == MASK).any()


def test_top_p_top_k_filters_match_reference():
  from focus_jax.sampling.common import top_k_filter, top_p_filter
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
  t = torch.from_numpy(logits)
  sorted_logits, sorted_indices = torch.sort(t, descending=True)
  cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
  remove = cum > 0.8
  remove[..., 1:] = remove[..., :-1].clone()
  remove[..., 0] = 0
  m = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
  ref_p = t.masked_fill(m, torch.finfo(t.dtype).min)
  np.testing.assert_array_equal(np.asarray(top_p_filter(jnp.asarray(logits), 0.8)), ref_p.numpy())
  ref_k = t.masked_fill(t < torch.topk(t, 7)[0][..., -1, None], torch.finfo(t.dtype).min)
  np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(logits), 7)), ref_k.numpy())


def test_bad_schedules_fail_early(llada):
  cfg, _ = llada
  with pytest.raises(ValueError, match="multiple of block_length"):
    llada_rule(cfg, steps=8, gen_length=20, block_length=8)
  with pytest.raises(ValueError, match="multiple of the number of blocks"):
    llada_rule(cfg, steps=6, gen_length=32, block_length=8)
  with pytest.raises(ValueError, match="remasking"):
    llada_rule(cfg, steps=8, gen_length=16, block_length=8, remasking="lowest")
  with pytest.raises(ValueError, match="alg must be one of"):
    dream_rule(steps=8, gen_length=16, alg="greedy")


@pytest.mark.parametrize("alg", ["entropy", "topk_margin", "maskgit_plus"])
def test_dream_threshold_is_on_the_probability_whatever_the_alg(alg):
  """Fast-dLLM's threshold compares x0's probability: an entropy confidence (<= 0) never reached
  0.9, so "entropy" (Dream's default) committed one token a step."""
  logits = jnp.full((1, 8, 50), -20.0).at[:, :, 7].set(20.0)  # p(x0) ~ 1 everywhere ...
  logits = logits.at[:, 3].set(0.0)  # ... but at one flat position
  masked, tokens = jnp.ones((1, 8), bool), jnp.zeros((1, 8), jnp.int32)
  rule = dream_rule(steps=8, gen_length=8, block_length=8, alg=alg, threshold=0.9)
  new, _ = rule.apply(jax.random.key(0), logits, tokens, masked, rule.block_schedule(masked),
                      jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(new[0] != tokens[0]), np.arange(8) != 3)


@pytest.mark.parametrize("alg", ["entropy", "topk_margin", "maskgit_plus"])
def test_dream_threshold_commits_the_most_probable_when_none_passes(alg):
  """As Fast-dLLM's `confidence_threshold`: with no position over the threshold, the one
  committed is the most probable, even where the alg's own score (here the entropy, or the
  top-2 margin) would rank another first."""
  vocab = 50
  a = np.full(vocab, np.log(0.4 / (vocab - 1)), np.float32)
  a[7] = np.log(0.6)  # p(x0) 0.6 over a flat tail: high entropy, margin ~0.59
  b = np.full(vocab, -30.0, np.float32)
  b[7], b[8] = 0.05, 0.0  # p(x0) ~0.51 against ~0.49: low entropy, margin ~0.02
  logits = jnp.asarray(np.stack([a, b, a, b])[None])
  masked = jnp.asarray([[True, True, False, False]])
  tokens = jnp.zeros((1, 4), jnp.int32)
  rule = dream_rule(steps=4, gen_length=4, block_length=4, alg=alg, threshold=0.9)
  new, conf = rule.apply(jax.random.key(0), logits, tokens, masked, rule.block_schedule(masked),
                         jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(new[0] != tokens[0]), [True, False, False, False])
  np.testing.assert_allclose(np.asarray(conf[0, :2]), [0.6, 0.5125], rtol=1e-3)


def test_gumbel_noise_keeps_the_tail_float32_uniforms_cut():
  """LLaDA's reference draws its Gumbel noise in float64 (up to about 36.7); float32 uniforms
  stop at 15.9, which samples tokens far below the top less often than they should be. Ours
  reach 32.6 at the finest draw, stay finite at the coarsest, and are Gumbel-distributed."""
  from focus_jax.sampling import common
  extremes = jnp.asarray(np.array([[0, 0xFFFFFFFF], [0, 0xFFFFFFFF]], np.uint32))
  noise = -np.log(np.asarray(common.exponential_from_bits(extremes)))
  assert noise[0] > 32.0 and np.isfinite(noise[1]) and noise[1] < -2.5
  bits = jax.random.bits(jax.random.key(0), (2, 200_000), jnp.uint32)
  g = -np.log(np.asarray(common.exponential_from_bits(bits)))
  assert abs(g.mean() - np.euler_gamma) < 0.01 and abs(g.std() - np.pi / np.sqrt(6)) < 0.01
  # Gumbel CDF exp(-exp(-x)) at a few points, within a few standard errors of 200k draws
  for x in (-1.0, 0.0, 1.0, 3.0):
    assert abs((g <= x).mean() - np.exp(-np.exp(-x))) < 0.004


def test_llada_ranks_near_certain_positions_as_float64_does():
  """Two positions whose predictions lead by 20 and 25 nats: float32 probabilities are both
  1.0 and would commit the left one; the reference's float64 ones (LLaDA's, Fast-dLLM's)
  commit the right one, more certain, and so do we. A threshold still passes both."""
  from focus_jax.sampling import common
  logits = np.zeros((1, 2, 3), np.float32)
  logits[0, :, 0] = [20.0, 25.0]
  assert (np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))[0, :, 0] == 1.0).all()
  ref = F.softmax(torch.tensor(logits, dtype=torch.float64), -1)[0, :, 0]
  assert int(ref.argmax()) == 1
  from focus_jax.sampling.llada import LLaDARule
  masked = jnp.ones((1, 2), bool)
  tokens = jnp.full((1, 2), MASK, jnp.int32)
  for threshold, committed in ((None, [False, True]), (0.999, [True, True])):
    rule = LLaDARule(steps_per_block=2, eos_token_id=EOS, eot_token_id=EOT, threshold=threshold)
    new, conf = rule.apply(jax.random.key(0), jnp.asarray(logits), tokens, masked,
                           rule.block_schedule(masked), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(new[0] != tokens[0]), committed)
  # -log(1 - p) = log-odds here: the lead over the two other tokens, logsumexp log 2
  np.testing.assert_allclose(np.asarray(conf[0]), [20.0 - np.log(2), 25.0 - np.log(2)], rtol=1e-6)
  assert float(common.certainty_threshold(0.9)) == pytest.approx(-np.log(0.1))


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.1])
def test_a_threshold_outside_0_1_is_refused(threshold):
  with pytest.raises(ValueError, match="threshold is a probability"):
    llada_rule(tiny("llada"), steps=8, gen_length=8, block_length=8, threshold=threshold)
  with pytest.raises(ValueError, match="threshold is a probability"):
    dream_rule(steps=8, gen_length=8, block_length=8, threshold=threshold)


@pytest.mark.parametrize("steps,block", [(32, 32), (16, 32), (10, 32), (4, 16)])
def test_max_planned_unmask_bounds_every_scheduled_step(steps, block):
  """`max_planned_unmask` (what Focus sizes its relevance queries by) is reached and never
  exceeded while a block's schedule lasts, from any number of masks left at entry."""
  cfg = tiny("llada")
  rules = [llada_rule(cfg, steps=steps, gen_length=block, block_length=block),
           dream_rule(steps=steps, gen_length=block, block_length=block, alg="entropy"),
           llada_rule(cfg, steps=steps, gen_length=block, block_length=block, threshold=0.9),
           dream_rule(steps=steps, gen_length=block, block_length=block, threshold=0.9)]
  for rule in rules:
    bound = rule.max_planned_unmask(block)
    most = 0
    for n_masked in range(block + 1):
      masked = jnp.asarray(np.arange(block) < n_masked)[None, :]
      schedule = rule.block_schedule(masked)
      for step in range(rule.steps_per_block):
        most = max(most, int(rule.planned_unmask(schedule, jnp.int32(step), masked)[0]))
    assert most == bound, (rule, most, bound)
  origin = dream_rule(steps=steps, gen_length=block, block_length=block, alg="origin")
  assert origin.max_planned_unmask(block) == block
