"""kernels.matmul: the weight-streaming Pallas kernels (interpret mode) against float64, their
shape rules and errors, and the model's `matmul_impl` (which projections stream, parity)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from focus_jax import presets
from focus_jax.kernels import matmul as mm
from focus_jax.models import config as C
from focus_jax.models.attention import SelfAttention
from focus_jax.models import transformer
from focus_jax.models.transformer import Transformer

T = mm.MatmulTiling


def _operands(seed, m, k, n, dtype=jnp.bfloat16, weights=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  ws = [jnp.asarray(0.05 * rng.standard_normal((k, n)), dtype) for _ in range(weights)]
  as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  return x, ws, as64


def _close(got, want):
  """Within the output dtype's rounding (bf16: 2^-8 relative) plus a sliver of the scale."""
  got = np.asarray(got.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(got, want, rtol=8e-3, atol=2e-3 * np.max(np.abs(want)))


# (m, k, n, tiling): one split; several splits with a short last one (5 chunks over 3 splits:
# 2, 2, 1); rows padded (1 -> 16, 33 -> 64); the most rows served; float16.
MATMUL_CASES = [
    (32, 512, 256, T(block_n=128, k_chunk=128, programs=2)),
    (7, 640, 128, T(block_n=64, k_chunk=128, programs=6)),
    (1, 256, 64, T(block_n=64, k_chunk=64, programs=1)),
    (33, 384, 192, T(block_n=64, k_chunk=128, programs=9)),
    (64, 256, 128, T(block_n=32, k_chunk=32, programs=64)),
]


@pytest.mark.parametrize("case", range(len(MATMUL_CASES)))
def test_matmul_matches_float64(case):
  m, k, n, tiling = MATMUL_CASES[case]
  x, (w,), as64 = _operands(case, m, k, n)
  got = jax.jit(functools.partial(mm.matmul, implementation="pallas_gpu", tiling=tiling,
                                  interpret=True))(x, w)
  assert got.shape == (m, n) and got.dtype == x.dtype
  _close(got, as64(x) @ as64(w))


def test_matmul_float16_and_leading_axes():
  x, (w,), as64 = _operands(9, 12, 256, 128, jnp.float16)
  x3 = x.reshape(2, 6, 256)
  got = mm.matmul(x3, w, implementation="pallas_gpu", tiling=T(block_n=64, k_chunk=64),
                  interpret=True)
  assert got.shape == (2, 6, 128) and got.dtype == jnp.float16
  _close(got.reshape(12, 128), as64(x) @ as64(w))


@pytest.mark.parametrize("m,n,tiling", [(20, 256, T(block_n=64, k_chunk=128)),
                                        (3, 128, T(block_n=128, k_chunk=64))])
def test_swiglu_matches_float64(m, n, tiling):
  x, (wg, wu), as64 = _operands(m, m, 384, n, weights=2)
  got = jax.jit(functools.partial(mm.swiglu, implementation="pallas_gpu", tiling=tiling,
                                  interpret=True))(x, wg, wu)
  g, u = as64(x) @ as64(wg), as64(x) @ as64(wu)
  _close(got, g / (1 + np.exp(-g)) * u)
  _close(mm.swiglu(x, wg, wu, implementation="xla"), g / (1 + np.exp(-g)) * u)


def test_split_count_fills_the_target_grid_without_empty_splits():
  # 4096 columns / 128 = 32 tiles; 264 programs -> 8 splits of 12288 / 128 = 96 chunks.
  assert mm.split_count(12288, 4096, T(block_n=128, k_chunk=128, programs=264)) == 8
  # Wide N: one split. Few chunks: at most one split per chunk.
  assert mm.split_count(4096, 126464, T()) == 1
  assert mm.split_count(256, 128, T(block_n=128, k_chunk=128, programs=100)) == 2


def test_supported_names_what_it_cannot_serve():
  assert mm.supported((32, 4096), (4096, 4096), jnp.bfloat16) is None
  assert "rows" in mm.supported((65, 4096), (4096, 4096), jnp.bfloat16)
  assert "float32" in mm.supported((32, 4096), (4096, 4096), jnp.float32)
  assert "block_n" in mm.supported((32, 4096), (4096, 4000), jnp.bfloat16)
  assert "k_chunk" in mm.supported((32, 4000), (4000, 4096), jnp.bfloat16)


def test_bad_input_is_refused_early():
  x, (w,), _ = _operands(0, 8, 256, 128)
  with pytest.raises(ValueError, match="power of two"):
    mm.matmul_pallas(x, w, tiling=T(block_n=96), interpret=True)
  with pytest.raises(ValueError, match="cannot run this: .*rows"):
    mm.matmul_pallas(jnp.zeros((100, 256), jnp.bfloat16), w, interpret=True)
  with pytest.raises(ValueError, match="does not match"):
    mm.matmul(x, jnp.zeros((128, 128), jnp.bfloat16))
  with pytest.raises(ValueError, match="share a dtype"):
    mm.matmul(x, w.astype(jnp.float32))
  with pytest.raises(ValueError, match="implementation"):
    mm.matmul(x, w, implementation="cublas")


def _kernel_sized(dtype="bfloat16", matmul_impl="xla"):
  """A tiny LLaDA whose every projection (and the LM head) has kernel-sized dims."""
  return C.llada_family(vocab_size=256, d_model=256, n_layers=2, n_heads=2, n_kv_heads=2,
                        head_dim=128, mlp_hidden=512, rms_eps=1e-5, rope_theta=10000.0,
                        max_sequence_length=512, mask_token_id=255, eos_token_id=254,
                        dtype=dtype, matmul_impl=matmul_impl)


def _forward(cfg, params, length):
  tokens = (jnp.arange(length)[None] * 7) % 250
  hidden, _, _ = Transformer(cfg).apply({"params": params}, tokens, jnp.arange(length)[None],
                                        SelfAttention())
  return Transformer(cfg).apply({"params": params}, hidden, method=Transformer.logits)


def test_model_streams_few_row_calls_and_matches_xla():
  """matmul_impl="pallas_gpu": a 32-row call runs every projection, the fused SwiGLU and the LM
  head in Pallas (one pallas_call per layer's q, k, v, o, swiglu, down, plus the head) and
  matches XLA; a 128-row call stays on XLA."""
  cfg = _kernel_sized()
  params = Transformer(cfg).init_params(jax.random.key(0))
  streamed = cfg.replace(matmul_impl="pallas_gpu")
  jaxpr = str(jax.make_jaxpr(functools.partial(_forward, streamed, length=32))(params))
  assert jaxpr.count("pallas_call") == cfg.n_layers * 6 + 1
  assert "swiglu_up" in jaxpr
  long_jaxpr = str(jax.make_jaxpr(functools.partial(_forward, streamed, length=128))(params))
  assert "pallas_call" not in long_jaxpr
  want = np.asarray(_forward(cfg, params, 32))
  got = np.asarray(_forward(streamed, params, 32))
  np.testing.assert_allclose(got, want, atol=0.05 * np.max(np.abs(want)))
  assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) > 0.9


