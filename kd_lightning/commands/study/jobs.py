"""A job: one run of one seed of a study, executed the same way by every launcher (in this process, as a local
process, as a SLURM job): :func:`execute`.

Its folder ``<out>/<run>/seed_<seed>/`` says where it stands, so that ``kd-lightning study --status`` can read it
from anywhere while jobs run:

* ``job.json``: what it runs (arguments, the hash of its settings, its teacher), written when it is launched;
* ``status.json``: ``starting`` from when its process takes it until its first step (data, teacher, a teacher
  cache to build), then its step, the run's length, the latest ``val/acc`` and an ETA (:class:`RunProgress`);
* ``run.log``: the run's whole output; ``failed.json``: the last error line, when it failed;
* ``run.json``: its results, written last (atomically): the run is finished;
* ``.run.lock``: held by the process that trains it, so that a second launch of the run is refused.

A finished run is never deleted: a folder that holds another run (its settings changed, or ``--retrain``) is set
aside under a name that says so, and the study says where.

    python -m kd_lightning.commands.study.worker <run folder>/job.json    # how local and SLURM jobs start
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.commands.study.plan import PlannedRun
from kd_lightning.commands.study.report import RunResult
from kd_lightning.commands.study.spec import RunSpec, StudyError
from kd_lightning.file_locks import held_elsewhere, try_lock
from kd_lightning.log_steps import is_logged_step
from kd_lightning.measure import network_cost

JOB_FILE, STATUS_FILE, FAILED_FILE, LOG_FILE, RUN_FILE, STARTED_FILE, RUN_LOCK = (
    "job.json", "status.json", "failed.json", "run.log", "run.json", "started.json", ".run.lock")
LAUNCH = (JOB_FILE, "slurm", RUN_LOCK)  # what the launch that runs the job now put in its folder (submitit's files)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole, then moved into place: a reader (or a stop mid-write) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- a job as a file: what a local process or a SLURM job reads -------------------------------------------------
def to_record(run: PlannedRun) -> dict[str, Any]:
    teacher = None if run.teacher is None else {"folder": str(run.teacher.folder.resolve()),
                                                 "config_hash": run.teacher.config_hash}
    return {"run": run.spec.name, "seed": run.seed, "folder": str(run.folder.resolve()), "args": run.args,
            "config_hash": run.config_hash, "teacher": teacher}


def from_record(record: dict[str, Any]) -> PlannedRun:
    teacher = None
    if record.get("teacher"):
        folder = Path(record["teacher"]["folder"])
        teacher = PlannedRun(RunSpec(name=folder.parent.name, configs=()), seed=-1, folder=folder, args=[],
                             config_hash=record["teacher"]["config_hash"])
    return PlannedRun(RunSpec(name=record["run"], configs=()), seed=record["seed"], folder=Path(record["folder"]),
                      args=list(record["args"]), teacher=teacher, config_hash=record["config_hash"])


def write_job(run: PlannedRun, **launch: Any) -> Path:
    """``job.json`` in the run's folder (created), with how it was launched (e.g. a SLURM job id)."""
    run.folder.mkdir(parents=True, exist_ok=True)
    path = run.folder / JOB_FILE
    write_json(path, {**to_record(run), "launched_at": time.time(), **launch})
    return path


# -- where a run stands --------------------------------------------------------------------------------------------
def finished_result(run: PlannedRun) -> RunResult | None:
    """The results of ``run`` if it finished before with the same settings and its checkpoints are there."""
    record = read_json(run.folder / RUN_FILE)
    if record is None or record.get("config_hash") != run.config_hash:
        return None
    if not all((run.folder / record[k]).is_file() for k in ("best_checkpoint", "last_checkpoint")):
        return None
    return recorded_result(run, record)


def recorded_result(run: PlannedRun, record: dict[str, Any]) -> RunResult:
    """The results in ``run``'s record, under the study's name of the run: a run trained elsewhere with the same
    settings (another study, another --out) and copied in is this run, whatever it was called there."""
    return dataclasses.replace(RunResult.from_dict(record["results"]), run=run.spec.name)


def interrupted_checkpoint(run: PlannedRun) -> Path | None:
    """``last.ckpt`` of an earlier, unfinished attempt at ``run`` with the same settings, else None: the attempt
    resumes from it (exactly: see kd_lightning.seeding) instead of training again from the start."""
    started = read_json(run.folder / STARTED_FILE) or {}
    last = run.folder / "checkpoints" / "last.ckpt"
    return last if started.get("config_hash") == run.config_hash and last.is_file() else None


