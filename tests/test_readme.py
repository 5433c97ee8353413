"""The README's commands, as written, from a clean clone: each exits 0 (short epochs)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_in_one_interpreter

# what makes a README command short here (a key the command sets itself keeps the README's value)
SHORT = {
    # eval.k=0: the test ELBO without the bound and figures, which cost more than the rest of a short
    # run and have tests of their own
    "vae_lightning.train": {
        "trainer.max_epochs": "1",
        "+trainer.limit_train_batches": "5",
        "+trainer.limit_val_batches": "5",
        "eval.k": "0",
    },
    "vae_lightning.eval": {"eval.k": "2"},
}
# ... except what makes a command long: its epochs (2 when it continues a 1-epoch run, longer) and trials
SHORTER = {"trainer.max_epochs": "1", "hydra.sweeper.n_trials": "2"}


def readme_commands() -> list[str]:
    """Every ``python -m vae_lightning...`` line of the README's code blocks, comments removed."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("python -m vae_lightning")]


def shortened(command: str) -> list[str]:
    words = shlex.split(command)
    longer = "ckpt_path=" in command and "ckpt_path=last" not in command
    for i, word in enumerate(words):
        key = word.split("=")[0]
        if key in SHORTER:
            words[i] = f"{key}={'2' if longer and key == 'trainer.max_epochs' else SHORTER[key]}"
    keys = {w.split("=")[0].lstrip("+") for w in words if "=" in w}
    return words + [f"{k}={v}" for k, v in SHORT[words[2]].items() if k.lstrip("+") not in keys]


@pytest.mark.slow
def test_every_readme_command_works_as_written_from_a_clean_clone(tmp_path, mnist_dir):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # what the README's set-up line does: `source .venv/bin/activate` puts the venv first on PATH
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "VAE_DATA_DIR": str(mnist_dir)}
    commands = readme_commands()
    assert len(commands) >= 15 and sum(shlex.split(c)[3] == "-m" for c in commands) >= 2  # sweeps too
    assert {shlex.split(c)[0] for c in commands} == {"python"}
    words = [shortened(c) for c in commands]
    results = run_in_one_interpreter(words, cwd=clone, env=env, python="python")
    assert len(results) == len(commands), results[-1:]
    for command, (code, _, error) in zip(commands, results, strict=True):
        if "trainer.accelerator=gpu" in command and not torch.cuda.is_available():
            assert code == 1 and "no CUDA GPU was found" in error, command
            continue
        assert code == 0, f"{command}\n{error[-3000:]}"
        assert "Traceback" not in error, f"{command}\n{error[-3000:]}"
    first_run = sorted((clone / "logs" / "train" / "runs").iterdir())[0]
    assert (first_run / "metrics.json").is_file() and (first_run / "checkpoints" / "last.ckpt").is_file()
    assert list(clone.glob("logs/eval/**/reconstructions.png"))  # the eval line's figures
