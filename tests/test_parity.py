"""Logit parity of the Flax ports with independent PyTorch oracles, through the real checkpoint path.

Each oracle (transformers' Llama for LLaDA, Qwen2 for Dream; see hf_fixtures.py) is saved in the
family's own HF layout, converted with our converter, loaded, and run with
`focus_jax.models.forward_logits`.

Logit scale: the fixtures give logits of std ~4 and max |logit| ~16 (LOGIT_STD in hf_fixtures);
the test asserts this range so the tolerances below keep their meaning.

- float32: max abs error <= 1e-4 (measured ~6e-6: both sides are fp32 with fp32 accumulation, so
  the difference is summation-order rounding, ~1e-6 relative at this scale).
- bfloat16 weights and activations against the fp32 oracle: bf16 keeps 8 significant bits (unit
  roundoff u = 2^-9 ~ 2e-3); every weight and every intermediate activation is rounded once per
  op, and a few dozen independent roundings along the path of a 2-layer model add up to an RMS
  relative error of a few u (measured ~0.009 = 4.4u). The bound is RMS error <= 2e-2 of the RMS
  logit and max abs error <= 3e-2 of max |logit|, AND no worse than 1.5x what PyTorch's own bf16
  run of the same oracle shows (measured ~0.009 too), so the port is held to the reference's own
  bf16 accuracy rather than to an arbitrary number.
"""

from __future__ import annotations

import copy

import hf_fixtures as hf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from focus_jax.checkpoints_convert import convert_hf_checkpoint, load_checkpoint, load_hf
from focus_jax.models import forward_logits

FAMILIES = ("llada", "dream")
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
  """Per family: (oracle, HF dir, converted fp32 dir, converted bf16 dir)."""
  out = {}
  for family in FAMILIES:
    oracle = hf.llada_oracle() if family == "llada" else hf.dream_oracle()
    root = tmp_path_factory.mktemp(family)
    src = hf.write_hf_checkpoint(oracle, family, str(root / "hf"), dtype=torch.float32)
    fp32 = convert_hf_checkpoint(src, str(root / "fp32"), dtype="float32", progress=False)
    bf16 = convert_hf_checkpoint(src, str(root / "bf16"), dtype="bfloat16", progress=False)
    out[family] = (oracle, src, fp32, bf16)
  return out


def _shape(family: str) -> hf.TinyShape:
  return hf.LLADA_SHAPE if family == "llada" else hf.DREAM_SHAPE


def _batches(family: str):
  """An unpadded batch and a left-padded one (rows with 0, 5 and 11 pads)."""
  shape = _shape(family)
  rng = np.random.default_rng(7)
  plain = rng.integers(0, shape.vocab, size=(2, 24)).astype(np.int32), None
  padded = hf.left_padded_batch(rng, [24, 19, 13], 24, shape.vocab, shape.eos_id)
  return {"plain": plain, "padded": padded}