@contextlib.contextmanager
def training_lock(run: PlannedRun) -> Iterator[None]:
    """Held by the process that trains ``run``, from before it touches the folder to the end: a second launch of
    the same run (the study started again in another terminal, a duplicate job) is refused in one line instead of
    training into the same checkpoints. An OS lock on ``.run.lock``: a killed process holds it no longer. Only the
    first process of a multi-process job takes it (a SLURM job with several tasks runs the job once per task)."""
    if rank_zero_only.rank != 0:  # set by Lightning from RANK, LOCAL_RANK or SLURM_PROCID
        yield
        return
    run.folder.mkdir(parents=True, exist_ok=True)
    lock = try_lock(run.folder / RUN_LOCK)
    if lock is None:
        raise StudyError(training_elsewhere_message(run))
    try:
        yield
    finally:
        lock.release()


def is_training_elsewhere(run: PlannedRun) -> bool:
    """Whether another process holds ``run``'s training lock (a check that writes nothing)."""
    return held_elsewhere(run.folder / RUN_LOCK)


def training_elsewhere_message(run: PlannedRun) -> str:
    status = read_json(run.folder / STATUS_FILE) or {}
    where = f"process {status['pid']} on {status['host']}" if status.get("pid") else "another process"
    return (f"{run.title} is training in {where} ({run.folder}); a run is never trained by two processes at once. "
            "Wait for it (--status shows where it stands) or stop it, then start the study again.")


def set_aside(folder: Path) -> Path | None:
    """Move a folder that holds another run out of the way, under a name that says so, and return where; None when
    there was nothing to keep (no folder, or only what this launch put there: job.json, submitit's files)."""
    if not folder.is_dir() or not [p for p in folder.iterdir() if p.name not in LAUNCH]:
        return None
    record = read_json(folder / RUN_FILE) or read_json(folder / STARTED_FILE) or {}
    tag = str(record.get("config_hash", ""))[:8] or time.strftime("%Y%m%d-%H%M%S")
    target, n = folder.with_name(f"{folder.name}.set-aside-{tag}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.set-aside-{tag}-{n}")
    target.mkdir()
    for item in folder.iterdir():
        if item.name not in LAUNCH:  # this launch's files stay with this launch
            os.replace(item, target / item.name)
    return target


