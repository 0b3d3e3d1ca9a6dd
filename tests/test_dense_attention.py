"""Dense attention dispatch: backend choice, overrides, and splash (interpret mode) vs XLA."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from focus_jax.kernels import dense_attention as da


def _qkv(seed, b=2, t=128, hq=4, hkv=2, d=128, s=256, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return f(b, t, hq, d), f(b, s, hkv, d), f(b, s, hkv, d), jnp.asarray(rng.random((b, s)) < 0.7)


def _naive(q, k, v, key_valid):
  """Repeated K/V, float64, plain softmax: independent of the grouped XLA path."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(key_valid)[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("with_mask", [False, True])
def test_xla_matches_naive(with_mask):
  q, k, v, kv = _qkv(0, t=16, d=32, s=40)
  if not with_mask:
    kv = jnp.ones_like(kv)
  out = da.attention(q, k, v, key_valid=kv if with_mask else None, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, kv), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_splash_interpret_matches_xla(with_mask):
  q, k, v, kv = _qkv(1, hq=6, hkv=2)
  kv = kv if with_mask else None
  ref = da.attention(q, k, v, key_valid=kv, implementation="xla")
  out = da.attention(q, k, v, key_valid=kv, implementation="splash")  # interpret off-TPU
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_auto_by_backend(monkeypatch):
  q, k, _, _ = _qkv(2)
  qb = q.astype(jnp.bfloat16)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert da.resolve("auto", qb, k) == "cudnn"
  assert da.resolve("auto", q, k) == "xla"  # float32 stays on XLA
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert da.resolve("auto", qb, k) == "splash"
  assert da.resolve("auto", qb[:, :32], k) == "xla"  # few queries: no splash
  assert da.resolve("auto", qb, k[:, :200]) == "xla"  # lengths not multiples of 128
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert da.resolve("auto", qb, k) == "xla"
  for impl in ("xla", "cudnn", "splash"):
    assert da.resolve(impl, qb, k) == impl  # an explicit choice overrides the backend


def test_auto_takes_xla_on_gpus_older_than_ampere(monkeypatch):
  """cuDNN's flash attention needs compute capability 8.0 (JAX refuses a T4 when it compiles),
  and our Pallas GPU kernels are built for Ampere on: "auto" takes the XLA paths below it."""
  import types

  from focus_jax.kernels import attention_mass, matmul, sparse_attention
  q, k, _, _ = _qkv(2)
  qb = q.astype(jnp.bfloat16)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  sparse = lambda: sparse_attention.resolve_implementation("auto", (1, 32, 32, 128),
                                                            (1, 8192, 32, 128), jnp.bfloat16, 64)
  for capability, dense, blocks in (("7.5", "xla", "xla_gather"), ("8.0", "cudnn", "pallas_gpu"),
                                    ("9.0", "cudnn", "pallas_gpu")):
    gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability,
                                device_kind="NVIDIA GPU")
    monkeypatch.setattr(jax, "devices", lambda *a, g=gpu: [g])
    assert (da.resolve("auto", qb, k), sparse()) == (dense, blocks), capability
  # (on the 9.0 "GPU" of this CPU machine the Pallas kernels would not run; on a 7.5 one the
  # mass and matmul run XLA's paths, equal to asking for them)
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(
      platform="gpu", compute_capability="7.5", device_kind="Tesla T4")])
  lse = jnp.zeros(q.shape[:3])
  weight = jnp.ones(q.shape[:2])
  np.testing.assert_array_equal(
      np.asarray(attention_mass.attention_mass(q, k, lse, weight)),
      np.asarray(attention_mass.attention_mass(q, k, lse, weight, implementation="xla")))
  x, w = jnp.ones((4, 128), jnp.bfloat16), jnp.ones((128, 256), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(matmul.matmul(x, w)),
                                np.asarray(matmul.matmul(x, w, implementation="xla")))


