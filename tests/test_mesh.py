"""Several devices: meshes that would split a head or the batch's rows are refused up front, the
memory check counts a device's share, and the Pallas kernels (sparse attention, splash, Focus's
block selection) run on each device's own rows and heads instead of on gathered copies (4 forced
CPU devices, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh

from focus_jax import presets, sharding
from subprocess_env import cpu_env


def test_check_mesh_refuses_split_heads_and_rows():
  dream = presets.preset("dream_7b")  # 28 query heads on 4 kv heads
  sharding.check_mesh(dream, AbstractMesh((2, 4), sharding.MESH_AXES), batch=4)
  with pytest.raises(ValueError, match=r"model=8 must divide .* kv heads \(4\).*in \[1, 2, 4\]"):
    sharding.check_mesh(dream, AbstractMesh((1, 8), sharding.MESH_AXES))
  with pytest.raises(ValueError, match="batch 1 is not a multiple of the mesh's data=2"):
    sharding.check_mesh(dream, AbstractMesh((2, 1), sharding.MESH_AXES), batch=1)


_PER_DEVICE = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
assert jax.device_count() == 4, jax.devices()
import focus_jax
from focus_jax import pipeline, sharding
from focus_jax.kernels import dense_attention, sparse_attention as sa
from focus_jax.kernels.sparse import tpu

mesh = sharding.make_mesh(data=2, model=2)
rng = np.random.default_rng(0)
b, t, s, hq, hkv, d, block = 2, 8, 256, 4, 2, 128, 64
q = jnp.asarray(rng.normal(size=(b, t, hq, d)), jnp.float32)
k = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32)
v = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32)
heads = NamedSharding(mesh, P("data", None, "model", None))
q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
seen = []

# The sparse kernel (TPU's, interpreted): per kv head selections, sinks, live-query counts.
partial = tpu.sparse_partial
def recording(qg, k, *args, **kw):
  seen.append(("sparse", qg.shape, k.shape))
  return partial(qg, k, *args, **kw)
tpu.sparse_partial = recording
ids = jnp.asarray(rng.integers(0, 3, size=(b, hkv, 2)), jnp.int32)
counts = jnp.asarray([[2, 1], [1, 2]], jnp.int32)
ranges = (jnp.zeros((b,), jnp.int32), jnp.full((b,), 192, jnp.int32), jnp.full((b,), s, jnp.int32))
sinks = jnp.asarray([[0, 5], [200, 7]], jnp.int32)
live = jnp.asarray([8, 5], jnp.int32)
args = (q, k, v, ids, counts, *ranges)
sink_valid = jnp.asarray([[[True, True], [True, False]], [[True, False], [True, True]]])
kw = dict(block_size=block, extra_positions=sinks, extra_valid=sink_valid, query_counts=live)
want = sa.block_sparse_attention(*args, implementation="reference", **kw)
with jax.set_mesh(mesh):
  got = jax.jit(lambda *a: sa.block_sparse_attention(
      *a, implementation="pallas_tpu", interpret=True, **kw))(*args)
np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
assert seen == [("sparse", (1, hkv // 2, t * hq // hkv, d), (1, s, 1, d))], seen

# Focus's fused block selection (Triton's kernel, interpreted): each device its rows, kv heads.
from focus_jax.kernels import block_relevance as br
select = br.select_top_blocks_pallas
def recording_select(q, *args, **kw):
  seen.append(("select", q.shape, args[2].shape))
  return select(q, *args, **kw)
br.select_top_blocks_pallas = recording_select
reps = jax.device_put(jnp.asarray(rng.normal(size=(b, hkv, 16, d)), jnp.float32),
                      NamedSharding(mesh, P("data", "model", None, None)))
weight = jnp.asarray(rng.random((b, t)), jnp.float32)
block_ok = jnp.arange(16)[None, :] < jnp.asarray([16, 11])[:, None]
sel_kw = dict(keep=4, bound=False, live_queries=live, return_relevance=True,
              row_keep=jnp.asarray([4, 2], jnp.int32))  # row 1 capped below keep
w_live = jnp.where(jnp.arange(t)[None, :] < live[:, None], weight, 0.0)
want_ids, want_n, want_rel = br.select_top_blocks(q, w_live, reps, block_ok, **sel_kw)
with jax.set_mesh(mesh):
  ids_, n_, rel_ = jax.jit(lambda *a: br.select_top_blocks(
      *a, implementation="pallas_gpu", interpret=True, **sel_kw))(q, w_live, reps, block_ok)
np.testing.assert_array_equal(np.asarray(n_), np.asarray(want_n))
assert (np.asarray(n_)[1] == 2).all()
for r, cap in enumerate((4, 2)):  # the kept ids (entries past the count are unspecified)
  np.testing.assert_array_equal(np.sort(np.asarray(ids_)[r, :, :cap], -1),
                                np.sort(np.asarray(want_ids)[r, :, :cap], -1))
np.testing.assert_allclose(np.asarray(rel_), np.asarray(want_rel), atol=1e-5, rtol=1e-5)
assert seen[-1] == ("select", (1, t, hq // 2, d), (1, hkv // 2, 16, d)), seen

# Splash attention (interpreted) for a refresh, pad keys masked.
splash = dense_attention.splash_attention
def recording_splash(q, k, *args, **kw):
  seen.append(("splash", q.shape, k.shape))
  return splash(q, k, *args, **kw)
dense_attention.splash_attention = recording_splash
qs = jax.device_put(jnp.asarray(rng.normal(size=(b, s, hq, d)), jnp.float32), heads)
valid = jnp.arange(s)[None, :] >= jnp.asarray([0, 70])[:, None]
want = dense_attention.xla_attention(qs, k, v, key_valid=valid)
with jax.set_mesh(mesh):
  got = jax.jit(lambda *a: dense_attention.attention(*a, implementation="splash"))(
      qs, k, v, valid)
rows = np.asarray(valid)  # pad query rows are unspecified
np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5, rtol=2e-5)
assert seen[-1] == ("splash", (1, s, hq // 2, d), (1, s, hkv // 2, d)), seen
# Heads folded into the rows (one kv head, as selected prompt blocks call it): rows split only.
qf, kf, vf = (x.reshape(b * hkv, s, -1, d) for x in (qs, k, v))
want = dense_attention.xla_attention(qf, kf, vf)
with jax.set_mesh(mesh):
  got = jax.jit(lambda *a: dense_attention.attention(*a, implementation="splash"))(qf, kf, vf)
np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
assert seen[-1] == ("splash", (b * hkv // 2, s, hq // hkv, d), (b * hkv // 2, s, 1, d)), seen

# A whole generation on the mesh; a batch the data axis does not divide is refused.
model = focus_jax.load("tiny", mesh=mesh)
out = pipeline.generate_ids(model, np.ones((2, 128), np.int32), None, mode="focus",
                            gen_length=32, steps=32, block_length=16,
                            decoding_options={"l_dense": 2, "prompt_block_size": 16})
assert out.tokens.shape == (2, 32) and not (out.tokens == model.config.mask_token_id).any()
try:
  pipeline.generate_ids(model, np.ones((1, 128), np.int32), None, mode="focus", gen_length=32)
except ValueError as e:
  assert "data=2" in str(e), e
else:
  raise AssertionError("batch 1 on data=2 was not refused")
try:
  focus_jax.load("tiny", mesh=sharding.make_mesh(data=1, model=3))
except ValueError as e:
  assert "model=3 must divide" in str(e), e
else:
  raise AssertionError("model=3 over 4 heads was not refused")
print("ok")
"""


def test_kernels_run_per_device_under_a_mesh():
  env = cpu_env(4)
  out = subprocess.run([sys.executable, "-c", _PER_DEVICE], capture_output=True, text=True,
                       env=env, timeout=900)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-4000:]