def where_it_runs() -> dict[str, Any]:
    """The host, process and SLURM job of this process, as ``status.json`` records them."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


class RunProgress(pl.Callback):
    """Writes the run's progress to ``status.json`` (at most every ``every_s`` seconds, and after every
    validation): step, the run's length in steps, the latest ``val/acc``, an ETA, and where it runs."""

    def __init__(self, folder: Path, every_s: float = 5.0) -> None:
        self.path, self.every_s = folder / STATUS_FILE, every_s
        self.start = self.last_write = 0.0
        self.first_step = 0
        self.val_acc: float | None = None

    def write(self, trainer: pl.Trainer, state: str = "running") -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        step = trainer.global_step
        elapsed = time.time() - self.start
        done = step - self.first_step
        eta = None if not done or not total or total == float("inf") else elapsed / done * (total - step)
        write_json(self.path, {"state": state, "step": step, "max_steps": None if total == float("inf") else int(total),
                               "val_acc": self.val_acc, "eta_s": eta, "updated_at": time.time(), **where_it_runs()})
        self.last_write = time.time()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start, self.first_step = time.time(), trainer.global_step
        self.write(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if time.time() - self.last_write >= self.every_s or is_logged_step(trainer):
            self.write(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and not trainer.sanity_checking:
            self.val_acc = float(acc)
            self.write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, state="testing")


@contextlib.contextmanager
def output_to(log_path: Path, verbose: bool = False) -> Iterator[None]:
    """The run's output (prints, warnings, Lightning's log lines) appended to ``log_path``; on the terminal only
    with ``verbose``."""
    names = ("lightning.pytorch", "lightning.fabric")
    loggers = {name: logging.getLogger(name) for name in names}
    saved = {name: (lg.level, list(lg.handlers), lg.propagate) for name, lg in loggers.items()}
    with open(log_path, "a", buffering=1) as log:
        handler = logging.StreamHandler(log)
        for lg in loggers.values():
            lg.setLevel(logging.INFO)
            lg.handlers = [handler, *(lg.handlers if verbose else [])]
            lg.propagate = False
        try:
            if verbose:
                yield
            else:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    yield
        finally:
            for name, lg in loggers.items():
                lg.level, lg.handlers, lg.propagate = saved[name]


def execute(run: PlannedRun, retrain: bool = False, verbose: bool = False) -> tuple[RunResult, str]:
    """Run ``run`` unless it finished before: ``(results, how)``, ``how`` one of ``finished before``, ``resumed``,
    ``trained``. Refuses a run whose teacher has not finished. A folder holding another run is set aside first."""
    result = None if retrain else finished_result(run)
    if result is not None:
        return result, "finished before"
    if run.teacher is not None and finished_result(run.teacher) is None:
        raise StudyError(f"{run.title}: its teacher ({run.teacher.folder}) has not finished; train it first.")
    with training_lock(run):
        result = None if retrain else finished_result(run)  # another process may have finished it since the check
        if result is not None:
            return result, "finished before"
        return _train_locked(run, retrain, verbose)


def _train_locked(run: PlannedRun, retrain: bool, verbose: bool) -> tuple[RunResult, str]:
    resume_from = None if retrain else interrupted_checkpoint(run)
    how, kept = ("resumed", None) if resume_from else ("trained", set_aside(run.folder))
    if kept is not None:
        print(f"{run.title}: the folder held another run (other settings, or --retrain): kept as {kept}",
              file=sys.stderr)
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / FAILED_FILE).unlink(missing_ok=True)
    if resume_from is None:
        write_json(run.folder / STARTED_FILE, {"config_hash": run.config_hash})
    # until its first step (data, teacher, a teacher cache to build: minutes) the run is "starting", not "queued",
    # and an earlier attempt's step is no longer shown as where it stands
    if rank_zero_only.rank == 0:
        write_json(run.folder / STATUS_FILE, {"state": "starting", "updated_at": time.time(), **where_it_runs()})
    with output_to(run.folder / LOG_FILE, verbose):
        try:
            result = train_run(run, resume_from, callbacks=[RunProgress(run.folder)])
        except BaseException as err:
            # stopped (Ctrl-C, SIGTERM: exit 143, a SLURM requeue: 0) is resumable, not failed
            if not was_stopped(err):
                lines = [line for line in f"{type(err).__name__}: {err}".splitlines() if line.strip()]
                write_json(run.folder / FAILED_FILE, {"error": lines[-1] if lines else type(err).__name__,
                                                      "log": str(run.folder / LOG_FILE), "at": time.time()})
            raise
    status = read_json(run.folder / STATUS_FILE) or {}
    write_json(run.folder / STATUS_FILE, {**status, "state": "done", "updated_at": time.time()})
    return result, how


def was_stopped(err: BaseException) -> bool:
    """Whether ``err`` ended a run that was stopped, not one that failed: Ctrl-C (Lightning turns the
    KeyboardInterrupt of a fit into ``sys.exit(1)`` while handling it), SIGTERM (exit status 143) or a SLURM requeue
    (0). A stopped run resumes from its last.ckpt."""
    if isinstance(err, KeyboardInterrupt):
        return True
    return isinstance(err, SystemExit) and (err.code in (0, 143) or isinstance(err.__context__, KeyboardInterrupt))


def _checkpoint_step(path: Path) -> int | None:
    return read_checkpoint(path).get("global_step")


