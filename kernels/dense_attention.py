"""Dense bidirectional attention, dispatched to the best implementation for the backend.

- GPU: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
  (Ampere or newer: cuDNN's flash kernels need compute capability 8.0; older GPUs, a T4 for
  example, take the XLA path under "auto").
- TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the MQA kernel
  vmapped over kv heads (GQA without repeated K/V), pad keys masked through segment ids. "auto"
  takes it when the query and key lengths are multiples of 128 and there are at least 128 queries
  (a refresh); a few queries over a long cache stay on XLA, where splash's [heads, seq, d] layout
  would cost a transpose of the whole cache for little compute.
- elsewhere (CPU, and the fallback): the XLA path below, float32 softmax, GQA by grouping query
  heads (K/V are never repeated in memory).

`implementation` is "auto", "xla", "cudnn" or "splash"; "auto" picks by backend, dtype and shape.
Rows whose keys are all masked are unspecified except on the XLA path (uniform over the keys).

`paged_attention` is the same attention over keys held in a pool of pages, each row of the batch
with its own table of pages (cuDNN's paged flash attention on a GPU reads them in place; other
backends gather them first): for callers whose rows read different subsets of one pool.

`fp8=True` runs the attention in float8 e4m3 with per-tensor scales (a refresh-economy option:
the refresh is compute-bound, and Hopper's fp8 tensor cores do twice the bf16 rate). Keys and
values are smoothed first (`fp8_operands`): each sequence's mean key and mean value per kv head
are taken out, which the softmax cannot see and the output gets back exactly, so a channel that
is large in every token (the slow RoPE channels of a long-context model) costs no precision. On
a GPU it is cuDNN's fp8 flash attention (through JAX's private cuDNN module: jax has no public
fp8 entry point); elsewhere, or with implementation "xla", `xla_fp8_attention`, an emulation of
the same arithmetic (q, k, v, the softmax numerators and the output rounded to e4m3).

cuDNN's fp8 kernel takes no mask, so in fp8 a pad key is not masked but neutralised: after
smoothing its key and value are zero, which makes it an average key (its score is the row's
mean score, since the smoothed keys sum to 0 over the valid ones) carrying the average value.
Its weight in a row is at most 1 / (valid keys + 1) (Jensen: the valid keys' mean exp-score is
at least 1), so n pads move a row's output towards the mean value by at most n / (valid + n)
of its distance from it. The emulation does the same, so both give one answer on padded
batches; callers keep the pad share small (`FP8_MAX_PAD_FRACTION`, checked by the pipeline).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from focus_jax.kernels import devices, partition
from focus_jax.kernels.fp8 import FP8, FP8_MAX, check_gpu_supports_fp8, quantize

# A finite large negative: a fully masked row (a pad query) stays finite instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128


# Softmax numerators exp(s - running max) lie in (0, 1]; cuDNN quantises them times this scale.
FP8_PROBS_SCALE = FP8_MAX
# The largest share of pad keys in a row fp8 attention accepts: the bound on how far the pads
# pull a row's output (module docstring), kept below fp8's own error (about 6% relative).
FP8_MAX_PAD_FRACTION = 1 / 32


def _splash_fits(q: jax.Array, k: jax.Array) -> bool:
  return (q.shape[1] % SPLASH_BLOCK == 0 and k.shape[1] % SPLASH_BLOCK == 0
          and q.shape[1] >= SPLASH_BLOCK)


def resolve(implementation: str, q: jax.Array, k: jax.Array | None = None) -> str:
  """The implementation "auto" picks for these inputs (others are returned as given)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if devices.gpu_at_least() and q.dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if backend == "tpu" and k is not None and _splash_fits(q, k):
    return "splash"
  return "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  key_valid: jax.Array | None = None,
                  query_valid: jax.Array | None = None) -> jax.Array:
  """Reference attention: q [B,T,Hq,D], k/v [B,S,Hkv,D], masks [B,S] / [B,T] -> [B,T,Hq,D]."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  qg = q.reshape(b, t, hkv, g, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
  if key_valid is not None:
    scores = jnp.where(key_valid[:, None, None, None, :], scores, MASK_VALUE)
  if query_valid is not None:
    scores = jnp.where(query_valid[:, None, None, :, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, hq, d).astype(q.dtype)


def valid_first(positions: jax.Array, ok: jax.Array) -> tuple[jax.Array, jax.Array]:
  """positions, ok [..., n] -> (each row's positions with its valid ones first, in order,
  [..., n]; its valid count, at least 1, [...] int32). Keys gathered in this order go to
  cuDNN as lengths (its padding mask) instead of a mask; their order does not change attention.
  A stable partition by a scatter to each key's rank: cheaper than a sort."""
  ok = ok.astype(bool)  # (~ on an integer mask would be a bitwise not)
  lead, n = ok.shape[:-1], ok.shape[-1]
  n_valid = ok.sum(-1, keepdims=True, dtype=jnp.int32)
  rank = jnp.where(ok, jnp.cumsum(ok, -1, dtype=jnp.int32),
                   n_valid + jnp.cumsum(~ok, -1, dtype=jnp.int32)) - 1
  rows = ok.size // n
  ordered = jnp.zeros((rows, n), positions.dtype).at[
      jnp.arange(rows)[:, None], rank.reshape(rows, n)].set(
          jnp.broadcast_to(positions, ok.shape).reshape(rows, n), unique_indices=True)
  return ordered.reshape(ok.shape), jnp.maximum(n_valid, 1).reshape(lead)