def test_mlp_only_streams_just_the_swiglu():
  cfg = _kernel_sized(matmul_impl="pallas_gpu_mlp")
  params = Transformer(cfg).init_params(jax.random.key(0))
  jaxpr = str(jax.make_jaxpr(functools.partial(_forward, cfg, length=32))(params))
  assert jaxpr.count("pallas_call") == cfg.n_layers == jaxpr.count("swiglu_up")


@pytest.mark.parametrize("capability, swiglus", [(None, 0), ((8, 0), 0), ((9, 0), 2),
                                                 ((10, 0), 0)])
def test_auto_streams_the_swiglu_on_one_hopper_gpu(monkeypatch, capability, swiglus):
  """"auto": the SwiGLU streams on a single GPU of compute capability 9.x (the one measured),
  nothing else streams; off a GPU (None) or on other GPUs, all XLA."""
  monkeypatch.setattr(transformer, "_single_cuda_capability", lambda: capability)
  cfg = _kernel_sized(matmul_impl="auto")
  params = Transformer(cfg).init_params(jax.random.key(0))
  jaxpr = str(jax.make_jaxpr(functools.partial(_forward, cfg, length=32))(params))
  assert jaxpr.count("pallas_call") == swiglus == jaxpr.count("swiglu_up")


class _Device:
  platform = "gpu"

  def __init__(self, capability):
    self.compute_capability = capability


@pytest.mark.parametrize("on_gpu, devices, want", [
    (True, [_Device("9.0")], (9, 0)), (True, [_Device("8.6")], (8, 6)),
    (True, [_Device("gfx90a")], None),  # ROCm names its architecture instead
    (True, [_Device("9.0"), _Device("9.0")], None), (False, [_Device("9.0")], None)])
