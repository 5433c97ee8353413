"""Threads: what a run is given, and giving way to other work on the machine."""

import subprocess
import sys

import pytest
import torch

from vae_lightning.cores import ShareCores, competing_threads
from vae_lightning.launch import threads_for_this_run, usable_cores


def test_a_run_uses_the_threads_it_is_given(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_for_this_run(3) == 3
    assert threads_for_this_run(None) == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_for_this_run(None) is None  # torch follows the variable itself
    assert not ShareCores(threads=None).active and not ShareCores(threads=2).active


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_threads_give_way_to_other_work_and_take_the_cores_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = ShareCores(threads=None, every_seconds=0)
    assert share.active and competing_threads() is not None
    idle = max(1, share.cores - competing_threads())  # what the machine leaves this run now
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(share.cores)]
    before = torch.get_num_threads()
    try:
        for _ in range(20):  # two agreeing looks are needed; a busy loop is runnable in every look
            share.adjust()
            if torch.get_num_threads() == 1:
                break
        assert torch.get_num_threads() == 1
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    for _ in range(20):
        share.adjust()
        if torch.get_num_threads() == idle:
            break
    assert torch.get_num_threads() == idle
    torch.set_num_threads(before)