def _compared(family: str, mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
  """Positions whose logits are defined: non-pad rows. Dream's logit at j comes from position
  j-1 (position 0 for j = 0), so there the *source* position must be a real token."""
  valid = np.ones(shape[:2], bool) if mask is None else mask.astype(bool)
  if family == "dream":
    valid = np.concatenate([valid[:, :1], valid[:, :-1]], axis=1)
  return valid


def _jax_logits(config, params, tokens, mask):
  return np.asarray(forward_logits(config, params, jnp.asarray(tokens),
                                   None if mask is None else jnp.asarray(mask)))


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_is_bidirectional(setups, family):
  """Changing the last token changes the first position's logits (a causal model could not)."""
  oracle = setups[family][0]
  tokens = np.arange(10, dtype=np.int32)[None] % _shape(family).vocab
  changed = tokens.copy()
  changed[0, -1] += 1
  a = hf.oracle_logits(oracle, family, tokens)
  b = hf.oracle_logits(oracle, family, changed)
  # Dream's position-0 logit is position 0's own output (the shift duplicates it).
  assert np.abs(a[0, 0] - b[0, 0]).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_padding_masks(setups, family):
  """The oracle's masks do what each family's semantics say, independently of our code.

  Both: which token sits on a pad position does not matter (pad keys are masked). Dream: a
  left-padded row equals the same row unpadded (positions restart at the first real token)."""
  oracle = setups[family][0]
  tokens, mask = _batches(family)["padded"]
  other = np.where(mask.astype(bool), tokens, (tokens + 1) % 90)
  valid = _compared(family, mask, tokens.shape)
  a = hf.oracle_logits(oracle, family, tokens, mask)
  b = hf.oracle_logits(oracle, family, other, mask)
  np.testing.assert_allclose(a[valid], b[valid], atol=1e-5)
  if family == "dream":
    n = int(mask[2].sum())
    alone = hf.oracle_logits(oracle, family, tokens[2:, -n:])
    np.testing.assert_allclose(a[2, -n + 1:], alone[0, 1:], atol=1e-4)


@pytest.mark.parametrize("batch", ["plain", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity(setups, family, batch):
  oracle, _, fp32_dir, _ = setups[family]
  config, params = load_checkpoint(fp32_dir)
  assert config.dtype == "float32"
  tokens, mask = _batches(family)[batch]
  want = hf.oracle_logits(oracle, family, tokens, mask)
  got = _jax_logits(config, params, tokens, mask)
  valid = _compared(family, mask, tokens.shape)
  scale = np.abs(want[valid]).max()
  assert 1.0 < want[valid].std() < 10.0 and scale < 50.0, "fixture logit scale drifted"
  err = np.abs(got[valid] - want[valid]).max()
  assert err <= FP32_TOL, f"{family}/{batch}: fp32 max abs err {err:.2e} at max|logit| {scale:.1f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_parity(setups, family):
  oracle, _, _, bf16_dir = setups[family]
  config, params = load_checkpoint(bf16_dir)
  assert config.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tokens, mask = _batches(family)["padded"]
  valid = _compared(family, mask, tokens.shape)
  want = hf.oracle_logits(oracle, family, tokens, mask)[valid]
  got = _jax_logits(config, params, tokens, mask)[valid]
  torch_bf16 = hf.oracle_logits(copy.deepcopy(oracle).to(torch.bfloat16), family, tokens,
                                mask)[valid]

  def rms_rel(x):
    return float(np.sqrt(np.mean((x - want) ** 2) / np.mean(want ** 2)))

  ours, reference = rms_rel(got), rms_rel(torch_bf16)
  max_rel = float(np.abs(got - want).max() / np.abs(want).max())
  assert ours <= 2e-2 and max_rel <= 3e-2, (ours, max_rel)
  assert ours <= 1.5 * reference, f"bf16 rms rel err {ours:.4f} vs PyTorch bf16 {reference:.4f}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_equals_converted(setups, family, dtype):
  """Loading straight from the HF dir gives the very same parameters as convert + restore."""
  _, src, fp32_dir, bf16_dir = setups[family]
  c1, direct = load_hf(src, dtype=dtype)
  c2, restored = load_checkpoint(fp32_dir if dtype == "float32" else bf16_dir)
  assert c1 == c2
  assert jax.tree.structure(direct) == jax.tree.structure(restored)

  def same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))

  jax.tree.map(same, direct, restored)


@pytest.mark.parametrize("source", ["hf", "converted"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_qkv_load_matches_the_oracle(setups, family, source):
  """`load(fused_qkv=True)` lays q|k|v out as one weight per layer (Dream: GQA groups and the
  biases) and the model still matches the oracle; the checkpoint's layout is unchanged."""
  import focus_jax  # pylint: disable=g-import-not-at-top
  oracle, src, fp32_dir, _ = setups[family]
  model = focus_jax.load(src if source == "hf" else fp32_dir, dtype="float32", fused_qkv=True)
  layer = model.params["layers_0"]
  assert model.config.fused_qkv and "q_proj" not in layer
  cfg = model.config
  width = cfg.n_kv_heads * (cfg.q_per_kv + 2) * cfg.head_dim
  assert layer["qkv_proj"]["kernel"].shape == (cfg.d_model, width)
  assert ("bias" in layer["qkv_proj"]) == cfg.qkv_bias
  tokens, mask = _batches(family)["padded"]
  want = hf.oracle_logits(oracle, family, tokens, mask)
  got = _jax_logits(model.config, model.params, tokens, mask)
  valid = _compared(family, mask, tokens.shape)
  err = np.abs(got[valid] - want[valid]).max()
  assert err <= FP32_TOL, f"{family}: fused q|k|v fp32 max abs err {err:.2e}"
  assert "q_proj" in load_checkpoint(fp32_dir)[1]["layers_0"]