def test_key_lengths_mask_a_padded_end_without_a_bias(monkeypatch):
  """key_lengths [B]: row b sees its first key_lengths[b] keys, the same answer as the equal
  key mask; on cuDNN they go as sequence lengths (its padding mask), never as a bias."""
  q, k, v, _ = _qkv(5, t=8, s=40, d=16)
  lengths = jnp.array([40, 23], jnp.int32)
  want = da.attention(q, k, v, key_valid=jnp.arange(40) < lengths[:, None],
                      implementation="xla")
  got = da.attention(q, k, v, key_lengths=lengths, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="not both"):
    da.attention(q, k, v, key_valid=jnp.ones((2, 40), bool), key_lengths=lengths)
  seen = {}

  def fake_cudnn(q, k, v, mask=None, key_value_seq_lengths=None, implementation=None):
    seen.update(mask=mask, lengths=key_value_seq_lengths, implementation=implementation)
    return q

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  da.attention(q, k, v, key_lengths=lengths, implementation="cudnn")
  assert seen["mask"] is None and seen["implementation"] == "cudnn"
  np.testing.assert_array_equal(np.asarray(seen["lengths"]), np.asarray(lengths))


def test_valid_first_is_a_stable_partition():
  ok = jnp.array([[True, False, True, False, True], [False, False, False, False, False]])
  order, lengths = da.valid_first(jnp.arange(5, dtype=jnp.int32), ok)
  np.testing.assert_array_equal(np.asarray(order), [[0, 2, 4, 1, 3], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(np.asarray(lengths), [3, 1])  # (at least 1: cuDNN's minimum)
  order_int, _ = da.valid_first(jnp.arange(5, dtype=jnp.int32), ok.astype(jnp.int32))
  np.testing.assert_array_equal(np.asarray(order_int), np.asarray(order))  # a 0/1 mask too


def test_cudnn_refresh_key_mask_goes_as_lengths_of_valid_first_keys(monkeypatch):
  """A key mask over many query rows (a refresh) reaches cuDNN as lengths of keys reordered
  valid first, not as a [B, 1, T, S] bias; a few rows keep the mask. Emulated by XLA attention
  over each row's first `key_value_seq_lengths` keys: the valid rows get the masked answer."""
  calls = []

  def cudnn_by_lengths(q, k, v, mask=None, key_value_seq_lengths=None, implementation=None):
    calls.append("mask" if mask is not None else "lengths")
    if mask is not None:
      return da.xla_attention(q, k, v, mask[:, 0, 0, :])
    return da.xla_attention(q, k, v, jnp.arange(k.shape[1]) < key_value_seq_lengths[:, None])

  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_by_lengths)
  q, k, v, kv = _qkv(6, t=64, hq=4, hkv=2, d=8, s=64)  # pads anywhere (30%)
  assert da.lengths_beat_a_mask(64, k) and not da.lengths_beat_a_mask(4, k)
  got = da.attention(q, k, v, key_valid=kv, query_valid=kv, implementation="cudnn")
  rows = np.asarray(kv)  # (pad query rows, Dream's, are unspecified)
  np.testing.assert_allclose(np.asarray(got)[rows], _naive(q, k, v, kv)[rows], atol=1e-5,
                             rtol=1e-5)
  da.attention(q[:, :4], k, v, key_valid=kv, implementation="cudnn")
  assert calls == ["lengths", "mask"]


def test_unknown_implementation():
  q, k, v, _ = _qkv(3, t=8, s=16, d=16)
  with pytest.raises(ValueError, match="implementation"):
    da.attention(q, k, v, implementation="flash9000")


def test_auto_on_this_backend_runs():
  q, k, v, kv = _qkv(4, t=16, d=32, s=40)
  out = jax.jit(lambda *a: da.attention(*a))(q, k, v, kv)
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, kv), atol=1e-5, rtol=1e-5)


def _left_padded(s, pads=(2, 5)):
  """key_valid [len(pads), s] of left-padded rows: a pipeline batch's few pads, not 30%."""
  return jnp.arange(s)[None, :] >= jnp.asarray(pads)[:, None]


