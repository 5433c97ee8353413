"""Threads: what a run is given, and runs side by side that do not spin against each other."""

import os
import subprocess
import sys

import pytest

from vae_lightning.launch import threads_for_this_run, usable_cores


def test_a_run_uses_the_threads_it_is_given(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_for_this_run(3) == 3
    assert threads_for_this_run(None) == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_for_this_run(None) is None  # torch follows the variable itself


# torch's OpenMP threads after a parallel matmul, while the main thread sleeps: the CPU seconds spent
PROBE = """
import time, vae_lightning, torch
torch.set_num_threads(2)
a = torch.rand(512, 512)
a @ a
before = time.process_time()
time.sleep(0.5)
print(time.process_time() - before)
"""


def _cpu_seconds_while_idle(wait_policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout)


@pytest.mark.skipif(usable_cores() < 2, reason="needs two cores for two threads")
def test_openmp_threads_sleep_while_they_wait_unless_the_user_chose():
    assert _cpu_seconds_while_idle(None) < 0.05  # the project's default: they sleep
    assert _cpu_seconds_while_idle("ACTIVE") > 0.1  # asked to spin, a thread spins (on a busy machine, part of 0.5 s)
