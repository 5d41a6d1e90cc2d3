"""``--launcher slurm``: every run x seed of a study a SLURM job, submitted through submitit
(``pip install 'kd_lightning[cluster]'``), students with an ``afterok`` dependency on their teacher's job.

Resources come from the study YAML (``resources:`` for every run, and per run) and the command line
(``--resource KEY=VALUE``): ``gpus`` (one task per GPU: a run with several is one DDP job; set its
``trainer.devices`` to match), ``cpus`` (per task), ``mem`` (e.g. ``32G``), ``time`` (minutes or ``HH:MM:SS``),
``partition``, ``account``, ``qos``, ``constraint``, ``sbatch`` (more ``#SBATCH`` lines, e.g.
``["--mail-type=END"]``) and ``setup`` (shell lines before the run, e.g. ``["source .venv/bin/activate"]``).
Each job gets ``--signal=USR1@120`` (Lightning's requeue signal) and ``--requeue``: before its time limit or on
preemption Lightning requeues it, and the requeued job resumes from its ``last.ckpt``
(:func:`kd_lightning.commands.study.jobs.execute`). Runs are checked before submitting with their trainer built on
the CPU (a login node has no GPUs).
Starting the study again submits only what is not done or running; ``--dry-run`` prints every job's script and the
dependency graph and submits nothing.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from kd_lightning.commands.study.jobs import (FAILED_FILE, LOG_FILE, finished_result, from_record, read_json,
                                             to_record, write_job)
from kd_lightning.commands.study.launchers import Launcher, Log, ProgressPrinter, progress_line, result_line
from kd_lightning.commands.study.plan import PlannedRun
from kd_lightning.commands.study.report import RunResult
from kd_lightning.commands.study.spec import RESOURCE_KEYS, StudyError

SIGNAL_LEAD_S = 120  # SLURM signals a job this long before its time limit
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                 "CONFIGURING", "COMPLETING")


def run_job_file(job_file: str) -> dict[str, Any]:
    """What a SLURM job runs (pickled by submitit): the job of ``job_file``, through the one code path."""
    from kd_lightning.commands.study.jobs import execute, quiet_lightning

    record = read_json(Path(job_file))
    if record is None:
        raise StudyError(f"{job_file} is not a job file of a study.")
    with quiet_lightning():
        result, how = execute(from_record(record), retrain=bool(record.get("retrain")))
    return {"how": how, **result.to_dict()}


def minutes(value: Any) -> int:
    """``time``: minutes, or ``[D-]HH:MM[:SS]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text, days = str(value), 0
    if "-" in text:
        day, text = text.split("-", 1)
        days = int(day)
    parts = [int(p) for p in text.split(":")]
    if not 1 <= len(parts) <= 3:
        raise ValueError
    hours, mins = (parts + [0, 0])[:2] if len(parts) > 1 else (0, parts[0])
    return days * 1440 + hours * 60 + mins + (1 if len(parts) == 3 and parts[2] else 0)


