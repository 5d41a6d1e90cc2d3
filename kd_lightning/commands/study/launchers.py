"""Who runs a study's jobs: this process one after another (``serial``), up to N local processes at once
(``local``), or SLURM jobs through submitit (``slurm``). Each runs every job through the same function,
:func:`kd_lightning.commands.study.jobs.execute`; a student starts only when its teacher has finished, and a job
whose teacher failed is blocked, not started.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from kd_lightning.commands.study.jobs import (FAILED_FILE, LOG_FILE, STATUS_FILE, execute, finished_result, read_json,
                                             write_job)
from kd_lightning.commands.study.plan import PlannedRun
from kd_lightning.commands.study.report import RunResult
from kd_lightning.commands.study.spec import StudyError

Log = Callable[[str], None]
LAUNCHERS = ("serial", "local", "slurm")


def result_line(run: PlannedRun, result: RunResult, how: str, start: float) -> str:
    note = {"finished before": " (finished before: skipped)",
            "resumed": " (resumed an interrupted run from its last.ckpt)"}.get(how, "")
    return (f"[{time.perf_counter() - start:6.1f}s] {run.title}: test acc {100 * result.test_acc_best:.1f}% (best) "
            f"/ {100 * result.test_acc_last:.1f}% (last){note}")


def progress_line(runs: Sequence[PlannedRun], done: int, total: int, start: float) -> str:
    """``[  35.2s] 3/15 done; running: seed 0 kd step 240/480, val acc 93.0%, ETA 12 s; seed 1 kd starting (2 min)``"""
    parts = []
    for run in runs:
        status = read_json(run.folder / STATUS_FILE) or {}
        if status.get("state") == "starting":  # data, teacher, a teacher cache to build: before its first step
            parts.append(f"{run.title} starting ({(time.time() - float(status.get('updated_at', 0))) / 60:.0f} min)")
            continue
        if status.get("state") not in ("running", "testing"):
            continue
        part = f"{run.title} step {status.get('step')}/{status.get('max_steps') or '?'}"
        if status.get("val_acc") is not None:
            part += f", val acc {100 * status['val_acc']:.1f}%"
        if status.get("state") == "testing":
            part += ", testing"
        elif status.get("eta_s") is not None:
            part += f", ETA {status['eta_s']:.0f} s"
        parts.append(part)
    return f"[{time.perf_counter() - start:6.1f}s] {done}/{total} done" + (f"; running: {'; '.join(parts)}"
                                                                            if parts else "")


PROGRESS_EVERY_S = 10.0  # seconds between progress lines (when they changed)


def terminal_log() -> Log:
    """A study's log: lines to stdout as it is now. ``print`` would look stdout up at each call, and while a serial
    run trains its output (stdout included) goes to its run.log, so the progress lines would land there."""
    stream = sys.stdout
    return lambda line: print(line, file=stream, flush=True)


class ProgressPrinter:
    """A background thread that prints :func:`progress_line` every ``every_s`` seconds while runs train, when it
    changed (the runs' own output goes to their run.log)."""

    def __init__(self, log: Log, line: Callable[[], str], every_s: float | None = None) -> None:
        self.log, self.line, self.every_s = log, line, every_s or PROGRESS_EVERY_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._last = ""

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            line = self.line()
            if "running:" in line and line.split("] ", 1)[-1] != self._last:
                self._last = line.split("] ", 1)[-1]
                self.log(line)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


class Launcher:
    """Runs the planned jobs; returns every run's results, or None when they run on elsewhere (SLURM)."""

    trains_here = True  # False: jobs train on other machines (their hardware is checked there, not here)

    def check(self) -> None:
        """Refuse, before anything is planned or submitted, what cannot work here (one clear line)."""

    def run(self, planned: Sequence[PlannedRun], log: Log, retrain: set[str]) -> list[RunResult] | None:
        raise NotImplementedError


class SerialLauncher(Launcher):
    """Every job in this process, in the study's order; the first failure stops the study (its run.log and
    failed.json say why; the next start resumes from there)."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def run(self, planned: Sequence[PlannedRun], log: Log, retrain: set[str]) -> list[RunResult]:
        start, results, current = time.perf_counter(), [], []
        # the run in progress only: a later run's status.json may be an earlier, stopped attempt's
        with ProgressPrinter(log, lambda: progress_line(current, len(results), len(planned), start)):
            for run in planned:
                current[:] = [run]
                result, how = execute(run, retrain=run.spec.name in retrain, verbose=self.verbose)
                results.append(result)
                log(result_line(run, result, how, start))
        return results


class LocalLauncher(Launcher):
    """Up to ``jobs`` jobs at once, in as many worker processes (``python -m kd_lightning.commands.study.worker
    --worker``: each imports torch once and runs the jobs it is given one after another), each with its share of
    the CPU threads; a student starts when its teacher has finished; a job whose teacher failed is blocked. Each
    job's output goes to its run.log."""

    def __init__(self, jobs: int, threads: int | None = None, poll_s: float = 0.5) -> None:
        if jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {jobs}.")
        self.jobs, self.poll_s = jobs, poll_s
        self.threads = threads_per_job(jobs, threads)

    def _worker(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        return subprocess.Popen([sys.executable, "-m", "kd_lightning.commands.study.worker", "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
                                start_new_session=True)

    def _job_file(self, run: PlannedRun, retrain: bool) -> str:
        args = run.args if any(a.startswith("--threads=") for a in run.args) else [*run.args,
                                                                                    f"--threads={self.threads}"]
        return str(write_job(PlannedRun(run.spec, run.seed, run.folder, args, run.teacher, run.config_hash),
                             launcher="local", retrain=retrain))

    def run(self, planned: Sequence[PlannedRun], log: Log, retrain: set[str]) -> list[RunResult]:
        start = time.perf_counter()
        pending, idle, busy = list(planned), [], {}  # busy: worker -> the run it trains
        done: dict[str, RunResult] = {}
        failed: dict[str, str] = {}  # title -> why (failed, or blocked by its teacher)

        def elapsed() -> str:
            return f"[{time.perf_counter() - start:6.1f}s]"

        previous_handler = stop_jobs_on_sigterm()
        try:
            with ProgressPrinter(log, lambda: progress_line(list(busy.values()), len(done), len(planned), start)):
                while pending or busy:
                    for run in list(pending):
                        teacher = run.teacher.title if run.teacher is not None else None
                        if teacher in failed:
                            pending.remove(run)
                            failed[run.title] = f"blocked: its teacher ({teacher}) did not finish"
                            log(f"{elapsed()} {run.title}: {failed[run.title]}")
                        elif teacher is None or teacher in done:
                            previous = None if run.spec.name in retrain else finished_result(run)
                            if previous is not None:
                                pending.remove(run)
                                done[run.title] = previous
                                log(result_line(run, previous, "finished before", start))
                            elif len(busy) < self.jobs:
                                pending.remove(run)
                                process = idle.pop() if idle else self._worker()
                                process.stdin.write(self._job_file(run, run.spec.name in retrain) + "\n")
                                busy[process] = run
                    ready, _, _ = select.select([p.stdout for p in busy], [], [], self.poll_s) if busy else ([], 0, 0)
                    for process in [p for p in busy if p.stdout in ready]:
                        run = busy.pop(process)
                        reply = process.stdout.readline()
                        status = reply.rstrip("\n").rpartition("\t")[2] if reply else str(process.wait())
                        result = finished_result(run) if status == "0" else None
                        if result is not None:
                            done[run.title] = result
                            log(result_line(run, result, "trained", start))
                        else:
                            why = (read_json(run.folder / FAILED_FILE) or {}).get("error") or f"exit status {status}"
                            failed[run.title] = f"failed: {why} (log: {run.folder / LOG_FILE})"
                            log(f"{elapsed()} {run.title}: {failed[run.title]}")
                        if reply and status in ("0", "1"):
                            idle.append(process)  # the worker takes the next job
        except BaseException:  # Ctrl-C, SIGTERM: the jobs stop too, each saving its last.ckpt
            for process in busy:
                process.send_signal(signal.SIGTERM)
            for process in busy:
                process.wait()
            raise
        finally:
            for process in idle:
                process.stdin.close()
                process.wait()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if failed:
            raise StudyError(f"{len(failed)} of {len(planned)} runs did not finish: "
                             + "; ".join(f"{t}: {w}" for t, w in failed.items())
                             + ". Start the study again to run what is not done.")
        return [done[run.title] for run in planned]


def threads_per_job(jobs: int, threads: int | None = None) -> int:
    """CPU threads of each of ``jobs`` processes at once: ``threads`` if given, else the cores divided between them."""
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_jobs_on_sigterm() -> Any:
    """The launching process, stopped by SIGTERM (``kill``, a scheduler), stops its jobs as Ctrl-C does (they save
    and exit) instead of dying and leaving them training. Returns the handler it replaced (None where signals
    cannot be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

