"""The README's commands, as written, from a clean clone: each exits 0 (short epochs)."""

import json
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


# Runs README commands one after the other in one interpreter, each as ``python -m`` runs it (runpy,
# with its argv), so that torch and Lightning are imported once, not once a command (9 s each here).
# A command's exit code and output are framed by the markers. <run> is the first run of the clone.
DRIVER = """
import json, runpy, sys
from pathlib import Path
from hydra.core.global_hydra import GlobalHydra
for words in json.loads(sys.argv[1]):
    if any("<run>" in w for w in words):
        words = [w.replace("<run>", sorted(Path("logs/train/runs").iterdir())[0].name) for w in words]
    print("@@ start", json.dumps(words), flush=True)
    print("@@ start", file=sys.stderr, flush=True)
    sys.argv = [words[2], *words[3:]]
    try:
        runpy.run_module(words[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    GlobalHydra.instance().clear()
    print("@@ exit", code, flush=True)
"""


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
    result = subprocess.run(
        ["python", "-c", DRIVER, json.dumps(words)], cwd=clone, env=env, capture_output=True, text=True, timeout=1500
    )
    outputs = result.stdout.split("@@ start ")[1:]
    errors = result.stderr.split("@@ start")[1:]
    assert len(outputs) == len(commands), result.stderr[-3000:]
    for command, output, error in zip(commands, outputs, errors, strict=True):
        code = int(output.rsplit("@@ exit ", 1)[1].split()[0])
        if "trainer.accelerator=gpu" in command and not torch.cuda.is_available():
            assert code == 1 and "no CUDA GPU was found" in error, command
            continue
        assert code == 0, f"{command}\n{error[-3000:]}"
        assert "Traceback" not in error, f"{command}\n{error[-3000:]}"
    first_run = sorted((clone / "logs" / "train" / "runs").iterdir())[0]
    assert (first_run / "metrics.json").is_file() and (first_run / "checkpoints" / "last.ckpt").is_file()
    assert list(clone.glob("logs/eval/**/reconstructions.png"))  # the eval line's figures