def _numpy_fp8(q, k, v, key_valid=None, smooth=True):
  """fp8 attention's arithmetic in NumPy (ml_dtypes' e4m3), independent of the JAX emulation.
  Pad keys are zeroed after smoothing and attended, not masked. `smooth=False`: without taking
  out the mean key and value first (what smoothing buys)."""
  import ml_dtypes
  e4m3 = ml_dtypes.float8_e4m3fn
  valid = (np.ones(k.shape[:2], bool) if key_valid is None else np.asarray(key_valid))
  w = valid[:, :, None, None]

  def mean(x):  # per sequence and head, over the valid positions
    x = np.asarray(x, np.float32)
    if not smooth:
      return np.zeros_like(x[:, :1])
    return (np.where(w, x, 0).sum(1, keepdims=True) / w.sum(1, keepdims=True)).astype(np.float32)

  def quant(x, valid=None):
    x = np.asarray(x, np.float32)
    if valid is not None:  # pad rows are zeroed: they neither set the scale nor overflow
      x = np.where(np.asarray(valid)[:, :, None, None], x, 0)
    scale = np.float32(448.0) / np.abs(x).max()
    return (x * scale).astype(e4m3).astype(np.float64), 1.0 / np.float64(scale)

  k_mean, v_mean = mean(k), mean(v)
  (q8, dq), (k8, dk), (v8, dv) = quant(q), quant(k - k_mean, valid), quant(v - v_mean, valid)
  g = q8.shape[2] // k8.shape[2]
  k8, v8, v_mean = (np.repeat(x, g, axis=2) for x in (k8, v8, v_mean))
  s = np.einsum("bthd,bshd->bhts", q8, k8) * dq * dk / np.sqrt(q8.shape[-1])
  n = np.exp(s - s.max(-1, keepdims=True))
  p8 = (n * 448.0).astype(np.float32).astype(e4m3).astype(np.float64) / 448.0
  out = np.einsum("bhts,bshd->bthd", p8, v8) * dv / n.sum(-1).transpose(0, 2, 1)[..., None]
  return (out / dv).astype(np.float32).astype(e4m3).astype(np.float64) * dv + v_mean


@pytest.mark.parametrize("with_mask,smooth", [(False, True), (True, True), (False, False)])
def test_fp8_emulation_is_the_quantised_arithmetic(with_mask, smooth):
  q, k, v, _ = _qkv(5, t=48, hq=4, hkv=2, d=32, s=80)
  kv = _left_padded(80) if with_mask else None
  if smooth:
    out = np.asarray(da.attention(q, k, v, key_valid=kv, implementation="xla", fp8=True))
  else:
    out = np.asarray(da.xla_fp8_attention(q, k, v, kv, smooth=False))
  want = _numpy_fp8(q, k, v, kv, smooth=smooth)
  # float32 against float64 may round a value to the neighbouring e4m3 step (1/8 of it) now
  # and then; everything else agrees to float32 precision.
  close = np.isclose(out, want, rtol=1e-4, atol=1e-6)
  assert close.mean() > 0.99
  np.testing.assert_allclose(out, want, rtol=0.13, atol=1e-3)
  exact = _naive(q, k, v, kv if with_mask else jnp.ones(q.shape[:1] + k.shape[1:2], bool))
  rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
  assert 1e-3 < rel < 0.1, rel  # it does quantise, and only by fp8's few percent


def test_fp8_pads_pull_a_row_by_at_most_their_share():
  """fp8 attention cannot mask (cuDNN's kernel has no mask): a pad key becomes an average key
  with the average value. Against the same batch without its pads, each row's output moves
  towards the mean value by at most n_pad / (n_valid + n_pad) of its distance from it."""
  q, k, v, _ = _qkv(12, t=24, hq=4, hkv=2, d=32, s=60)
  n_pad = 12
  noise = jnp.asarray(np.random.default_rng(3).normal(0, 5, (1, n_pad) + k.shape[2:]), k.dtype)
  pad = lambda x: jnp.concatenate([jnp.broadcast_to(noise, (x.shape[0],) + noise.shape[1:]), x], 1)
  kv = jnp.concatenate([jnp.zeros((q.shape[0], n_pad), bool),
                        jnp.ones(k.shape[:2], bool)], axis=1)
  plain = np.asarray(da.xla_fp8_attention(q, k, v), np.float64)
  padded = np.asarray(da.xla_fp8_attention(q, pad(k), pad(v), kv), np.float64)
  mean_v = np.repeat(np.asarray(v, np.float64).mean(1, keepdims=True), 2, axis=2)
  share = n_pad / (n_pad + k.shape[1])
  pull = np.linalg.norm(padded - plain, axis=-1)
  reach = np.linalg.norm(plain - mean_v, axis=-1)
  # (+ a little for the output's e4m3 rounding, which the pull moves across)
  assert np.all(pull <= (share + 0.03) * reach), (pull / reach).max()
  assert 0 < np.median(pull / reach) <= share, np.median(pull / reach)
  # and unsmoothed fp8 refuses pads (they would not be average keys)
  with pytest.raises(ValueError, match="smooth"):
    da.xla_fp8_attention(q, pad(k), pad(v), kv, smooth=False)