def sbatch_parameters(resources: Mapping[str, Any], name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for ``resources`` (checked keys: :data:`RESOURCE_KEYS`)."""
    gpus = int(resources.get("gpus", 0) or 0)
    params: dict[str, Any] = {"job_name": name, "nodes": 1, "ntasks_per_node": max(1, gpus),
                              "signal_delay_s": SIGNAL_LEAD_S}
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("cpus", "partition", "account", "qos", "constraint"):
        if resources.get(key) is not None:
            params["cpus_per_task" if key == "cpus" else key] = resources[key]
    if resources.get("mem") is not None:
        params["mem"] = str(resources["mem"])
    try:
        params["time"] = minutes(resources.get("time", 60))
    except ValueError:
        raise StudyError(f"resources: time must be minutes or HH:MM:SS, got {resources.get('time')!r}.") from None
    # submitit's own signal (USR2) asks *it* to requeue, which fails a timed-out job whose function is not
    # checkpointable; USR1 is Lightning's requeue signal: it requeues, and LastCheckpoint saves at the next step.
    extra: dict[str, Any] = {"requeue": True, "signal": f"USR1@{SIGNAL_LEAD_S}"}
    for line in resources.get("sbatch") or []:
        key, _, value = str(line).lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value or True
    params["additional_parameters"] = extra
    if resources.get("setup"):
        params["setup"] = [str(line) for line in resources["setup"]]
    return params


class SlurmLauncher(Launcher):
    """Submits every job not done (nor queued or running from an earlier start) and returns; with ``wait``,
    follows them until they end and returns their results."""

    trains_here = False

    def __init__(self, resources: Mapping[str, Mapping[str, Any]], out: Path, dry_run: bool = False,
                 wait: bool = False, poll_s: float = 5.0) -> None:
        self.resources, self.out, self.dry_run, self.wait, self.poll_s = resources, out, dry_run, wait, poll_s

    def check(self) -> None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise StudyError("--launcher slurm submits jobs through submitit, which is not installed: "
                             "pip install 'kd_lightning[cluster]' (or pip install submitit).") from None
        if not self.dry_run and shutil.which("sbatch") is None:
            raise StudyError("--launcher slurm: sbatch not found on PATH; submit from a machine where SLURM's "
                             "commands work (a login node), or print the jobs with --dry-run.")

    def _executor(self, run: PlannedRun, dependency: str | None) -> Any:
        import submitit

        executor = submitit.SlurmExecutor(folder=run.folder / "slurm", max_num_timeout=100)
        params = sbatch_parameters(self.resources.get(run.spec.name, {}), f"{run.spec.name}-seed{run.seed}")
        if dependency:
            params["dependency"] = dependency
        executor.update_parameters(**params)
        return executor

    def _active_job(self, run: PlannedRun) -> str | None:
        """The id of this run's job from an earlier start when SLURM still runs or queues it, else None."""
        import submitit

        record = read_json(run.folder / "job.json") or {}
        job_id = record.get("slurm_job_id")
        if not job_id or record.get("config_hash") != run.config_hash:
            return None
        state = submitit.SlurmJob(folder=run.folder / "slurm", job_id=str(job_id)).get_info(mode="force").get("State")
        return str(job_id) if str(state or "").split(" ")[0] in ACTIVE_STATES else None

    def run(self, planned: Sequence[PlannedRun], log: Log, retrain: set[str]) -> list[RunResult] | None:
        start = time.perf_counter()
        jobs: dict[str, str] = {}  # title -> SLURM job id (submitted now, or still active from before)
        submitted: list[tuple[PlannedRun, Any]] = []
        for run in planned:
            if run.spec.name not in retrain and finished_result(run) is not None:
                log(f"{run.title}: finished before: not submitted")
                continue
            teacher = jobs.get(run.teacher.title) if run.teacher is not None else None
            dependency = f"afterok:{teacher}" if teacher else None
            if self.dry_run:
                jobs[run.title] = f"<{run.title}>"
                self._print_script(run, dependency, log)
                continue
            active = None if run.spec.name in retrain else self._active_job(run)
            if active:
                jobs[run.title] = active
                log(f"{run.title}: already queued or running as SLURM job {active}: not submitted again")
                continue
            job_file = write_job(run, launcher="slurm", retrain=run.spec.name in retrain)
            job = self._executor(run, dependency).submit(run_job_file, str(job_file))
            write_job(run, launcher="slurm", retrain=run.spec.name in retrain, slurm_job_id=job.job_id,
                      dependency=dependency)
            jobs[run.title] = job.job_id
            submitted.append((run, job))
            log(f"{run.title}: SLURM job {job.job_id}" + (f" (after {dependency[8:]})" if dependency else ""))
        if self.dry_run:
            log("dependency graph: " + "; ".join(f"{r.title} <- {r.teacher.title}" for r in planned
                                                  if r.teacher is not None and r.title in jobs) + " (dry run: "
                "nothing submitted)")
            return None
        if not self.wait:
            log(f"{len(submitted)} jobs submitted; follow them with: kd-lightning study <study.yaml> --status "
                f"--out {self.out}")
            return None
        return self._follow(planned, submitted, log, start)

    def _follow(self, planned: Sequence[PlannedRun], submitted: list[tuple[PlannedRun, Any]], log: Log,
                start: float) -> list[RunResult]:
        waiting = list(submitted)
        failed: list[str] = []
        with ProgressPrinter(log, lambda: progress_line([r for r, _ in waiting], len(planned) - len(waiting),
                                                        len(planned), start)):
            while waiting:
                for run, job in list(waiting):
                    result = finished_result(run)
                    state = None if result is not None else str(job.get_info(mode="force").get("State") or "")
                    if result is None and state.split(" ")[0] in ("", *ACTIVE_STATES):
                        continue
                    waiting.remove((run, job))
                    if result is not None:
                        log(result_line(run, result, "trained", start))
                    else:
                        why = (read_json(run.folder / FAILED_FILE) or {}).get("error") or state
                        failed.append(f"{run.title}: {why} (log: {run.folder / LOG_FILE})")
                        log(f"[{time.perf_counter() - start:6.1f}s] {failed[-1]}")
                time.sleep(self.poll_s)
        if failed:
            raise StudyError(f"{len(failed)} jobs did not finish: {'; '.join(failed)}. Start the study again to "
                             "submit what is not done.")
        results = [finished_result(run) for run in planned]
        return [r for r in results if r is not None]

    def _print_script(self, run: PlannedRun, dependency: str | None, log: Log) -> None:
        # submitit has no public way to render a job's sbatch script without submitting it: its one private
        # function, pinned by tests/test_pinned_internals.py
        from submitit.slurm.slurm import _make_sbatch_string

        params = sbatch_parameters(self.resources.get(run.spec.name, {}), f"{run.spec.name}-seed{run.seed}")
        if dependency:
            params["dependency"] = dependency
        command = f"{sys.executable} -u -m submitit.core._submit {run.folder / 'slurm'}"
        log(f"# --- {run.title} ({to_record(run)['config_hash'][:12]}): "
            f"{_make_sbatch_string(command=command, folder=run.folder / 'slurm', **params)}")


__all__ = ["SlurmLauncher", "run_job_file", "sbatch_parameters", "RESOURCE_KEYS"]
