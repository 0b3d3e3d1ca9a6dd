"""The HF -> Orbax converter and the loaders: exactness, validation, atomicity, CLI, sharding."""

from __future__ import annotations

import glob
import json
import os
import stat
import subprocess
import sys
import textwrap

import hf_fixtures as hf
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from focus_jax import sharding as sharding_lib
from focus_jax.checkpoints_convert import (CheckpointMismatchError, SafetensorsError,
                                           convert_hf_checkpoint, load_checkpoint, load_hf,
                                           load_model)
from focus_jax.checkpoints_convert import convert as conv
from focus_jax.checkpoints_convert import safetensors_io as st
from focus_jax.models import Transformer
from focus_jax.models.config import llada_8b
from focus_jax.models.param_map import hf_tensor_specs
from subprocess_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def llada_bf16(tmp_path_factory):
  """A tiny LLaDA checkpoint stored in bf16 (as the released ones are) with a tokenizer."""
  model = hf.llada_oracle(seed=3)
  src = str(tmp_path_factory.mktemp("llada_bf16_hf"))
  hf.write_hf_checkpoint(model, "llada", src, dtype=torch.bfloat16)
  hf.write_tokenizer(src, "llada")
  return model, src


def _bits(x) -> np.ndarray:
  return np.asarray(x).view(np.uint16)


def _sorted_tensors(d: str) -> list[str]:
  return sorted(os.path.relpath(p, d) for p in glob.glob(os.path.join(d, "*")))


def test_reader_matches_safetensors_and_torch(tmp_path):
  """Header parsing, dtypes, chunked reads and chunked transposes against the reference writer."""
  gen = torch.Generator().manual_seed(0)
  tensors = {"a": torch.randn(37, 11, generator=gen).to(torch.bfloat16),
             "b": torch.randn(5, 3, 2, generator=gen).to(torch.float16),
             "c": torch.randn(13, generator=gen), "d": torch.tensor(2.5)}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  index = st.index_hf_dir(str(tmp_path))
  assert {n: (i.dtype, i.shape) for n, i in index.items()} == {
      "a": ("BF16", (37, 11)), "b": ("F16", (5, 3, 2)), "c": ("F32", (13,)), "d": ("F32", ())}
  for chunk in (1, 40, 1 << 20):  # one row per chunk, a few rows, everything at once
    a = st.read_tensor(index["a"], chunk_bytes=chunk)
    assert a.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(_bits(a), tensors["a"].view(torch.int16).numpy().view(np.uint16))
    at = st.read_tensor(index["a"], np.float32, transpose=True, chunk_bytes=chunk)
    np.testing.assert_array_equal(at, tensors["a"].float().numpy().T)
    np.testing.assert_array_equal(st.read_tensor(index["b"], np.float32, chunk_bytes=chunk),
                                  tensors["b"].float().numpy())
  np.testing.assert_array_equal(st.read_tensor(index["c"]), tensors["c"].numpy())
  assert st.read_tensor(index["d"], np.float32) == np.float32(2.5)


def test_reader_rejects_truncated_file(tmp_path):
  save_file({"w": torch.ones(64, 64)}, str(tmp_path / "model.safetensors"))
  path = tmp_path / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(SafetensorsError, match="truncated"):
    st.index_hf_dir(str(tmp_path))


def test_convert_bf16_is_bit_exact(llada_bf16, tmp_path):
  """bf16 -> bf16: every parameter is the HF tensor (transposed for Linear), bit for bit."""
  model, src = llada_bf16
  out = convert_hf_checkpoint(src, str(tmp_path / "ckpt"), progress=False)
  config, params = load_checkpoint(out)
  assert config.dtype == "bfloat16" and config.family == "llada"
  reference = jax.eval_shape(lambda: Transformer(config).init_params(jax.random.key(0)))
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), reference)
  state = hf.hf_state(model, "llada")
  for spec in hf_tensor_specs(config):
    want = state[spec.hf_name].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = params
    for key in spec.path:
      got = got[key]
    np.testing.assert_array_equal(_bits(got), want.T if spec.transpose else want,
                                  err_msg=spec.hf_name)