def lengths_beat_a_mask(t: int, k: jax.Array) -> bool:
  """Is reordering K and V valid-first (and passing lengths) cheaper than cuDNN's mask? A key
  mask reaches cuDNN as a [B, 1, T, S] 16-bit bias (2 GiB a sequence for a 32K refresh, written
  and read in every layer); the reorder writes K and V once, 2 x [B, S, Hkv, D]. So: a refresh
  over the canvas takes lengths, a step's few query rows over a long cache keep the bias."""
  return t * 2 >= 2 * k.shape[2] * k.shape[3] * jnp.dtype(k.dtype).itemsize


def valid_first_kv(k: jax.Array, v: jax.Array, key_valid: jax.Array):
  """k, v [B, S, Hkv, D] with each row's valid keys first (`valid_first`), and the valid
  counts [B]: what cuDNN's padding mask (`key_lengths`) reads."""
  order, lengths = valid_first(jnp.arange(k.shape[1], dtype=jnp.int32), key_valid)
  gather = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
  return gather(k), gather(v), lengths


def cudnn_attention(q, k, v, key_valid=None, query_valid=None, key_lengths=None):
  if key_lengths is not None:  # cuDNN's padding mask: no bias to build (pad query rows attend)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=key_lengths,
                                        implementation="cudnn")
  if key_valid is not None and lengths_beat_a_mask(q.shape[1], k):
    k, v, lengths = valid_first_kv(k, v, key_valid)
    return cudnn_attention(q, k, v, key_lengths=lengths)
  mask = None
  if key_valid is not None or query_valid is not None:
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    kv_ok = jnp.ones((b, s), bool) if key_valid is None else key_valid
    q_ok = jnp.ones((b, t), bool) if query_valid is None else query_valid
    # A pad query row keeps its keys: a row with no valid key is undefined in cuDNN.
    mask = kv_ok[:, None, None, :] | ~q_ok[:, None, :, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def _block(n: int) -> int:
  for b in (512, 256, 128):
    if n % b == 0:
      return b
  raise ValueError(f"splash attention needs lengths that are multiples of {SPLASH_BLOCK}, got {n}")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     key_valid: jax.Array | None = None, query_valid: jax.Array | None = None,
                     interpret: bool = False) -> jax.Array:
  """TPU splash attention: q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D]; pad query rows unspecified.

  `interpret=True` runs the kernel in Pallas interpret mode (tests on CPU).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  del query_valid  # pad query rows keep the valid keys; their outputs are ignored downstream
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  bq, bkv = _block(t), _block(s)
  mask = sm.MultiHeadMask([sm.FullMask((t, s)) for _ in range(g)])
  kernel = sk.make_splash_mqa_single_device(
      mask, block_sizes=sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv),
      interpret=interpret)
  scale = 1.0 / float(d) ** 0.5
  qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
  kh = k.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
  vh = v.transpose(0, 2, 1, 3)
  if key_valid is None:
    per_head = lambda qq, kk, vv: kernel(qq, kk, vv)
    out = jax.vmap(jax.vmap(per_head))(qh, kh, vh)
  else:
    seg = sk.SegmentIds(q=jnp.zeros((b, t), jnp.int32),
                        kv=jnp.where(key_valid, 0, 1).astype(jnp.int32))
    per_head = lambda qq, kk, vv, sg: kernel(qq, kk, vv, segment_ids=sg)
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qh, kh, vh, seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)


def _widened(x8: jax.Array) -> jax.Array:
  """An e4m3 array back in float32, for the emulation, behind an optimisation barrier: with
  excess precision allowed (XLA's GPU default) XLA drops a float32 -> e4m3 -> float32 round
  trip as a no-op, which would make the emulation skip the very rounding it models. (cuDNN's
  path consumes the e4m3 arrays directly and needs no barrier.)"""
  return jax.lax.optimization_barrier(x8).astype(jnp.float32)


class Fp8Operands(NamedTuple):
  """q, k, v ready for fp8 attention; the output is `descaled(attention(q8, k8, v8)) + v_mean`."""
  q8: jax.Array        # [B, T, Hq, D] e4m3
  k8: jax.Array        # [B, S, Hkv, D] e4m3, mean key removed
  v8: jax.Array        # [B, S, Hkv, D] e4m3, mean value removed
  descale_q: jax.Array  # float32 scalars: x = x8 * descale_x
  descale_k: jax.Array
  descale_v: jax.Array
  v_mean: jax.Array    # [B, 1, Hkv, D] float32, added back to every output row


def fp8_operands(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None,
                 query_valid: jax.Array | None = None, smooth: bool = True) -> Fp8Operands:
  """The quantisation shared by cuDNN's fp8 attention and its emulation. K loses its mean key
  (q . mean is one constant per score row: the softmax cannot see it) and V its mean value (each
  row of probabilities sums to 1, so the output gets it back exactly); then per-tensor e4m3
  scales. A component common to every token would otherwise set the scale and bury the part
  that differs between tokens, the part attention reads, under fp8's rounding. `smooth=False`
  skips that (for measuring what it buys; unpadded only: unsmoothed, a zeroed pad key would
  not score the row's mean)."""
  if not smooth and key_valid is not None:
    raise ValueError("unsmoothed fp8 attention cannot neutralise pad keys: pass smooth=True")
  (q8, dq, _), (k8, dk, _), (v8, dv, v_mean) = (
      quantize(q, query_valid), quantize(k, key_valid, center=smooth),
      quantize(v, key_valid, center=smooth))
  return Fp8Operands(q8, k8, v8, dq, dk, dv, v_mean)


def _with_mean_value(out: jax.Array, v_mean: jax.Array) -> jax.Array:
  """out [B, T, Hq, D] float32 plus each query head's kv-head mean value [B, 1, Hkv, D]."""
  b, t, hq, d = out.shape
  hkv = v_mean.shape[2]
  out = out.reshape(b, t, hkv, hq // hkv, d) + v_mean[:, :, :, None, :]
  return out.reshape(b, t, hq, d)


def xla_fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      key_valid: jax.Array | None = None,
                      query_valid: jax.Array | None = None, query_chunk: int = 512,
                      smooth: bool = True) -> jax.Array:
  """The fp8 attention's arithmetic in XLA: `fp8_operands` (smoothed k and v, e4m3 with
  per-tensor scales), float32 logits and row sums, the softmax numerators (under the exact row
  max) in e4m3 times FP8_PROBS_SCALE, float32 accumulation, and the output rounded to e4m3 on
  the scale that maps max|v8| (its bound) onto FP8_MAX, then the mean value added back.
  cuDNN's running max makes its numerators differ slightly.

  Pad keys (`key_valid` False) are neutralised as on cuDNN, not masked (module docstring); pad
  queries' rows are unspecified. Queries go `query_chunk` at a time, so the float32 logits stay
  at [B, Hq, query_chunk, S] (an 8K accuracy batch would otherwise need tens of GB). Pad
  positions do not set the scales or the means."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  ops = fp8_operands(q, k, v, key_valid, query_valid, smooth)
  q32, k32, v32 = _widened(ops.q8), _widened(ops.k8), _widened(ops.v8)
  logit_scale = ops.descale_q * ops.descale_k / jnp.sqrt(jnp.float32(d))
  dv = ops.descale_v
  out_scale = 1.0 / dv  # = FP8_MAX / max|v - mean|, which bounds |out - mean|

  def rows(q_rows):  # [B, C, Hq, D] -> [B, C, Hq, D] float32
    c = q_rows.shape[1]
    qg = q_rows.reshape(b, c, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k32,
                        precision=jax.lax.Precision.HIGHEST) * logit_scale
    numerators = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    row_sum = jnp.sum(numerators, axis=-1)
    p8 = _widened((numerators * FP8_PROBS_SCALE).astype(FP8))
    out = jnp.einsum("bkgts,bskd->btkgd", p8, v32, precision=jax.lax.Precision.HIGHEST)
    out = out * (dv / FP8_PROBS_SCALE) / jnp.moveaxis(row_sum, -1, 1)[..., None]
    out = _widened((out * out_scale).astype(FP8)) / out_scale
    return out.reshape(b, c, hq, d)

  chunk = min(query_chunk, t)
  n = -(-t // chunk)
  q32 = jnp.pad(q32, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0)))
  chunks = jnp.moveaxis(q32.reshape(b, n, chunk, hq, d), 1, 0)
  out = jax.lax.map(rows, chunks)  # [n, B, C, Hq, D]
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, hq, d)[:, :t]
  return _with_mean_value(out, ops.v_mean).astype(q.dtype)


def cudnn_fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        key_valid: jax.Array | None = None, query_valid: jax.Array | None = None,
                        smooth: bool = True) -> jax.Array:
  """cuDNN's fp8 flash attention (Hopper) on `fp8_operands`, with the scales and the pad
  handling of `xla_fp8_attention`."""
  cudnn_fa = _cudnn_module()  # no public fp8 entry point
  ops = fp8_operands(q, k, v, key_valid, query_valid, smooth)
  as_param = lambda x: jnp.asarray(x, jnp.float32).reshape(1, 1, 1, 1)
  params = {key: as_param(1.0) for key in cudnn_fa.fp8_params_keys}  # backward-only ones unused
  out_scale = 1.0 / ops.descale_v
  params.update(descale_q=as_param(ops.descale_q), descale_k=as_param(ops.descale_k),
                descale_v=as_param(ops.descale_v), descale_s=as_param(1.0 / FP8_PROBS_SCALE),
                scale_s=as_param(FP8_PROBS_SCALE), scale_o=as_param(out_scale))
  out, _, _ = cudnn_fa.dot_product_attention(
      ops.q8, ops.k8, ops.v8, fp8_params=params, scale=float(q.shape[-1]) ** -0.5, use_fp8=True,
      qkv_layout="BTNH")
  return _with_mean_value(out.astype(jnp.float32) / out_scale, ops.v_mean).astype(q.dtype)


def fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None,
                  query_valid: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
  """Attention in fp8 (module docstring). "auto": cuDNN on a GPU for 16-bit inputs, else the XLA
  emulation, which is slower than bfloat16 attention (it exists for tests and accuracy studies;
  a TPU has no fp8 kernel here); "cudnn": cuDNN; "xla": the emulation; "splash" is refused."""
  impl = resolve(implementation, q, k)  # (rejects unknown names)
  if implementation == "splash":
    raise ValueError("fp8 attention has no splash kernel: use attention_impl 'auto' or 'xla'")
  if impl == "cudnn":
    check_gpu_supports_fp8("fp8 attention (refresh_fp8_attention)")
    return cudnn_fp8_attention(q, k, v, key_valid, query_valid)
  return xla_fp8_attention(q, k, v, key_valid, query_valid)  # also "auto" on a TPU


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    page_table: jax.Array, kv_length: int,
                    implementation: str = "auto") -> jax.Array:
  """Dense attention over keys held in a pool of pages, read in place where the backend can.

  q [B, T, Hq, D]; k_pages / v_pages [P, page, Hkv, D], a pool of P pages; page_table [B, n]
  int32 page ids: row b's keys are its n pages in order, the first `kv_length` of them (a static
  int; the rest of the last page is ignored). -> [B, T, Hq, D].

  Why: a caller whose rows attend to different subsets of one pool (selected prompt blocks, per
  query chunk and kv head) would otherwise copy each subset out, gigabytes a layer at 32K. On a
  GPU this is cuDNN's paged flash attention, which follows the table in place (through JAX's
  private cuDNN module: its public `paged_attention` insists that the pool holds exactly B * n
  pages, which a shared pool does not); elsewhere the pages are gathered and go through
  `attention` (XLA, or splash on a TPU).
  """
  b, t, hq, d = q.shape
  n_pages, page, hkv = k_pages.shape[:3]
  chex.assert_shape(k_pages, (n_pages, page, hkv, d))
  chex.assert_equal_shape([k_pages, v_pages])
  chex.assert_shape(page_table, (b, None))
  if not 0 < kv_length <= page_table.shape[1] * page:
    raise ValueError(f"kv_length {kv_length} must lie in (0, {page_table.shape[1] * page}] "
                     f"({page_table.shape[1]} pages of {page} keys)")
  if not reads_pages_in_place(implementation, q, k_pages):
    # (resolved on the gathered keys: their length, not the page's, decides splash or XLA)
    gather = lambda pool: pool[page_table].reshape(b, -1, hkv, d)[:, :kv_length]
    return attention(q, gather(k_pages), gather(v_pages), implementation=implementation)
  cudnn_fa = _cudnn_module()
  table = page_table.astype(jnp.int32)[:, None, :, None]  # cuDNN's [B, 1, n, 1]
  unused = jnp.zeros(0, q.dtype)
  q_length = jnp.full((b,), t, jnp.int32)
  k_length = jnp.full((b,), kv_length, jnp.int32)
  return cudnn_fa._dot_product_attention(  # pylint: disable=protected-access
      q, k_pages, v_pages, unused, q_length, k_length, unused, unused, table, table,
      float(d) ** -0.5, 42, 0.0, (False, False), cudnn_fa.MaskType.PADDING,
      cudnn_fa.AttentionLayout.BTNH.value, None, cudnn_fa.check_cudnn_version(), False)


def _cudnn_module():
  """JAX's private cuDNN module: its fp8 and paged attention have no public entry point."""
  from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=g-import-not-at-top
  return fused_attention_stablehlo


