"""A Slurm of one machine, for the tests: ``sbatch``, ``srun``, ``sacct``, ``scontrol requeue`` and
``scancel`` as submitit and a job call them, with Slurm's job environment, its signals and its
requeue (the job runs again with ``SLURM_RESTART_COUNT``). ``install`` writes each command into a bin
dir as this file under that command's name; the state (job states, step pids) is files in one dir.

What it does not do: queue (a job starts at once), time limits (a test sends the time-limit signal
itself, as Slurm would ``signal_delay_s`` before the limit), several nodes or tasks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = "FAKE_SLURM_STATE"
COMMANDS = ("sbatch", "srun", "sacct", "scontrol", "scancel")


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """The fake's commands in ``bin_dir``; returns the environment that puts them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {name} "$@"\n')
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STATE: str(state_dir)}


def _state_dir() -> Path:
    return Path(os.environ[STATE])


def _read(job: str) -> dict:
    return json.loads((_state_dir() / f"{job}.json").read_text())


def _write(job: str, **values) -> None:
    path = _state_dir() / f"{job}.json"
    state = {**(json.loads(path.read_text()) if path.exists() else {}), **values}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _job_of(name: str) -> str:
    """The fake's job name (``4242`` or, in an array, ``4242_0``) for that or a SLURM_JOB_ID."""
    for path in _state_dir().glob("*.json"):
        state = json.loads(path.read_text())
        if name in (path.stem, state.get("slurm_job_id")):
            return path.stem
    raise SystemExit(f"slurm_load_jobs error: Invalid job id specified: {name}")


def _step_pid(job: str) -> int | None:
    path = _state_dir() / f"{job}.step"
    return int(path.read_text()) if path.exists() else None


def sbatch(args: list[str]) -> None:
    script = Path(args[-1])
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script.read_text(), re.M))
    counter = _state_dir() / "next_id"
    job_id = int(counter.read_text()) if counter.exists() else 4242
    counter.write_text(str(job_id + 1))
    array = re.match(r"(\d+)-(\d+)", options.get("array", ""))
    tasks = [f"{job_id}_{i}" for i in range(int(array[1]), int(array[2]) + 1)] if array else [str(job_id)]
    for n, job in enumerate(tasks):
        env = {
            "SLURM_JOB_ID": str(job_id + 1000 * n) if array else str(job_id),
            "SLURM_JOB_NAME": options.get("job-name", "job"), "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
            "SLURM_SUBMIT_DIR": os.getcwd(),
        }  # fmt: skip
        if array:
            env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=job.split("_")[1])
        _write(job, state="PENDING", restarts=0, slurm_job_id=env["SLURM_JOB_ID"], env=env, options=options)
        # the job runs in its own session, as on a node: nothing the submitting process does reaches it
        subprocess.Popen(
            [sys.executable, __file__, "_run", job, str(script)],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    print(f"Submitted batch job {job_id}")


def _expand(pattern: str, env: dict[str, str]) -> str:
    array_job, task = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]), env.get("SLURM_ARRAY_TASK_ID", "")
    return pattern.replace("%A", array_job).replace("%a", task).replace("%j", env["SLURM_JOB_ID"]).replace("%t", "0")


def _run(job: str, script: str) -> None:
    """The batch script of ``job``, run again for as long as it is requeued."""
    while True:
        state = _read(job)
        env = {**os.environ, **state["env"]}
        if state["restarts"]:
            env["SLURM_RESTART_COUNT"] = str(state["restarts"])
        log = Path(_expand(state["options"].get("output", f"slurm-{job}.out"), env))
        # submitit moves each task's files into its folder after sbatch returns: a job started at
        # once (no queue here) can be ahead of it, so the log's folder is made here
        log.parent.mkdir(parents=True, exist_ok=True)
        _write(job, state="RUNNING")
        with open(log, "a") as out:
            code = subprocess.call(["bash", script], env=env, stdout=out, stderr=subprocess.STDOUT)
        (_state_dir() / f"{job}.step").unlink(missing_ok=True)
        if (marker := _state_dir() / f"{job}.requeue").exists():
            marker.unlink()
            _write(job, state="PENDING", restarts=state["restarts"] + 1)
            time.sleep(1)  # Slurm holds a requeued job back before it runs again
            continue
        if _read(job)["state"] != "CANCELLED":
            _write(job, state="COMPLETED" if code == 0 else "FAILED", exit_code=code)
        return


def srun(args: list[str]) -> None:
    """Run the step's command in this process (its pid is the step's, for signals), into srun's
    ``--output``/``--error`` files when given."""
    files, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("--output", "--error"):
            files[args[i]] = args[i + 1]
            i += 2
        else:
            i += 1
    env = dict(os.environ)
    job = _job_of(env["SLURM_JOB_ID"])
    (_state_dir() / f"{job}.step").write_text(str(os.getpid()))
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    if "--output" in files:  # (without, the step writes where the batch script does)
        for name in files.values():
            Path(_expand(name, env)).parent.mkdir(parents=True, exist_ok=True)
        os.dup2(os.open(_expand(files["--output"], env), flags), 1)
        os.dup2(os.open(_expand(files["--error"], env), flags) if "--error" in files else 1, 2)
    os.execvp(args[i], args[i:])


def sacct(args: list[str]) -> None:
    wanted = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for path in sorted(_state_dir().glob("*.json")):
        if path.stem.split("_")[0] in wanted:
            print(f"{path.stem}|{json.loads(path.read_text())['state']}|localhost")


def scontrol(args: list[str]) -> None:
    """``scontrol requeue <job>``: the job goes back to the queue, and its running step is sent
    SIGTERM, as Slurm ends a requeued job (and as a pre-emption in PreemptMode=REQUEUE does)."""
    if args[:1] != ["requeue"]:
        raise SystemExit(f"fake scontrol: only 'requeue' is known, not {args}")
    job = _job_of(args[1])
    if _read(job)["state"] != "RUNNING":
        raise SystemExit(f"scontrol: error: Job {args[1]} is not running")
    (_state_dir() / f"{job}.requeue").touch()
    if (pid := _step_pid(job)) is not None:
        os.kill(pid, signal.SIGTERM)


def scancel(args: list[str]) -> None:
    """``scancel [--signal SIG] <job>``: the signal to the job's step, or without one, a cancel."""
    sig, names, i = None, [], 0
    while i < len(args):
        if args[i].startswith("--signal"):
            value = args[i].split("=", 1)[1] if "=" in args[i] else args[i + 1]
            i += 1 if "=" in args[i] else 2
            sig = getattr(signal, value if value.startswith("SIG") else f"SIG{value}")
            continue
        names.append(args[i])
        i += 1
    for name in names:
        job = _job_of(name)
        if sig is None:
            _write(job, state="CANCELLED")
        if (pid := _step_pid(job)) is not None:
            os.kill(pid, sig or signal.SIGTERM)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "_run":
        try:
            _run(*rest)
        except BaseException:  # a supervisor that fails says so: sacct must never show it RUNNING forever
            _write(rest[0], state="FAILED")
            raise
    else:
        {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scontrol": scontrol, "scancel": scancel}[command](rest)
