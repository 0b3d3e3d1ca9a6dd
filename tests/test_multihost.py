"""Several hosts (a TPU pod slice, GPU nodes): two CPU processes of two devices each, joined by
jax.distributed, run main.py over one 2 x 2 mesh of all four devices. They decode the texts one
process with four devices decodes, only the first prints, and prompts or seeds that differ
between the processes are refused instead of decoding a mix of their rows, as is a mesh that
leaves some of the devices out; the trained demo checkpoint loads onto both hosts' devices; prompts
given as a `jax.Array` spread over the hosts decode as the same prompts given whole."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from subprocess_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/tiny.py", "--config.modes=('focus',)", "--config.gen_length=32",
         "--config.steps=32", "--config.mesh.data=2", "--config.mesh.model=2",
         "--config.prompts=('What is the capital of France?', 'Hi')"]


def _env(devices: int) -> dict:
  return cpu_env(devices, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_hosts(per_process_flags, flags=FLAGS) -> list[subprocess.CompletedProcess]:
  port = _free_port()
  return _run_processes(lambda i: [
      sys.executable, "main.py", *flags, "--config.distributed.initialize=True",
      f"--config.distributed.coordinator_address=localhost:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
      *per_process_flags(i)])


def _run_processes(command) -> list[subprocess.CompletedProcess]:
  """Runs command(i) for processes 0 and 1 at once (2 CPU devices each); their results."""
  procs = [subprocess.Popen(command(i), cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return out


def _texts(stdout: str) -> list[str]:
  """The decoded rows main.py prints (timings differ run to run)."""
  return [line for line in stdout.splitlines() if line.startswith("'")]


def test_two_hosts_decode_what_one_host_decodes():
  one = subprocess.run([sys.executable, "main.py", *FLAGS], cwd=ROOT, env=_env(4),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  first, second = _two_hosts(lambda i: [])
  assert first.returncode == 0 and second.returncode == 0, (first.stderr[-3000:],
                                                              second.stderr[-3000:])
  assert len(_texts(one.stdout)) == 2
  assert _texts(first.stdout) == _texts(one.stdout)
  assert "=== focus ===" in first.stdout
  # (gloo's own connection lines, from its threads, reach stdout on every process)
  assert not any(said in second.stdout for said in ("model:", "=== focus", "tokens/s", "'")), (
      second.stdout)


def test_hosts_with_different_inputs_are_refused():
  results = _two_hosts(lambda i: [f"--config.seed={i}"])
  for result in results:
    assert result.returncode != 0
  assert any("seed differs between the 2 processes" in r.stderr for r in results), (
      results[0].stderr[-3000:])
  # Prompts of other lengths (another padded shape on each process) are told apart too.
  results = _two_hosts(lambda i: [f"--config.prompts=('{'word ' * (1 + 40 * i)}', 'Hi')"])
  for result in results:
    assert result.returncode != 0 and "prompt differs between the 2 processes" in result.stderr, (
        result.stderr[-3000:])
  # A mesh of some of the hosts' devices (here one host's two) cannot run on every process.
  results = _two_hosts(lambda i: ["--config.mesh.data=1"])
  for result in results:
    assert result.returncode != 0 and "set data x model = 4" in result.stderr, (
        result.stderr[-3000:])


def test_two_hosts_read_the_demo_checkpoint_and_answer():
  """main.py's default: each process reads the trained demo model (a Hugging Face directory)
  onto its devices of the mesh; both modes answer the generated question in both rows."""
  first, second = _two_hosts(lambda i: [], flags=[
      "--config.task_prompt_length=496", "--config.seed=3", "--config.batch_size=2",
      "--config.mesh.data=2", "--config.mesh.model=2", "--config.time_split=False"])
  assert first.returncode == 0 and second.returncode == 0, (first.stderr[-3000:],
                                                              second.stderr[-3000:])
  assert first.stdout.count("correct: yes") == 2, first.stdout[-3000:]


_SPREAD_INPUTS = r"""
import sys
import numpy as np
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import focus_jax
from focus_jax import pipeline, sharding
mesh = sharding.make_mesh(data=2, model=2)
model = focus_jax.load("tiny", mesh=mesh)
prompt = np.random.default_rng(0).integers(5, 200, (2, 64)).astype(np.int32)
mask = np.ones((2, 64), bool)
mask[1, :10] = False  # row 1 left-padded
kw = dict(mode="focus", gen_length=32, steps=32, block_length=16,
          decoding_options={"l_dense": 2, "prompt_block_size": 16})
whole = pipeline.generate_ids(model, prompt, mask, **kw).tokens
rows = NamedSharding(mesh, P("data"))
spread = [jax.make_array_from_callback(x.shape, rows, lambda i, x=x: x[i]) for x in (prompt, mask)]
assert not spread[0].is_fully_addressable
got = pipeline.generate_ids(model, *spread, **kw).tokens
np.testing.assert_array_equal(got, whole)
assert (whole != model.config.mask_token_id).all()
print("ok", pid)
"""


def test_prompts_spread_over_the_hosts_decode_as_whole_prompts():
  port = _free_port()
  results = _run_processes(lambda i: [sys.executable, "-c", _SPREAD_INPUTS, str(i), str(port)])
  for i, result in enumerate(results):
    assert result.returncode == 0 and f"ok {i}" in result.stdout, result.stderr[-3000:]