def test_single_cuda_capability(monkeypatch, on_gpu, devices, want):
  monkeypatch.setattr(transformer, "_on_gpu", lambda: on_gpu)
  monkeypatch.setattr(transformer.jax, "devices", lambda: devices)
  monkeypatch.setattr(transformer.jax, "device_count", lambda: len(devices))
  assert transformer._single_cuda_capability() == want  # pylint: disable=protected-access


@pytest.mark.parametrize("on_gpu, length, barriers", [(True, 101, 4), (True, 100, 0),
                                                      (False, 101, 0)])
def test_refresh_sized_gpu_calls_materialise_the_norms(monkeypatch, on_gpu, length, barriers):
  """On a GPU, a call of more rows than REFRESH_ROWS puts each norm's output behind an
  optimization barrier (two per layer); smaller calls and other backends do not."""
  monkeypatch.setattr(transformer, "_on_gpu", lambda: on_gpu)
  monkeypatch.setattr(transformer, "REFRESH_ROWS", 100)
  cfg = _kernel_sized()
  params = Transformer(cfg).init_params(jax.random.key(0))
  jaxpr = str(jax.make_jaxpr(functools.partial(_forward, cfg, length=length))(params))
  assert jaxpr.count("optimization_barrier") == barriers


def test_load_overrides_matmul_impl():
  import focus_jax  # pylint: disable=g-import-not-at-top
  assert focus_jax.load("tiny", matmul_impl="pallas_gpu_mlp").config.matmul_impl == (
      "pallas_gpu_mlp")
  assert focus_jax.load("tiny").config.matmul_impl == "xla"
  with pytest.raises(ValueError, match="matmul_impl"):
    focus_jax.load("tiny", matmul_impl="cublas")


def test_float32_models_never_stream():
  cfg = _kernel_sized("float32", "pallas_gpu")
  params = Transformer(cfg).init_params(jax.random.key(0))
  assert "pallas_call" not in str(jax.make_jaxpr(functools.partial(_forward, cfg, length=32))(
      params))


def test_config_validates_and_round_trips_matmul_impl():
  with pytest.raises(ValueError, match="matmul_impl"):
    _kernel_sized(matmul_impl="cublas")
  cfg = _kernel_sized(matmul_impl="auto")
  assert C.ModelConfig.from_json(cfg.to_json()) == cfg


MERGE_QKV = {"xla_gpu_dot_merger_threshold_mb": transformer.AUTO_DOT_MERGER_THRESHOLD_MB}
MERGE_NONE = {"xla_gpu_dot_merger_threshold_mb": 0}


@pytest.mark.parametrize("impl, capability, on_gpu, batch, fused, want", [
    ("auto", (9, 0), True, 1, False, MERGE_QKV), ("auto", (9, 0), True, 8, False, MERGE_NONE),
    ("auto", (8, 0), True, 1, False, {}), ("auto", None, True, 1, False, {}),
    ("auto", None, True, 8, False, MERGE_NONE), ("xla", (9, 0), True, 1, False, {}),
    ("xla", (9, 0), True, 2, False, MERGE_NONE), ("xla", (9, 0), True, 8, True, {}),
    ("pallas_gpu_mlp", (9, 0), True, 1, False, {}), ("xla", None, False, 8, False, {})])
def test_compiler_options_merge_qkv_dots_only_at_batch_1(monkeypatch, impl, capability, on_gpu,
                                                         batch, fused, want):
  """On a GPU at batch 1, "auto" on one Hopper GPU asks XLA to merge a layer's q, k and v dots
  into one GEMM (the dot-merger threshold); above batch 1 no sibling dots merge at all (the
  merged GEMM concatenates weights in a Triton kernel: slower at 256 rows), unless the weight is
  already fused; off a GPU XLA's options are left alone."""
  monkeypatch.setattr(transformer, "_single_cuda_capability", lambda: capability)
  monkeypatch.setattr(transformer, "_on_gpu", lambda: on_gpu)
  cfg = _kernel_sized(matmul_impl=impl).replace(fused_qkv=fused)
  assert transformer.compiler_options(cfg, batch) == want


