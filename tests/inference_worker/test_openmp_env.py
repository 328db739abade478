"""The worker sets libgomp's wait policy before llama.cpp loads, and a user's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import inference_worker, os, llama_cpp; "
         "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])")


def _probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_worker_package_sets_the_wait_policy_before_llama_cpp_loads():
    assert _probe() == "ACTIVE 300000"


def test_a_users_own_openmp_settings_win():
    assert _probe(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="0") == "PASSIVE 0"