def test_output_layout_tokenizer_and_config(llada_bf16, tmp_path):
  _, src = llada_bf16
  out = convert_hf_checkpoint(src, str(tmp_path / "ckpt"), dtype="float32", progress=False)
  files = set(os.listdir(out))
  assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          conv.MANIFEST, conv.CONFIG_FILE, conv.PARAMS_DIR} <= files
  assert not any(f.endswith(".safetensors") for f in files)
  manifest = json.load(open(os.path.join(out, conv.MANIFEST)))
  assert manifest["dtype"] == "float32"
  assert manifest["parts"] == ["embed", "layers_0", "layers_1", "final_norm", "lm_head"]
  config = conv.read_config(out)
  assert (config.n_layers, config.d_model, config.dtype) == (2, 64, "float32")
  # A stored float32 checkpoint can be restored as bf16, cast on restore.
  config16, params16 = load_checkpoint(out, dtype="bfloat16")
  assert config16.dtype == "bfloat16"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params16))
  # No temp dirs are left next to the output.
  assert os.listdir(tmp_path) == ["ckpt"]
  # Readable as a directory made by mkdir would be (the temp dir it was renamed from is 0700).
  mask = os.umask(0o022)
  os.umask(mask)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~mask


def test_output_is_on_disk_before_the_rename_publishes_it(llada_bf16, tmp_path, monkeypatch,
                                                          caplog):
  """Every file of the conversion is fsynced before the rename makes it the output, and the
  parent directory after it; a killed run's temp directory is reported, not removed."""
  _, src = llada_bf16
  out = str(tmp_path / "ckpt")
  os.makedirs(tmp_path / ".ckpt.tmp-killed")
  events = []
  fsync, rename = conv._fsync_path, os.rename  # pylint: disable=protected-access

  def record_fsync(path):
    events.append(("fsync", os.path.relpath(path, tmp_path)))
    fsync(path)

  def record_rename(a, b):
    events.append(("rename", os.path.relpath(b, tmp_path)))
    rename(a, b)

  monkeypatch.setattr(conv, "_fsync_path", record_fsync)
  monkeypatch.setattr(os, "rename", record_rename)
  with caplog.at_level("WARNING"):
    convert_hf_checkpoint(src, out, dtype="float32", progress=False)
  assert ".ckpt.tmp-killed" in caplog.text and os.path.isdir(tmp_path / ".ckpt.tmp-killed")
  publish = events.index(("rename", "ckpt"))
  synced = {p.split(os.sep, 1)[1] for kind, p in events[:publish]
            if kind == "fsync" and os.sep in p}
  assert {conv.MANIFEST, conv.CONFIG_FILE} <= synced
  assert any(p.startswith(conv.PARAMS_DIR + os.sep) and p.count(os.sep) >= 2 for p in synced)
  assert ("fsync", ".") in events[publish:]


def test_output_appearing_during_conversion_is_not_replaced(llada_bf16, tmp_path, monkeypatch):
  _, src = llada_bf16
  out = str(tmp_path / "ckpt")
  write = conv._write_into  # pylint: disable=protected-access

  def write_while_another_appears(*args, **kwargs):
    write(*args, **kwargs)
    os.makedirs(os.path.join(out, "theirs"))

  monkeypatch.setattr(conv, "_write_into", write_while_another_appears)
  with pytest.raises(FileExistsError, match="appeared during the conversion"):
    convert_hf_checkpoint(src, out, dtype="float32", progress=False)
  assert os.listdir(out) == ["theirs"] and os.listdir(tmp_path) == ["ckpt"]