def test_load_fuses_qkv_from_the_same_weights():
  """`load(preset, fused_qkv=True)` draws the preset's weights in the checkpoint layout and fuses
  them, so a seed gives the same model in either layout; `fuse_qkv(donate=True)` frees the three
  weights it consumed."""
  import focus_jax  # pylint: disable=g-import-not-at-top
  from focus_jax.models import forward_logits, param_map  # pylint: disable=g-import-not-at-top
  plain, fused = focus_jax.load("tiny", seed=4), focus_jax.load("tiny", seed=4, fused_qkv=True)
  assert fused.config.fused_qkv and "qkv_proj" in fused.params["layers_0"]
  tokens = jnp.arange(40, dtype=jnp.int32).reshape(2, 20)
  np.testing.assert_allclose(np.asarray(forward_logits(fused.config, fused.params, tokens)),
                             np.asarray(forward_logits(plain.config, plain.params, tokens)),
                             rtol=1e-5, atol=1e-5)
  q = plain.params["layers_0"]["q_proj"]["kernel"]
  param_map.fuse_qkv(fused.config, plain.params, donate=True)
  assert q.is_deleted()


def _numpy_fp8_matmul(x, w):
  """fp8_matmul's arithmetic in NumPy (ml_dtypes' e4m3, power-of-two scales), float64 sums."""
  import ml_dtypes

  def quant(a):
    a = np.asarray(a.astype(jnp.float32), np.float32)
    scale = np.float32(2.0 ** np.floor(np.log2(448.0 / np.abs(a).max())))
    return a * scale, scale
  (xs, sx), (ws, sw) = quant(x), quant(w)
  e4m3 = lambda a: a.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return (e4m3(xs) / sx) @ (e4m3(ws) / sw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_matmul_is_the_quantised_product(dtype):
  x, (w,), as64 = _operands(30, 48, 96, 40, dtype)
  x = x.reshape(2, 24, 96)  # leading axes are kept
  got = mm.fp8_matmul(x, w)
  assert got.shape == (2, 24, 40) and got.dtype == dtype
  want = _numpy_fp8_matmul(x.reshape(48, 96), w).reshape(2, 24, 40)
  rtol = 1e-5 if dtype == jnp.float32 else 8e-3  # (bfloat16: the output's rounding)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=rtol,
                             atol=rtol * np.abs(want).max())
  exact = as64(x) @ as64(w)
  rel = np.linalg.norm(want - exact) / np.linalg.norm(exact)
  assert 1e-3 < rel < 0.08, rel  # it does quantise, by e4m3's few percent


def test_fp8_matmul_hands_the_dot_its_e4m3_operands():
  """XLA's GPU compiler makes a cuBLASLt fp8 GEMM of a dot whose operands are e4m3 (the
  convert-and-scale pattern is left a bfloat16 GEMM): the dot must take them directly, in the
  output dtype, and the scales come after."""
  x, (w,), _ = _operands(31, 16, 32, 8)
  jaxpr = jax.make_jaxpr(mm.fp8_matmul)(x, w).jaxpr
  (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert [str(v.aval.dtype) for v in dot.invars] == ["float8_e4m3fn"] * 2, dot
  assert dot.params["preferred_element_type"] == jnp.bfloat16, dot.params
  assert jaxpr.eqns[-1].primitive.name == "mul", jaxpr
  # The weight comes transposed, [N, K]: both operands K-contiguous, as cuBLASLt's fp8 GEMM
  # reads them (handed [K, N], XLA transposes it in bfloat16 first).
  assert dot.params["dimension_numbers"][0] == ((1,), (1,)), dot.params
  w8t, descale = mm.quantize_weight(w)
  assert w8t.shape == (8, 32) and w8t.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(mm.fp8_matmul_quantized(x, w8t, descale)),
                                np.asarray(mm.fp8_matmul(x, w)))


def test_fp8_matmul_model_flag_leaves_the_lm_head_alone():
  """`ModelConfig.fp8_matmul`: the projections run in fp8 (hidden states move), the lm head
  does not (the same hidden states give the same logits)."""
  cfg = presets.tiny()
  fp8_cfg = cfg.replace(fp8_matmul=True)
  params = Transformer(cfg).init_params(jax.random.PRNGKey(0))
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % cfg.vocab_size
  positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape)
  run = lambda c: Transformer(c).apply({"params": params}, tokens, positions, SelfAttention())[0]
  exact, fp8 = run(cfg), run(fp8_cfg)
  rel = float(jnp.linalg.norm(fp8 - exact) / jnp.linalg.norm(exact))
  assert 1e-4 < rel < 0.1, rel
  logits = lambda c: Transformer(c).apply({"params": params}, exact, method=Transformer.logits)
  np.testing.assert_array_equal(np.asarray(logits(cfg)), np.asarray(logits(fp8_cfg)))