def train_run(run: PlannedRun, resume_from: Path | None = None, callbacks: list[Any] | None = None) -> RunResult:
    """Fit ``run`` through the kd-lightning CLI (from ``resume_from`` if given), test its best.ckpt and
    last.ckpt, measure the network, and record it all in ``run.json`` (on rank 0 of a multi-process run)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kd_lightning.callbacks import LastCheckpoint
    from kd_lightning.commands.cli import cli_main

    start = time.perf_counter()
    args = ["fit", *run.args, *([f"--ckpt_path={resume_from}"] if resume_from else [])]
    if run.teacher is not None:
        teacher_record = json.loads((run.teacher.folder / RUN_FILE).read_text())
        args.append(f"--model.init_args.teacher_checkpoint={run.teacher.folder / teacher_record['best_checkpoint']}")
    cli = cli_main(args, callbacks=callbacks)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)
                   and Path(c.dirpath or "").resolve() == (run.folder / "checkpoints").resolve()]
    last_paths = [c.last_saved_path for c in trainer.callbacks if isinstance(c, LastCheckpoint) and c.last_saved_path]
    if not checkpoints or not checkpoints[0].best_model_path or not last_paths:
        raise RuntimeError(f"{run.title}: no best and last checkpoint in {run.folder / 'checkpoints'}; "
                           "a study needs checkpoint.monitor and LastCheckpoint (kd-lightning's defaults).")
    best, last = Path(checkpoints[0].best_model_path), Path(last_paths[0])
    # test/acc in TensorBoard is the best checkpoint's, as after `kd-lightning test --ckpt_path .../best.ckpt`
    test_best = trainer.test(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)[0]
    trainer.loggers = []  # the last checkpoint's test/acc would land on the same tag and step
    test_last = trainer.test(model, datamodule=datamodule, ckpt_path=str(last), verbose=False)[0]
    if "test/acc" not in test_best:
        raise RuntimeError(f"{run.title}: the model logs no test/acc (kd_lightning's modules do).")
    network = getattr(model, "network", model)
    input_shape = getattr(datamodule, "input_shape", None)
    score = checkpoints[0].best_model_score
    result = RunResult(
        run=run.spec.name, seed=run.seed, test_acc_best=float(test_best["test/acc"]),
        test_acc_last=float(test_last["test/acc"]), best_val_acc=None if score is None else float(score),
        best_ckpt_step=_checkpoint_step(best), last_ckpt_step=_checkpoint_step(last),
        **(network_cost(network, input_shape) if input_shape is not None else {}),
        seconds=time.perf_counter() - start)
    if trainer.is_global_zero:
        write_json(run.folder / RUN_FILE, {
            "run": run.spec.name, "seed": run.seed, "config_hash": run.config_hash, "args": args,
            "best_checkpoint": os.path.relpath(best, run.folder), "last_checkpoint": os.path.relpath(last, run.folder),
            "results": result.to_dict()})
    return result


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-run notices and warnings off (tiny runs trigger many); the progress lines are the output."""
    names = ("lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run_job_file(job_file: str | Path) -> tuple[RunResult, str]:
    """The job of ``job_file`` (``job.json``), as every launcher runs it."""
    record = read_json(Path(job_file))
    if record is None:
        raise StudyError(f"{job_file} is not a job file of a study.")
    with quiet_lightning():
        return execute(from_record(record), retrain=bool(record.get("retrain")))


def stop_worker(signum: int, frame: Any) -> None:
    """A local worker's SIGTERM handler: outside a fit, stop now (KeyboardInterrupt). Inside a fit, Lightning's
    handler, which calls this one after its own, stops the run at the next batch boundary and LastCheckpoint saves
    it there with exit status 143; raising here would cut that short (the run would exit 1, unsaved)."""
    if signal.getsignal(signal.SIGTERM) is stop_worker:
        raise KeyboardInterrupt


def worker(requests: Any, replies: Any) -> None:
    """A local worker process: runs the job files it reads, one per line, one after another in this process (torch
    and Lightning imported once), and answers each with ``<job file>\t<status>`` (0: finished, 1: failed; a stop
    (SIGTERM, Ctrl-C) answers 143 and ends the worker, the job resumable)."""
    for line in requests:
        job_file = line.strip()
        if not job_file:
            continue
        try:
            run_job_file(job_file)
            status = 0
        except (KeyboardInterrupt, SystemExit) as err:
            replies.write(f"{job_file}\t{143 if isinstance(err, KeyboardInterrupt) else err.code}\n")
            replies.flush()
            raise
        except Exception:  # noqa: BLE001 - failed.json and run.log say why; the worker takes the next job
            status = 1
        replies.write(f"{job_file}\t{status}\n")
        replies.flush()


def main(argv: list[str] | None = None) -> None:
    """``python -m kd_lightning.commands.study.worker <job.json>``: one job as its own process (exit status 0 when it
    finished, 143 when it was stopped, 1 when it failed); ``--worker``: a local launcher's worker (:func:`worker`)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--worker"]:
        replies = os.fdopen(os.dup(1), "w")  # the launcher's channel; the jobs' own output goes to their run.log
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        signal.signal(signal.SIGTERM, stop_worker)
        worker(sys.stdin, replies)
        return
    result, how = run_job_file(args[0])
    run = from_record(read_json(Path(args[0])) or {})
    print(f"{run.title}: test acc {100 * result.test_acc_best:.1f}% (best) / {100 * result.test_acc_last:.1f}% "
          f"(last), {how}")


if __name__ == "__main__":
    main()
