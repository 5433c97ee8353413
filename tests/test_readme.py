"""The README's commands, as written, from a clean clone: each exits 0 (short epochs)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

# what makes a README command short here (a key the command sets itself keeps the README's value)
SHORT = {
    "vae_lightning.train": {"trainer.max_epochs": "1", "+trainer.limit_train_batches": "5", "eval.k": "2"},
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
    first_run = None
    for command in commands:
        if "<run>" in command:
            command = command.replace("logs/train/runs/<run>", str(first_run))
        words = shortened(command)
        result = subprocess.run(words, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        if "trainer.accelerator=gpu" in command and not torch.cuda.is_available():
            assert result.returncode == 1 and "no CUDA GPU was found" in result.stderr, command
            continue
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, command
        if first_run is None:
            first_run = next((clone / "logs" / "train" / "runs").iterdir())
    assert (first_run / "report.html").is_file()