def test_refuses_to_overwrite_unless_asked(llada_bf16, tmp_path):
  _, src = llada_bf16
  out = str(tmp_path / "ckpt")
  convert_hf_checkpoint(src, out, dtype="float32", progress=False)
  with pytest.raises(FileExistsError, match="overwrite"):
    convert_hf_checkpoint(src, out, progress=False)
  assert conv.read_config(out).dtype == "float32"
  convert_hf_checkpoint(src, out, dtype="bfloat16", overwrite=True, progress=False)
  assert conv.read_config(out).dtype == "bfloat16"
  assert load_model(out)[0].dtype == "bfloat16"
  assert os.listdir(tmp_path) == ["ckpt"]


def test_refuses_to_replace_its_own_source(llada_bf16):
  _, src = llada_bf16
  for out in (src, os.path.dirname(src)):
    with pytest.raises(ValueError, match="would replace the HF checkpoint"):
      convert_hf_checkpoint(src, out, overwrite=True, progress=False)
  assert os.path.exists(os.path.join(src, "config.json"))


def _broken_checkpoint(src: str, dst: str) -> None:
  """A copy of `src` with one tensor missing, two unexpected, one mis-shaped, one int."""
  state = {n: t.clone() for n, t in hf.hf_state(hf.llada_oracle(seed=3), "llada").items()}
  del state["model.transformer.blocks.1.up_proj.weight"]
  state["model.transformer.blocks.0.attn_out.bias"] = torch.zeros(64)
  state["model.transformer.blocks.7.q_proj.weight"] = torch.zeros(64, 64)
  state["model.transformer.blocks.0.k_proj.weight"] = torch.zeros(32, 64)
  state["model.transformer.ln_f.weight"] = torch.ones(64, dtype=torch.int32)
  state["model.transformer.blocks.0.rotary_emb.inv_freq"] = torch.ones(8)  # ignored buffer
  config = json.load(open(os.path.join(src, "config.json")))
  hf.write_sharded(state, config, dst)


def test_validation_names_every_problem_before_writing(llada_bf16, tmp_path):
  _, src = llada_bf16
  bad = str(tmp_path / "bad_hf")
  _broken_checkpoint(src, bad)
  out = tmp_path / "out"
  for load in (lambda: convert_hf_checkpoint(bad, str(out), progress=False),
               lambda: load_hf(bad), lambda: load_model(bad)):
    with pytest.raises(CheckpointMismatchError) as err:
      load()
    msg = str(err.value)
    assert "1 missing:" in msg and "model.transformer.blocks.1.up_proj.weight" in msg
    assert "2 unexpected:" in msg
    assert "model.transformer.blocks.0.attn_out.bias" in msg
    assert "model.transformer.blocks.7.q_proj.weight" in msg
    assert ("model.transformer.blocks.0.k_proj.weight: checkpoint [32, 64], config expects "
            "[64, 64]") in msg
    assert "model.transformer.ln_f.weight: I32" in msg
    assert "inv_freq" not in msg
  assert sorted(os.listdir(tmp_path)) == ["bad_hf"]  # nothing was written


def test_index_pointing_at_missing_shard(llada_bf16, tmp_path):
  _, src = llada_bf16
  bad = tmp_path / "hf"
  hf.write_hf_checkpoint(hf.llada_oracle(seed=3), "llada", str(bad))
  os.remove(bad / "model-00002-of-00002.safetensors")
  with pytest.raises(SafetensorsError, match="model-00002-of-00002.safetensors"):
    convert_hf_checkpoint(str(bad), str(tmp_path / "out"), progress=False)