def test_fp8_smoothing_keeps_a_common_channel_from_costing_precision():
  """A key channel and a value channel large in every token (a long-context model's slow RoPE
  pairs): the softmax cannot see the first and the output gets the second back exactly, so
  fp8's error must stay what it is without them. Unsmoothed (the NumPy model) it is worse."""
  q, k, v, _ = _qkv(11, t=32, hq=4, hkv=2, d=32, s=96)
  kv = _left_padded(96)
  offset = np.zeros(k.shape[-1], np.float32)
  offset[[3, 17]] = (24.0, -16.0)
  k_off, v_off = k + offset, v + 3 * offset
  exact = _naive(q, k, v, kv)
  exact_off = exact + 3 * offset  # rows of probabilities sum to 1
  np.testing.assert_allclose(_naive(q, k_off, v_off, kv), exact_off, rtol=1e-4, atol=1e-3)
  err = lambda out, want: float(np.linalg.norm(out - want) / np.linalg.norm(exact))
  base = err(np.asarray(da.xla_fp8_attention(q, k, v, kv)), exact)
  smoothed = err(np.asarray(da.xla_fp8_attention(q, k_off, v_off, kv)), exact_off)
  unsmoothed = err(_numpy_fp8(q, k_off, v_off, kv, smooth=False), exact_off)
  assert 1e-3 < base < 0.1 and smoothed < 1.3 * base, (base, smoothed)
  assert unsmoothed > 3 * smoothed, (unsmoothed, smoothed)


def test_fp8_emulation_query_chunks_and_padding():
  q, k, v, kv = _qkv(6, t=37, hq=4, hkv=4, d=16, s=50)
  whole = da.xla_fp8_attention(q, k, v, kv, query_chunk=64)
  chunked = da.xla_fp8_attention(q, k, v, kv, query_chunk=8)  # 5 chunks, the last padded
  np.testing.assert_array_equal(np.asarray(whole), np.asarray(chunked))
  # Whatever pad keys hold does not matter: not in the scales, the means or the scores.
  noise = jnp.asarray(np.random.default_rng(7).normal(0, 30, k.shape), k.dtype)
  moved = da.xla_fp8_attention(q, jnp.where(kv[..., None, None], k, noise),
                               jnp.where(kv[..., None, None], v, noise), kv, query_chunk=8)
  np.testing.assert_array_equal(np.asarray(whole), np.asarray(moved))


def test_fp8_refuses_what_it_cannot_run():
  q, k, v, kv = _qkv(8, t=8, s=16, d=16)
  with pytest.raises(ValueError, match="splash"):
    da.attention(q, k, v, implementation="splash", fp8=True)
  with pytest.raises(ValueError, match="implementation"):
    da.attention(q, k, v, implementation="flash9000", fp8=True)


def test_fp8_auto_on_a_tpu_is_the_emulation(monkeypatch):
  q, k, v, _ = _qkv(9, t=128, s=128, d=16)  # splash would fit these lengths in bfloat16
  want = da.xla_fp8_attention(q, k, v)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  np.testing.assert_array_equal(np.asarray(da.attention(q, k, v, fp8=True)), np.asarray(want))


