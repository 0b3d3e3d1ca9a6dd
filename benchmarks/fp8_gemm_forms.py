"""Which way of writing an fp8 GEMM does XLA turn into cuBLASLt's fp8 GEMM on this GPU?

Run on the GPU (after `source benchmarks/gpu_env.sh`):

    python3 benchmarks/fp8_gemm_forms.py        # JSON to $OUT/fp8_gemm_forms.json

One 32K refresh projection, LLaDA-8B's fused q|k|v ([33024, 4096] x [4096, 12288], bf16), in
each form: the custom calls in the compiled HLO (`__cublas$lt$matmul$f8` is the fp8 GEMM), the
median of 5 timed calls (quantisation included) and the error of the first 256 rows against a
float32 product. `matmul.fp8_matmul` uses the form that wins here ("direct").
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from focus_jax.kernels import fp8

ROWS, K, N = 33024, 4096, 12288
DOT = (((1,), (0,)), ((), ()))


def _quantised(x, w):
  return fp8.quantize(x, power_of_two=True), fp8.quantize(w, power_of_two=True)


def converted_and_scaled(x, w, barrier=True):
  """XLA's documented pattern: convert(e4m3) * scalar -> dot (in x's dtype)."""
  (x8, dx), (w8, dw) = _quantised(x, w)
  if barrier:  # (without it XLA drops the e4m3 round trip: a plain bf16 product)
    x8, w8 = jax.lax.optimization_barrier((x8, w8))
  return (x8.astype(x.dtype) * dx.astype(x.dtype)) @ (w8.astype(x.dtype) * dw.astype(x.dtype))


def direct(x, w, out_dtype=jnp.bfloat16):
  """The dot takes the e4m3 arrays; the scales multiply its output."""
  (x8, dx), (w8, dw) = _quantised(x, w)
  out = jax.lax.dot_general(x8, w8, DOT, preferred_element_type=out_dtype)
  return (out * (dx * dw).astype(out_dtype)).astype(x.dtype)


FORMS = {
    "bf16": lambda x, w: x @ w,
    "converted_and_scaled": converted_and_scaled,
    "converted_and_scaled_no_barrier": lambda x, w: converted_and_scaled(x, w, barrier=False),
    "direct_f32_out": lambda x, w: direct(x, w, jnp.float32),
    "direct_bf16_out": direct,
}
# The fp8 GEMM alone, on operands quantised beforehand (no error: its inputs are not x, w).
PREQUANTISED = "prequantised_gemm"


def main():
  x = jax.random.normal(jax.random.PRNGKey(0), (ROWS, K), jnp.float32).astype(jnp.bfloat16)
  w = (0.02 * jax.random.normal(jax.random.PRNGKey(1), (K, N))).astype(jnp.bfloat16)
  ref = x[:256].astype(jnp.float32) @ w.astype(jnp.float32)
  rows = []
  x8, w8 = fp8.quantize(x, power_of_two=True)[0], fp8.quantize(w, power_of_two=True)[0]
  gemm_alone = lambda a, b: jax.lax.dot_general(a, b, DOT, preferred_element_type=jnp.bfloat16)
  for name, fn in [*FORMS.items(), (PREQUANTISED, gemm_alone)]:
    args = (x8, w8) if name == PREQUANTISED else (x, w)
    jitted = jax.jit(fn)
    hlo = jitted.lower(*args).compile().as_text()
    calls = sorted({line.split('custom_call_target="')[1].split('"')[0]
                    for line in hlo.splitlines() if 'custom_call_target="' in line})
    out = jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(jitted(*args))
      times.append(time.perf_counter() - t0)
    t = sorted(times)[2]
    err = None if name == PREQUANTISED else float(
        jnp.linalg.norm(out[:256].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    row = dict(form=name, ms=t * 1e3, tflops=2.0 * ROWS * K * N / t / 1e12, rel_err=err,
               custom_calls=calls)
    print(row, flush=True)
    rows.append(row)
  path = os.path.join(os.environ.get("OUT", "."), "fp8_gemm_forms.json")
  with open(path, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                   shape=[ROWS, K, N], rows=rows), f, indent=1)
  print(f"{'form':34s} {'ms':>7s} {'TFLOP/s':>8s} {'rel err':>8s}  custom calls")
  for r in rows:
    err = "-" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
    print(f"{r['form']:34s} {r['ms']:7.2f} {r['tflops']:8.0f} {err:>8s}  "
          f"{','.join(r['custom_calls'])}")


if __name__ == "__main__":
  main()
