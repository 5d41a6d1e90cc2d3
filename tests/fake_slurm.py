"""Stand-ins for SLURM's ``sbatch``, ``srun``, ``sacct``, ``squeue``, ``scancel`` and ``scontrol`` that run the
submitted scripts on this machine: each job in the background, after its ``afterok`` dependencies completed (a
dependency that failed cancels it, as SLURM's DependencyNeverSatisfied), with SLURM's job environment variables;
``scontrol requeue`` stops a job with SIGTERM and runs its script again (``SLURM_RESTART_COUNT`` + 1).
Enough for submitit and kd_lightning's SLURM launcher in tests.

State lives in ``$FAKE_SLURM_DIR``: ``jobs/<id>.json`` ({state, script, dependencies, pid, exit}) and the id
counter. Tests put executables named after the commands on ``PATH``, each ``exec python fake_slurm.py <command>``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")


def _path(job: str) -> Path:
    return STATE / "jobs" / f"{job}.json"


def load(job: str) -> dict:
    return json.loads(_path(job).read_text())


def save(job: str, record: dict) -> None:
    tmp = _path(job).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _path(job))


def next_id() -> str:
    (STATE / "jobs").mkdir(parents=True, exist_ok=True)
    with open(STATE / "counter", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        value = int(f.read() or 1000) + 1
        f.seek(0)
        f.truncate()
        f.write(str(value))
    return str(value)


def sbatch(args: list[str]) -> None:
    script = Path(args[-1])
    text = script.read_text()
    dependency = re.search(r"^#SBATCH --dependency=afterok:([\d:]+)", text, re.M)
    job = next_id()
    save(job, {"state": "PENDING", "script": str(script), "text": text, "submitted": time.time(),
               "dependencies": dependency.group(1).split(":") if dependency else []})
    subprocess.Popen([sys.executable, __file__, "_run", job], start_new_session=True, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env=os.environ.copy())
    print(f"Submitted batch job {job}")


def _run(job: str) -> None:
    record = load(job)
    while True:
        states = [load(d)["state"] for d in record["dependencies"]]
        if any(s in ENDED and s != "COMPLETED" for s in states):
            save(job, {**load(job), "state": "CANCELLED", "reason": "DependencyNeverSatisfied"})
            return
        if all(s == "COMPLETED" for s in states):
            break
        time.sleep(0.2)
    time.sleep(1.0)  # submitit moves its pickle into place after sbatch returned
    name = re.search(r"^#SBATCH --job-name=(\S+)", record["text"], re.M)
    for restart in range(10):  # a requeued job (scontrol requeue) runs its script again, as the same job
        env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOBID": job, "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "1", "SLURM_RESTART_COUNT": str(restart),
               "SLURM_JOB_NAME": name.group(1) if name else "job"}
        process = subprocess.Popen(["bash", record["script"]], env=env, start_new_session=True)
        save(job, {**load(job), "state": "RUNNING", "pid": process.pid, "restarts": restart})
        code = process.wait()
        while _alive(process.pid):  # SLURM ends a job when all its processes have ended
            time.sleep(0.1)
        record = load(job)
        if record["state"] != "REQUEUED":
            break
    if record["state"] != "CANCELLED":
        save(job, {**record, "state": "COMPLETED" if code == 0 else "FAILED", "exit": code})


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def srun(args: list[str]) -> None:
    job, out, err, i = os.environ.get("SLURM_JOB_ID", "0"), None, None, 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i]
        if flag in ("--output", "-o", "--error", "-e"):
            value = args[i + 1].replace("%j", job).replace("%t", "0").replace("%A", job).replace("%a", "0")
            out, err = (value, err) if flag in ("--output", "-o") else (out, value)
            i += 2
        else:
            i += 1
    command = args[i:]
    with open(out or os.devnull, "a") as stdout, open(err or out or os.devnull, "a") as stderr:
        raise SystemExit(subprocess.call(command, stdout=stdout, stderr=stderr))


def sacct(args: list[str]) -> None:
    ids = args[args.index("-j") + 1].split(",") if "-j" in args else []
    print("JobID|State|NodeList")
    for job in ids:
        if _path(job).exists():
            print(f"{job}|{load(job)['state']}|localhost")


def scontrol(args: list[str]) -> None:
    """``scontrol requeue <id>``: SIGTERM to the job's processes, then its script runs again (``_run``)."""
    if args[:1] == ["requeue"]:
        job = args[1]
        record = load(job)
        save(job, {**record, "state": "REQUEUED"})
        if record.get("pid"):
            os.killpg(record["pid"], signal.SIGTERM)


def scancel(args: list[str]) -> None:
    for job in [a for a in args if a.isdigit()]:
        record = load(job)
        if record.get("pid") and record["state"] == "RUNNING":
            os.killpg(record["pid"], signal.SIGKILL)
        save(job, {**load(job), "state": "CANCELLED"})


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    {"sbatch": sbatch, "_run": lambda a: _run(a[0]), "srun": srun, "sacct": sacct, "scancel": scancel,
     "squeue": lambda a: print("JOBID"), "scontrol": scontrol}[command](rest)