def test_fp8_emulation_keeps_its_roundings_from_the_compiler():
  """XLA's GPU compiler (excess precision allowed, its default) drops a float32 -> e4m3 ->
  float32 round trip; the CPU keeps it, so the tests above cannot see that. Each of the five
  roundings (q, k, v, the numerators, the output) must sit behind an optimisation barrier."""
  q, k, v, _ = _qkv(10, t=16, s=16, d=16)
  jaxpr = str(jax.make_jaxpr(da.xla_fp8_attention)(q, k, v))
  assert jaxpr.count("optimization_barrier") == 5, jaxpr


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_refused_early(monkeypatch):
  """Ampere (Colab's A100) has no e4m3 tensor cores: both fp8 refresh options say so by name
  at trace time instead of failing inside cuDNN / cuBLASLt; Ada and Hopper pass."""
  import types

  from focus_jax.kernels import fp8, matmul

  def device(capability):
    return [types.SimpleNamespace(platform="gpu", compute_capability=capability,
                                  device_kind="NVIDIA A100-SXM4-40GB")]

  monkeypatch.setattr(jax, "devices", lambda *a: device("8.0"))
  with pytest.raises(ValueError, match="refresh_fp8_attention.*8.0"):
    fp8.check_gpu_supports_fp8("fp8 attention (refresh_fp8_attention)")
  x = jnp.ones((4, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="refresh_fp8_matmul"):
    matmul.fp8_matmul(x, jnp.ones((8, 4), jnp.bfloat16))
  for ok in ("8.9", "9.0"):
    monkeypatch.setattr(jax, "devices", lambda *a, c=ok: device(c))
    fp8.check_gpu_supports_fp8("fp8 attention")


def test_paged_attention_reads_its_pages_in_table_order():
  """Each row attends to its own pages of one pool, in table order (duplicates allowed), up to
  kv_length keys: the last page's remainder is not attended."""
  rng = np.random.default_rng(7)
  pages, page, hkv, d, b, t, hq = 9, 8, 2, 32, 3, 5, 4
  k_pool, v_pool = (jnp.asarray(rng.standard_normal((pages, page, hkv, d)), jnp.float32)
                    for _ in range(2))
  q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
  table = jnp.asarray([[4, 0, 8], [1, 1, 2], [8, 7, 3]], jnp.int32)
  kv_length = 2 * page + 3
  out = da.paged_attention(q, k_pool, v_pool, table, kv_length, implementation="xla")
  keys = lambda pool: np.asarray(pool)[np.asarray(table)].reshape(b, -1, hkv, d)[:, :kv_length]
  want = _naive(q, keys(k_pool), keys(v_pool), np.ones((b, kv_length), bool))
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="kv_length 25 must lie in"):
    da.paged_attention(q, k_pool, v_pool, table, 3 * page + 1, implementation="xla")


def test_paged_attention_falls_back_to_a_gather_when_jax_moved_its_primitive(monkeypatch):
  """cuDNN's paged primitive is private to JAX: if a JAX release changes it, the call warns and
  gathers the pages (same result) instead of failing, and callers budget for the gather."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  rng = np.random.default_rng(8)
  k_pool, v_pool = (jnp.asarray(rng.standard_normal((4, 8, 1, 16)), jnp.float32)
                    for _ in range(2))
  q = jnp.asarray(rng.standard_normal((2, 3, 2, 16)), jnp.float32)
  table = jnp.asarray([[3, 1], [0, 0]], jnp.int32)
  want = da.paged_attention(q, k_pool, v_pool, table, 12, implementation="xla")
  assert not da.reads_pages_in_place("xla", q, k_pool)
  assert da.reads_pages_in_place("cudnn", q, k_pool)  # this JAX has the primitive

  def moved(query, key, value, page_tables):
    raise AssertionError("not called")
  monkeypatch.setattr(cudnn_fa, "_dot_product_attention", moved)
  monkeypatch.setattr(da, "cudnn_attention", da.xla_attention)  # (no cuDNN on this machine)
  with pytest.warns(UserWarning, match="gathering the pages instead"):
    assert not da.reads_pages_in_place("cudnn", q, k_pool)
  with pytest.warns(UserWarning, match="gathering the pages instead"):
    got = da.paged_attention(q, k_pool, v_pool, table, 12, implementation="cudnn")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_paged_attention_on_a_tpu_resolves_on_the_gathered_keys(monkeypatch):
  """Pages of 128 keys look like splash's tiles, but the gathered keys (19 here) are not a
  multiple of 128: "auto" must resolve on them (XLA), not on the page."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  rng = np.random.default_rng(9)
  k_pool, v_pool = (jnp.asarray(rng.standard_normal((3, 128, 1, 16)), jnp.float32)
                    for _ in range(2))
  q = jnp.asarray(rng.standard_normal((1, 128, 1, 16)), jnp.float32)
  table = jnp.asarray([[2, 0]], jnp.int32)
  got = da.paged_attention(q, k_pool, v_pool, table, 147)
  want = da.paged_attention(q, k_pool, v_pool, table, 147, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
