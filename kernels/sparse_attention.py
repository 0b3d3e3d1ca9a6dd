"""Block-sparse attention of a Focus step: few queries over selected prompt blocks + the response.

Semantics (defined by `reference_block_sparse_attention`): each query row softmaxes over the union
of (a) the keys of the selected prompt blocks that lie in [prompt_start, response_start),
(b) the keys [response_start, response_end), always, and (c) the valid keys of the extra dense
segment (the sinks: given as arrays extra_k/extra_v, or as rows of the cache, `extra_positions`,
which the GPU kernel gathers itself). The selection is a set: duplicate ids count once,
ids at or beyond the count and out-of-range ids (< 0 or >= ceil(S / block_size)) are ignored.
Extra keys are separate keys: the kernel cannot tell whether a sink also lies in a selected block,
so a caller that wants each key once marks such sinks invalid in `extra_valid` ([B, E], or
[B, E, Hkv] when the validity differs per kv head), or, for extra keys given as cache rows, passes
`dedup_extra=True`: a row the selection already attends is then not counted again (the GPU kernel
checks this itself, against its block list).
A query row that sees no key at all returns zeros, and so does every query t >= `query_counts[b]`
when counts are given (padded query slots: the GPU kernel does not compute them).
Ranges are clipped into 0 <= prompt_start <= response_start <= response_end <= S. bf16 in, float32 accumulation.

Implementations: "pallas_gpu" (Pallas, Triton lowering; split-KV), "pallas_tpu" (Pallas Mosaic-TPU;
scalar-prefetched block list), "jax_triton" (the split-KV kernel hand-written in Triton; needs the
optional jax_triton package and a CUDA GPU), "mosaic_gpu" (the split-KV algorithm as a Mosaic GPU
kernel, wgmma + TMA, Hopper only), "xla_gather" (gather the blocks, then dense attention: the
baseline), "reference" (dense mask over the whole cache; for tests). "auto" picks the Pallas kernel
of the backend when the shapes suit it, else "xla_gather"; on a Hopper GPU, "mosaic_gpu" where a kv
head of a query group carries WGMMA_MIN_ROWS to WGMMA_MAX_ROWS query rows (`resolve_implementation`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focus_jax.kernels import devices, partition
from focus_jax.kernels.sparse import common
from focus_jax.kernels.sparse import gpu as _gpu
from focus_jax.kernels.sparse import mosaic_gpu as _mgpu
from focus_jax.kernels.sparse import tpu as _tpu
from focus_jax.kernels.sparse import xla_gather as _xla
from focus_jax.kernels.sparse.common import Selection, normalize_selection, selection_of_distinct
from focus_jax.kernels.sparse.common import reference_block_sparse_attention

__all__ = ["block_sparse_attention", "block_sparse_attention_normalized", "normalize_selection",
           "selection_of_distinct", "reference_block_sparse_attention", "Selection",
           "IMPLEMENTATIONS", "resolve_implementation"]

IMPLEMENTATIONS = ("auto", "pallas_gpu", "pallas_tpu", "jax_triton", "mosaic_gpu", "xla_gather",
                   "reference")


# Query rows a kv head carries (GQA group x queries) from which "auto" takes the wgmma kernel on a
# Hopper GPU: the split-KV loop is then compute-bound, and Triton's mma runs it at about half the
# rate of wgmma. Dream-7B's 7 heads x 32 slots = 224 rows; at batch 8, 16K (H100, 2026-12-07,
# one call, benchmarks/results/e2e_h100_ab_dream_b8_wgmma_auto.json): the Focus step with 29 of
# 32 slots active 13.37 -> 11.70 ms, the dual cache's step 14.89 -> 12.37 ms, the step with 7
# active 10.72 -> 11.02 ms. The choice is static (the live rows are known only at run time), so
# it is made for the slots. With few rows (MHA: 32) the Triton kernel is as fast or faster
# (kernels/README.md). Up to WGMMA_MAX_ROWS, the most its GPU checks covered (64 queries of a
# 7-head group, benchmarks/kernels.py): Dream's prefix cache (257 queries, 1799 rows) stays on
# Triton. Grouped-query layouts only: it was measured there; MHA reaches 128 rows only in
# LLaDA's prefix cache (256 queries), which was not timed with it.
WGMMA_MIN_ROWS, WGMMA_MAX_ROWS = 128, 448


def resolve_implementation(implementation: str, q_shape, k_shape, dtype, block_size: int) -> str:
  """The implementation "auto" stands for on the current backend (explicit names pass through)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if devices.gpu_at_least() and _gpu.supported(q_shape, k_shape, block_size) is None:
    group = q_shape[2] // k_shape[2]
    rows = q_shape[1] * group
    if (group > 1 and WGMMA_MIN_ROWS <= rows <= WGMMA_MAX_ROWS and devices.is_hopper()
        and _mgpu.supported(q_shape, k_shape, dtype, block_size) is None):
      return "mosaic_gpu"
    return "pallas_gpu"
  if backend == "tpu" and _tpu.supported(q_shape, k_shape, dtype, block_size) is None:
    return "pallas_tpu"
  return "xla_gather"


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
                           block_counts: jax.Array, prompt_start: jax.Array,
                           response_start: jax.Array, response_end: jax.Array,
                           extra_k: jax.Array | None = None, extra_v: jax.Array | None = None,
                           extra_valid: jax.Array | None = None, *, block_size: int,
                           scale: float | None = None, implementation: str = "auto",
                           max_response_len: int | None = None,
                           interpret: bool | object = False,
                           kernel_config: dict | None = None,
                           extra_positions: jax.Array | None = None,
                           distinct_selection: bool = False,
                           query_counts: jax.Array | None = None,
                           dedup_extra: bool = False, return_lse: bool = False):
  """q [B,T,Hq,D], k/v [B,S,Hkv,D], block_indices [B,G,N] (G = 1 or Hkv) -> [B,T,Hq,D] in q.dtype;
  with `return_lse`, (out, lse [B,T,Hq] float32): each row's log-sum-exp of its scaled logits
  over the keys it attended (-inf where none), which `kernels.attention_mass` needs.

  Beyond the contract, all optional: `max_response_len` is a static upper bound on
  response_end - response_start (the XLA path slices a window of that length, the TPU kernel sizes
  its grid by it; without it both assume the whole cache, correct but slower; a bound below a
  row's response cuts it to its first `max_response_len` keys, on every implementation but the
  reference); extra positions outside the cache's rows count as invalid; `interpret` runs a
  Pallas kernel in interpret mode (True, or `pltpu.InterpretParams()` for the TPU kernel);
  `kernel_config` overrides the GPU kernel's tiling (block_m, num_splits, num_warps, num_stages);
  `fused_merge=False` in it merges the splits in XLA instead of the merge kernel (for A/B), and
  `merge_rows`, `merge_d` tile that kernel (`sparse.gpu.merge_to_output`);
  `extra_positions` [B, E] int gives the extra keys as rows of k/v instead of extra_k/extra_v;
  `distinct_selection=True` promises that the first `block_counts` ids are distinct, in range
  and inside the prompt (a top-k over valid prompt blocks), so the dedup of
  `normalize_selection` is skipped (`selection_of_distinct`); the result is the same;
  `query_counts` [B] int: only the first count queries of each row are live (the others are
  padded slots and come back as zeros); `dedup_extra` (with `extra_positions`): rows the
  selection already attends count once.
  """
  common.check_inputs(q, k, v, block_indices, block_counts, prompt_start, response_start,
                      response_end, extra_k, extra_v, extra_valid, block_size, extra_positions,
                      query_counts, dedup_extra)
  impl = resolve_implementation(implementation, q.shape, k.shape, q.dtype, block_size)
  scale_f = common.default_scale(scale, q.shape[-1])
  if impl == "reference":
    return reference_block_sparse_attention(
        q, k, v, block_indices, block_counts, prompt_start, response_start, response_end,
        extra_k, extra_v, extra_valid, block_size=block_size, scale=scale,
        extra_positions=extra_positions, query_counts=query_counts, dedup_extra=dedup_extra,
        return_lse=return_lse)
  if distinct_selection:
    sel = selection_of_distinct(block_indices, block_counts, prompt_start, response_start,
                                response_end, block_size=block_size, seq_len=k.shape[1])
  else:
    sel = normalize_selection(block_indices, block_counts, prompt_start, response_start,
                              response_end, block_size=block_size, seq_len=k.shape[1])
  return block_sparse_attention_normalized(
      q, k, v, sel, extra_k, extra_v, extra_valid, block_size=block_size, scale=scale_f,
      implementation=impl, max_response_len=max_response_len, interpret=interpret,
      kernel_config=kernel_config, extra_positions=extra_positions, query_counts=query_counts,
      dedup_extra=dedup_extra, return_lse=return_lse)


