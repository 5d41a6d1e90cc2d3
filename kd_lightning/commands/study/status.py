"""``kd-lightning study STUDY.yaml --status``: where every run x seed stands, read from the study folder alone (its
runs' ``run.json``, ``status.json``, ``failed.json`` and ``job.json``), so it works on a login node while jobs run.

States: ``done`` (test acc), ``running`` (step / max, val acc, ETA; or starting: its data, teacher and teacher
cache before the first step), ``queued`` (launched, not started), ``failed`` (the last error line, the log's path),
``blocked`` (its teacher failed or is blocked), ``stopped`` (it started, and stopped: the next start takes it up
again, from its last.ckpt if it has one) and ``not started``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Sequence

from kd_lightning.commands.study.jobs import (FAILED_FILE, JOB_FILE, LOG_FILE, RUN_FILE, STATUS_FILE,
                                             is_training_elsewhere, read_json, recorded_result)
from kd_lightning.commands.study.plan import PlannedRun
from kd_lightning.commands.study.report import RunResult

STALE_S = 900  # a running run that wrote no progress for this long is reported as stopped


@dataclass
class RunState:
    run: PlannedRun
    state: str
    detail: str = ""
    result: RunResult | None = None


def run_state(run: PlannedRun, teacher: RunState | None, now: float | None = None) -> RunState:
    now = time.time() if now is None else now
    job = read_json(run.folder / JOB_FILE) or {}
    record = read_json(run.folder / RUN_FILE)
    if record is not None and record.get("config_hash") == job.get("config_hash", record.get("config_hash")):
        result = recorded_result(run, record)
        return RunState(run, "done", f"test acc {100 * result.test_acc_best:.1f}% (best) / "
                                     f"{100 * result.test_acc_last:.1f}% (last)", result)
    failed = read_json(run.folder / FAILED_FILE)
    if failed is not None:
        return RunState(run, "failed", f"{failed.get('error', '')} (log: {failed.get('log', run.folder / LOG_FILE)})")
    if teacher is not None and teacher.state in ("failed", "blocked"):
        return RunState(run, "blocked", f"its teacher ({teacher.run.title}) {teacher.state}")
    status = read_json(run.folder / STATUS_FILE)
    if status is not None and status.get("state") == "starting":
        return starting_state(run, status, now)
    if status is not None and status.get("state") in ("running", "testing"):
        if now - float(status.get("updated_at", 0)) > STALE_S:
            return RunState(run, "stopped", f"at step {status.get('step')} (no progress for "
                                            f"{(now - float(status.get('updated_at', 0))) / 60:.0f} min)")
        detail = f"step {status.get('step')}/{status.get('max_steps') or '?'}"
        if status.get("val_acc") is not None:
            detail += f", val acc {100 * status['val_acc']:.1f}%"
        detail += ", testing" if status["state"] == "testing" else (
            f", ETA {status['eta_s'] / 60:.1f} min" if status.get("eta_s") is not None else "")
        return RunState(run, "running", f"{detail} ({recorded_place(status)})")
    if job:
        where = f"SLURM job {job['slurm_job_id']}" if job.get("slurm_job_id") else job.get("launcher", "")
        if (run.folder / "checkpoints" / "last.ckpt").is_file():
            return RunState(run, "stopped", f"resumable from its last.ckpt ({where})")
        return RunState(run, "queued", where)
    return RunState(run, "not started")


def starting_state(run: PlannedRun, status: dict, now: float) -> RunState:
    """A run whose process took it and has not made its first step: setting up its data and teacher, or building a
    teacher cache, which can take longer than ``STALE_S``. On this host its training lock says whether that process
    is alive; elsewhere (a SLURM node) the minutes since it started say how long it has been at it."""
    here = status.get("host") == socket.gethostname() and not status.get("slurm_job_id")
    if here and not is_training_elsewhere(run):
        return RunState(run, "stopped", f"while starting, before its first step (its process {status.get('pid')} "
                                        "has ended; the next start takes it up again)")
    minutes = (now - float(status.get("updated_at", now))) / 60
    return RunState(run, "running", f"starting for {minutes:.0f} min: data, teacher, teacher cache "
                                    f"(log: {run.folder / LOG_FILE}) ({recorded_place(status)})")


def recorded_place(status: dict) -> str:
    """Where a run's status.json says it runs: its SLURM job, else its host."""
    return f"SLURM job {status['slurm_job_id']}" if status.get("slurm_job_id") else f"{status.get('host')}"


def study_states(planned: Sequence[PlannedRun]) -> list[RunState]:
    states: dict[str, RunState] = {}
    for run in planned:  # in training order: a teacher's state is known before its students'
        states[run.title] = run_state(run, states.get(run.teacher.title) if run.teacher is not None else None)
    return list(states.values())


def status_table(states: Sequence[RunState]) -> str:
    width = max(len(s.run.title) for s in states)
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines = [f"{s.run.title:<{width}}  {s.state:<11}  {s.detail}".rstrip() for s in states]
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {len(states)})")
    return "\n".join(lines)


__all__ = ["RunState", "run_state", "status_table", "study_states"]
