"""Test-session settings, set before JAX starts its backend in any worker or subprocess.

XLA:CPU compiles the suite's many small programs without LLVM's optimisation passes
(`--xla_backend_optimization_level=0`): the same programs, the same results, about a third less
compile time, which is most of this suite's time on a CPU. Subprocesses inherit it through the
environment (`subprocess_env.cpu_env`)."""

from __future__ import annotations

import os

from subprocess_env import FAST_COMPILE

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # unless set
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