def block_sparse_attention_normalized(q: jax.Array, k: jax.Array, v: jax.Array, sel: Selection,
                                      extra_k: jax.Array | None = None,
                                      extra_v: jax.Array | None = None,
                                      extra_valid: jax.Array | None = None, *, block_size: int,
                                      scale: float | None = None, implementation: str = "auto",
                                      max_response_len: int | None = None,
                                      interpret: bool | object = False,
                                      kernel_config: dict | None = None,
                                      extra_positions: jax.Array | None = None,
                                      query_counts: jax.Array | None = None,
                                      dedup_extra: bool = False, return_lse: bool = False):
  """`block_sparse_attention` on a selection already made by `normalize_selection` (or by
  `selection_of_distinct`).

  For callers that normalise once and attend several times, and for timing the kernels alone.
  """
  impl = resolve_implementation(implementation, q.shape, k.shape, q.dtype, block_size)
  if impl == "reference":
    raise ValueError("the reference takes the raw selection: call block_sparse_attention")
  mesh = partition.active_mesh()
  if mesh is not None and impl != "xla_gather":  # a kernel: each device its rows and heads
    def on_device(q, k, v, sel, extra_k, extra_v, extra_valid, extra_positions, query_counts):
      return block_sparse_attention_normalized(
          q, k, v, sel, extra_k, extra_v, extra_valid, block_size=block_size, scale=scale,
          implementation=impl, max_response_len=max_response_len, interpret=interpret,
          kernel_config=kernel_config, extra_positions=extra_positions,
          query_counts=query_counts, dedup_extra=dedup_extra, return_lse=return_lse)

    spec = partition.specs(mesh, batch=q.shape[0], kv_heads=k.shape[2])
    heads = spec("rows", None, "heads", None)
    groups = "heads" if sel.indices.shape[1] > 1 else None  # per kv head, or shared
    sel_spec = Selection(spec("rows", groups, None), spec("rows", groups), spec("rows"),
                         spec("rows"), spec("rows"))
    valid_spec = spec("rows", None, "heads") if getattr(extra_valid, "ndim", 2) == 3 else (
        spec("rows", None))
    out_spec = (heads, spec("rows", None, "heads")) if return_lse else heads
    return partition.per_device(
        on_device, mesh,
        (heads, heads, heads, sel_spec, heads, heads, valid_spec, spec("rows", None),
         spec("rows")), out_spec)(
             q, k, v, sel, extra_k, extra_v, extra_valid, extra_positions, query_counts)
  if max_response_len is not None:  # the bound, once, so that every path attends the same keys
    sel = sel._replace(response_end=jnp.minimum(
        sel.response_end, sel.response_start + int(max_response_len)))
  common.check_dedup_extra(dedup_extra, extra_positions)
  if extra_positions is not None:  # outside the cache: invalid (the reference does the same)
    extra_valid = common.in_cache_extra(extra_positions, extra_valid, k.shape[1])
  if dedup_extra and impl != "pallas_gpu":  # that kernel skips already attended rows itself
    extra_valid = common.drop_attended_extra(
        extra_valid, common.extra_attended(sel, extra_positions, block_size, k.shape[1]),
        k.shape[2])
  if extra_positions is not None and impl not in ("pallas_gpu", "mosaic_gpu"):  # K/V arrays
    extra_k, extra_v = common.gather_rows(k, v, extra_positions)
    extra_positions = None
  scale_f = common.default_scale(scale, q.shape[-1])
  bsz, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  if impl == "xla_gather":
    return _xla.xla_gather_attention(q, k, v, sel, extra_k, extra_v, extra_valid,
                                     block_size=block_size, scale=scale_f,
                                     max_response_len=max_response_len,
                                     query_counts=query_counts, return_lse=return_lse)
  nb = common.num_blocks(s_len, block_size)
  if max_response_len is None:
    n_resp_max = nb
  else:
    n_resp_max = min(nb, -(-int(max_response_len) // block_size) + 1)
  qg = common.group_queries(q, hkv)
  # Response blocks the GPU tilings plan for (a guess of 4 without a static bound).
  n_resp_plan = n_resp_max if max_response_len is not None else 4
  def rows_of(counts):  # queries -> rows of group_queries (query-major)
    return None if counts is None else counts.astype(jnp.int32) * (hq // hkv)

  if impl in ("pallas_gpu", "jax_triton"):
    why = _gpu.supported(q.shape, k.shape, block_size)
    if why:
      raise ValueError(f"{impl} cannot run this: {why}")
    cfg = _gpu.default_config(bsz, hkv, qg.shape[2], sel.indices.shape[2], n_resp_plan)
    cfg.update(kernel_config or {})
    if cfg.get("static_loop"):
      cfg["n_resp_max"] = n_resp_max
    fused_merge = cfg.pop("fused_merge", True)
    merge_cfg = {key: cfg.pop(key) for key in ("merge_rows", "merge_d")
                 if key in cfg}  # the merge kernel's tiling
    if impl == "jax_triton":
      from focus_jax.kernels.sparse import triton_kernel as _triton
      part = _triton.sparse_partial(qg, k, v, sel, block_size=block_size, scale=scale_f, **cfg)
    else:
      gpu_args = dict(block_size=block_size, scale=scale_f, interpret=bool(interpret),
                      extra_positions=extra_positions,
                      extra_valid=extra_valid if extra_positions is not None else None,
                      row_counts=rows_of(query_counts), dedup_extra=dedup_extra, **cfg)
      if fused_merge and extra_k is None:  # nothing to merge on top: one kernel finishes
        return _gpu.sparse_attention(qg, k, v, sel, t=t, hq=hq, dtype=q.dtype,
                                     return_lse=return_lse, **merge_cfg, **gpu_args)
      part = _gpu.sparse_partial(qg, k, v, sel, **gpu_args)
  elif impl == "mosaic_gpu":
    why = _mgpu.supported(q.shape, k.shape, q.dtype, block_size)
    if why:
      raise ValueError(f"mosaic_gpu cannot run this: {why}")
    # The sinks: ceil(E / block) more tiles (planned as items) and a score bias.
    extra = (None if extra_positions is None else
             common.extra_tiles(k, v, extra_positions, extra_valid, block_size))
    n_extra_tiles = 0 if extra is None else extra[0].shape[1] // block_size
    cfg = _mgpu.default_config(bsz, hkv, qg.shape[2], sel.indices.shape[2] + n_extra_tiles,
                               n_resp_plan, d=d, block_size=block_size, **(kernel_config or {}))
    fused_merge = cfg.pop("fused_merge", True)
    mgpu_args = dict(block_size=block_size, scale=scale_f, interpret=interpret,
                     row_counts=rows_of(query_counts), extra=extra, **cfg)
    if fused_merge and extra_k is None:  # nothing to merge on top: Triton's merge finishes
      return _mgpu.sparse_attention(qg, k, v, sel, t=t, hq=hq, dtype=q.dtype,
                                    return_lse=return_lse, **mgpu_args)
    part = _mgpu.sparse_partial(qg, k, v, sel, **mgpu_args)
  else:  # pallas_tpu
    why = _tpu.supported(q.shape, k.shape, q.dtype, block_size)
    if why:
      raise ValueError(f"pallas_tpu cannot run this: {why}")
    part = _tpu.sparse_partial(qg, k, v, sel, block_size=block_size, scale=scale_f,
                               n_resp_blocks=n_resp_max, interpret=interpret)
  parts = [part]
  if extra_k is not None:
    parts.append(common.dense_partial(qg, extra_k, extra_v, extra_valid, scale_f))
  return common.finish(parts, t, query_counts, q.dtype, return_lse)