# The private cuDNN primitive `paged_attention` calls, as of jax 0.10-0.11: its argument names.
_PAGED_PRIMITIVE_ARGS = ("query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets",
                         "kv_offsets", "page_table_k", "page_table_v")


def reads_pages_in_place(implementation: str, q: jax.Array, k_pages: jax.Array) -> bool:
  """Whether `paged_attention` reads the pages in place here (cuDNN, and this JAX still has the
  private primitive it calls), rather than gathering them; warns once when JAX moved it."""
  if resolve(implementation, q, k_pages) != "cudnn":
    return False
  primitive = getattr(_cudnn_module(), "_dot_product_attention", None)
  try:
    names = tuple(inspect.signature(primitive).parameters)[:len(_PAGED_PRIMITIVE_ARGS)]
  except (TypeError, ValueError):
    names = ()
  if names != _PAGED_PRIMITIVE_ARGS:
    warnings.warn(f"cuDNN's paged attention primitive is not where jax {jax.__version__} used "
                  "to keep it; gathering the pages instead (slower, same result)")
    return False
  return True


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None,
              query_valid: jax.Array | None = None, implementation: str = "auto",
              fp8: bool = False, key_lengths: jax.Array | None = None) -> jax.Array:
  """q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D]. Pads: `key_valid` [B,S] / `query_valid` [B,T],
  or `key_lengths` [B] int32 for keys padded at the end (row b attends to its first
  key_lengths[b] keys): cuDNN then takes lengths instead of a [B, 1, T, S] bias, and pad query
  rows are unspecified. On cuDNN a key mask over many query rows goes as lengths too (the keys
  reordered valid-first, `lengths_beat_a_mask`), its pad query rows likewise unspecified."""
  impl = resolve(implementation, q, k)
  if key_lengths is not None:
    if key_valid is not None:
      raise ValueError("give pad keys as key_valid or as key_lengths, not both")
    chex.assert_shape(key_lengths, (q.shape[0],))
    if impl == "cudnn" and not fp8:
      return cudnn_attention(q, k, v, key_lengths=key_lengths)
    key_valid = jnp.arange(k.shape[1]) < key_lengths[:, None]
  if fp8:
    return fp8_attention(q, k, v, key_valid, query_valid, implementation)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, key_valid, query_valid)
  if impl == "splash":
    run = functools.partial(splash_attention, interpret=jax.default_backend() != "tpu")
    mesh = partition.active_mesh()
    if mesh is not None:  # a Pallas kernel: each device its own rows and heads
      spec = partition.specs(mesh, batch=q.shape[0], kv_heads=k.shape[2])
      heads, rows = spec("rows", None, "heads", None), spec("rows")
      run = partition.per_device(run, mesh, (heads, heads, heads, rows, rows), heads)
    return run(q, k, v, key_valid, query_valid)
  return xla_attention(q, k, v, key_valid, query_valid)