def test_exception_midway_leaves_nothing(llada_bf16, tmp_path, monkeypatch):
  """An error after some parts were written: no output, no temp dir, the old output untouched."""
  _, src = llada_bf16
  out = str(tmp_path / "ckpt")
  calls = {"n": 0}
  real = st.read_tensor

  def flaky(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 12:  # inside layers_1, after embed and layers_0 were saved
      raise KeyboardInterrupt("simulated interruption")
    return real(*args, **kwargs)

  monkeypatch.setattr(st, "read_tensor", flaky)
  with pytest.raises(KeyboardInterrupt):
    convert_hf_checkpoint(src, out, progress=False)
  assert os.listdir(tmp_path) == []
  # Same with an existing output and overwrite=True: the old checkpoint survives intact.
  monkeypatch.setattr(st, "read_tensor", real)
  convert_hf_checkpoint(src, out, dtype="float32", progress=False)
  calls["n"] = 0
  monkeypatch.setattr(st, "read_tensor", flaky)
  with pytest.raises(KeyboardInterrupt):
    convert_hf_checkpoint(src, out, overwrite=True, progress=False)
  assert os.listdir(tmp_path) == ["ckpt"]
  assert load_checkpoint(out)[0].dtype == "float32"


def test_failed_final_rename_restores_old_output(llada_bf16, tmp_path, monkeypatch):
  _, src = llada_bf16
  out = str(tmp_path / "ckpt")
  convert_hf_checkpoint(src, out, dtype="float32", progress=False)
  real_rename = os.rename

  def rename(a, b):
    if os.path.basename(str(a)).startswith(".ckpt.tmp-") and str(b) == out:
      raise OSError("simulated rename failure")
    return real_rename(a, b)

  monkeypatch.setattr(conv.os, "rename", rename)
  with pytest.raises(OSError, match="simulated"):
    convert_hf_checkpoint(src, out, overwrite=True, progress=False)
  assert os.listdir(tmp_path) == ["ckpt"]
  assert load_checkpoint(out)[0].dtype == "float32"


def test_killed_conversion_never_loads(llada_bf16, tmp_path):
  """A conversion killed outright (SIGKILL, no cleanup runs): the target does not exist and the
  leftover temp dir, which already holds Orbax parts, is refused by every loader."""
  _, src = llada_bf16
  out = tmp_path / "ckpt"
  script = textwrap.dedent(f"""
      import os, signal
      from focus_jax.checkpoints_convert import convert_hf_checkpoint
      from focus_jax.checkpoints_convert import safetensors_io as st
      real, n = st.read_tensor, [0]
      def killing(*a, **k):
        n[0] += 1
        if n[0] == 12:
          os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
      st.read_tensor = killing
      convert_hf_checkpoint({src!r}, {str(out)!r}, progress=False)
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert proc.returncode == -9, proc.stderr
  assert not out.exists()
  (leftover,) = os.listdir(tmp_path)
  leftover = str(tmp_path / leftover)
  assert leftover.startswith(str(tmp_path / ".ckpt.tmp-"))
  assert os.path.isdir(os.path.join(leftover, conv.PARAMS_DIR, "layers_0"))
  with pytest.raises(FileNotFoundError, match="interrupted conversion"):
    load_checkpoint(leftover)
  with pytest.raises(ValueError, match="unfinished conversion"):
    load_model(leftover)


def test_load_model_detection(llada_bf16, tmp_path):
  _, src = llada_bf16
  out = convert_hf_checkpoint(src, str(tmp_path / "ckpt"), progress=False)
  c1, p1 = load_model(out)
  c2, p2 = load_model(src)  # HF dir, default bf16
  assert c1 == c2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), p1, p2)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="neither a converted checkpoint"):
    load_model(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load_model(str(tmp_path / "nope"))


def test_single_file_checkpoint_and_dream(tmp_path):
  """Unsharded model.safetensors (no index), Dream layout with q/k/v biases."""
  model = hf.dream_oracle(seed=5)
  src = tmp_path / "hf"
  hf.write_hf_checkpoint(model, "dream", str(src), n_shards=1)
  os.remove(src / "model.safetensors.index.json")
  os.rename(src / "model-00001-of-00001.safetensors", src / "model.safetensors")
  config, params = load_model(convert_hf_checkpoint(str(src), str(tmp_path / "out"),
                                                    dtype="float32", progress=False))
  assert config.family == "dream" and config.qkv_bias and config.n_kv_heads == 2
  np.testing.assert_array_equal(params["layers_1"]["k_proj"]["bias"],
                                model.model.layers[1].self_attn.k_proj.bias.detach().numpy())
  np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                model.lm_head.weight.detach().numpy().T)


def test_cli(llada_bf16, tmp_path):
  _, src = llada_bf16
  out = tmp_path / "cli_out"
  cmd = [sys.executable, "-m", "focus_jax.checkpoints_convert", f"--hf_dir={src}",
         f"--out_dir={out}", "--dtype=float32", "--noprogress"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert f"-> {out}" in proc.stdout
  assert load_checkpoint(str(out))[0].dtype == "float32"
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert proc.returncode != 0 and "--overwrite" in proc.stderr
  proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr


def test_loaders_shard_over_a_model_axis(llada_bf16, tmp_path):
  """On a 2-device mesh both loaders place every parameter with param_shardings' sharding."""
  _, src = llada_bf16
  out = convert_hf_checkpoint(src, str(tmp_path / "ckpt"), progress=False)
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from focus_jax import sharding as sh
      from focus_jax.checkpoints_convert import load_checkpoint, load_hf
      assert jax.device_count() == 2, jax.devices()
      mesh = sh.make_mesh(data=1, model=2)
      for config, params in (load_checkpoint({out!r}, mesh=mesh), load_hf({src!r}, mesh=mesh)):
        want = sh.param_shardings(config, mesh)
        jax.tree.map(lambda x, s: None if x.sharding.is_equivalent_to(s, x.ndim) else
                     (_ for _ in ()).throw(AssertionError((x.sharding, s))), params, want)
        q = params["layers_0"]["q_proj"]["kernel"]
        assert len(q.addressable_shards) == 2 and q.addressable_shards[0].data.shape == (64, 32)
      print("ok")
      """)
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_sharding_tree_matches_specs():
  """Every spec path exists in param_shardings' tree (the loaders index it by spec path)."""
  cfg = llada_8b()
  shardings = sharding_lib.param_shardings(cfg, sharding_lib.make_mesh())
  for spec in hf_tensor_specs(cfg):
    node = shardings
    for key in spec.path:
      node = node[key]
    assert hasattr(node, "spec"), spec.path


def test_fused_qkv_load_shards_whole_kv_groups(llada_bf16):
  """On a 2-device model axis `load(fused_qkv=True)` places the fused weight with its
  param_shardings sharding (columns split into whole KV-head groups) and computes the same
  logits as the three-weight model."""
  _, src = llada_bf16
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp, numpy as np
      import focus_jax
      from focus_jax import sharding as sh
      from focus_jax.models import forward_logits
      assert jax.device_count() == 2, jax.devices()
      mesh = sh.make_mesh(data=1, model=2)
      fused = focus_jax.load({src!r}, dtype="float32", mesh=mesh, fused_qkv=True)
      plain = focus_jax.load({src!r}, dtype="float32", mesh=mesh)
      w = fused.params["layers_0"]["qkv_proj"]["kernel"]
      want = sh.param_shardings(fused.config, mesh)["layers_0"]["qkv_proj"]["kernel"]
      assert w.sharding.is_equivalent_to(want, 2), (w.sharding, want)
      assert len(w.addressable_shards) == 2
      c = fused.config
      group = (c.q_per_kv + 2) * c.head_dim
      assert w.addressable_shards[0].data.shape[1] % group == 0
      tokens = jnp.arange(24, dtype=jnp.int32)[None] % c.vocab_size
      a = forward_logits(fused.config, fused.params, tokens)
      b = forward_logits(plain.config, plain.params, tokens)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
      print("ok")
      """)
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
