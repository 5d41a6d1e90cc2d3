"""The search: its Optuna storage and study, and the worker loop every launcher runs (in this process, as local
processes, as SLURM jobs), each trial a ``kd-lightning fit`` of the run with the trial's settings.

Budget: ``trials`` counts the complete, pruned and failed trials and those running or queued; a trial stopped by a
signal or a killed worker does not count: it is marked failed (``stopped``) and queued again with the same
settings, and the new trial resumes the stopped one's ``last.ckpt`` (its earlier validations reported first), so
a search killed and started again loses nothing and repeats no trial number. A worker asks for a trial only while
the budget is not reached, and a trial asked for by two workers at once beyond the budget is dropped
(``over_budget``), so every search gets exactly its budget.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from kd_lightning.callbacks.optuna_pruning import MetricNotLogged
from kd_lightning.commands.study.jobs import (STATUS_FILE, RunProgress, output_to, quiet_lightning, read_json,
                                             was_stopped, write_json)
from kd_lightning.commands.study.status import STALE_S  # a run whose status has not moved this long is stopped
from kd_lightning.commands.tune.space import TuneError, TuneSpec
from kd_lightning.commands.tune.spec import TuneJob

JOB_FILE = "tune.json"


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise TuneError("kd-lightning tune searches with Optuna, which is not installed: "
                        "pip install 'kd_lightning[tune]' (or pip install optuna).") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def default_storage(out: Path, launcher: str) -> str:
    """The storage a search uses when none is given: the file already in ``out`` (so starting again continues),
    else a SQLite file; with SLURM, whose workers share a network file system, a journal file (Optuna's advice)."""
    out = out.resolve()
    if (out / "optuna.db").exists():
        return f"sqlite:///{out / 'optuna.db'}"
    if (out / "optuna.journal").exists() or launcher == "slurm":
        return f"journal:{out / 'optuna.journal'}"
    return f"sqlite:///{out / 'optuna.db'}"


def check_storage(storage: str) -> str:
    """``storage`` checked and made absolute (workers may start elsewhere), before anything is written: a
    ``journal:FILE`` needs a file path, a database URL its driver (e.g. ``psycopg2`` for PostgreSQL)."""
    if storage.startswith("journal:"):
        path = storage[len("journal:"):]
        if not path or path.endswith(("/", os.sep)) or Path(path).is_dir():
            raise TuneError(f"--storage journal:FILE needs a file path, got {storage!r}.")
        return f"journal:{Path(path).resolve()}"
    if "://" not in storage:
        raise TuneError(f"--storage must be a database URL (sqlite:///FILE, postgresql://...) or journal:FILE, "
                        f"got {storage!r}.")
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):]
        if not path or Path(path).is_dir():
            raise TuneError(f"--storage sqlite:///FILE needs a file path, got {storage!r}.")
        return f"sqlite:///{Path(path).resolve()}"
    try:
        import sqlalchemy

        sqlalchemy.create_engine(storage)  # loads the URL's driver; connects only when used
    except ImportError as err:
        raise TuneError(f"--storage {storage}: its database driver is not installed ({err.name or err}); "
                        "install it (e.g. pip install psycopg2-binary for postgresql://).") from None
    except Exception as err:  # noqa: BLE001 - a malformed URL
        raise TuneError(f"--storage {storage!r} is not a database URL SQLAlchemy reads: {err}") from None
    return storage


@contextlib.contextmanager
def one_ask_at_a_time(storage: str) -> Iterator[None]:
    """Held around ``study.ask()``. SQLite has no ``SELECT ... FOR UPDATE``, so two local workers asking at once can
    both pop the same queued trial (the run's own settings, a stopped trial queued to resume: optuna#4002, #4621)
    and train it twice into one folder. An OS lock beside the file makes each ask whole; journal files and server
    databases pop queued trials safely themselves."""
    if not storage.startswith("sqlite:///"):
        yield
        return
    with FileLock(storage[len("sqlite:///"):] + ".ask.lock"):
        yield


def open_storage(storage: str) -> Any:
    """An Optuna storage from ``sqlite:///FILE``, ``journal:FILE`` or a database URL (e.g. PostgreSQL)."""
    optuna = optuna_module()
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(storage[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if storage.startswith("sqlite:///"):  # (check_storage has checked the form)
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several local workers write at once: wait for SQLite's lock rather than fail
        return optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(storage)


def make_sampler(spec: TuneSpec, seed: int, worker: int = 0) -> Any:
    """TPE, seeded: the search's seed for the first worker, a different stream for each other one (the same seed
    would propose the same settings in every worker)."""
    optuna = optuna_module()
    return optuna.samplers.TPESampler(seed=seed + 1000 * worker, n_startup_trials=spec.tpe_startup_trials)


def make_pruner(spec: TuneSpec) -> Any:
    optuna = optuna_module()
    options = {k: v for k, v in spec.pruner.items() if k != "type"}
    if spec.pruner["type"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=options.get("startup_trials", 3),
                                           n_warmup_steps=options.get("warmup_steps", 0))
    if spec.pruner["type"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=options.get("min_resource", 1),
                                              reduction_factor=options.get("reduction_factor", 3))
    return optuna.pruners.NopPruner()


def load_study(job: TuneJob, worker: int = 0, create: bool = False) -> Any:
    """The job's Optuna study (created when ``create``); a storage holding a study of other settings under the
    same name is refused, never mixed in."""
    optuna = optuna_module()
    storage = open_storage(job.storage)
    if not create:
        try:
            study = optuna.load_study(study_name=job.study_name, storage=storage,
                                      sampler=make_sampler(job.tune, job.seed, worker), pruner=make_pruner(job.tune))
        except KeyError:
            raise TuneError(f"no search named {job.study_name!r} in {job.storage}.") from None
        return study
    study = optuna.create_study(study_name=job.study_name, storage=storage, load_if_exists=True,
                                direction=job.tune.direction, sampler=make_sampler(job.tune, job.seed, worker),
                                pruner=make_pruner(job.tune))
    held = study.user_attrs.get("settings_hash")
    if held is None:
        study.set_user_attr("settings_hash", job.settings_hash())
        study.set_user_attr("title", job.title)
    elif held != job.settings_hash():
        raise TuneError(f"{job.storage} already holds a search named {job.study_name!r} with other settings (run, "
                        "space or metric); its trials are kept: give another --out (or --study-name).")
    return study


# -- which trials count ------------------------------------------------------------------------------------------
def outcome(trial: Any) -> str:
    """complete, pruned, failed, running, waiting, stopped (retried) or over_budget (dropped)."""
    state = trial.state.name.lower()
    if state == "fail":
        return str(trial.user_attrs.get("outcome", "stopped"))
    return {"complete": "complete", "pruned": "pruned", "running": "running", "waiting": "waiting"}.get(state, state)


def counted(trials: list[Any]) -> list[Any]:
    """The trials that spend the budget (not the stopped ones, which are retried, nor the dropped ones)."""
    return [t for t in trials if outcome(t) not in ("stopped", "over_budget")]


def spent(study: Any) -> list[Any]:
    """The trials that have spent the budget so far: counted, and running or finished (not those queued)."""
    return [t for t in counted(study.get_trials(deepcopy=False)) if outcome(t) != "waiting"]


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: /proc/<pid>/stat's start time), so that a pid reused by another
    process is not taken for the trial's worker; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 (starttime), counted after the command's name


def worker_alive(pid: int, started: str | None = None) -> bool:
    """Whether the worker ``pid`` (started at ``started``, see :func:`process_start`) still runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or process_start(pid) in (None, started)


def retry_stopped(study: Any, job: TuneJob, here: bool = True) -> list[int]:
    """Mark failed (``stopped``) the running trials whose worker is gone (a process of this machine that no longer
    runs, or a trial elsewhere whose status has not moved for ``STALE_S``, as a study's run), and queue each again
    with the same settings; returns their numbers. ``here`` False: only the stale check (a worker elsewhere)."""
    optuna = optuna_module()
    host, now, stopped = socket.gethostname(), time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("pid") is None:
            continue  # between ask and its first attributes
        if attrs.get("host") == host and here:
            gone = not worker_alive(int(attrs["pid"]), attrs.get("pid_start")) and attrs.get("pid") != os.getpid()
        else:
            status = read_json(Path(attrs.get("folder", "")) / STATUS_FILE) or {}
            gone = now - float(status.get("updated_at", trial.datetime_start.timestamp())) > STALE_S
        if gone:
            stop_trial(study, trial)
            stopped.append(trial.number)
    return stopped


def stop_trial(study: Any, trial: Any) -> None:
    """A trial stopped before it finished: failed as ``stopped`` (no ``outcome``), and queued again to resume."""
    optuna = optuna_module()
    status_file = Path(trial.user_attrs.get("folder", "")) / STATUS_FILE
    status = read_json(status_file)
    if status is not None:
        write_json(status_file, {**status, "state": "stopped", "updated_at": time.time()})
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(dict(trial.params), user_attrs={"resumes": trial.number,
                                                       "folder": trial.user_attrs.get("folder")})


# -- one trial -----------------------------------------------------------------------------------------------------
def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for key, dist in space.items():
        if dist["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, dist["choices"])
        elif dist["type"] == "int":
            params[key] = trial.suggest_int(key, dist["low"], dist["high"], step=dist.get("step", 1), log=dist["log"])
        else:
            params[key] = trial.suggest_float(key, dist["low"], dist["high"], step=dist.get("step"), log=dist["log"])
    return params


def run_trial(job: TuneJob, trial: Any, study: Any) -> float:
    """Fit the run with the trial's settings through the kd-lightning CLI (no test: the search sees validation
    only) and return the best value of the metric; raises ``optuna.TrialPruned`` when the pruner stops it."""
    optuna = optuna_module()
    from kd_lightning.callbacks.optuna_pruning import OptunaPruning
    from kd_lightning.commands.cli import cli_main

    params = suggest(trial, job.tune.space)
    resumes = trial.user_attrs.get("resumes")
    folder = Path(trial.user_attrs["folder"]) if resumes is not None else job.trial_folder(trial.number)
    previous, resume_from = {}, None
    if resumes is not None:  # the stopped trial's run goes on in its folder, from its last.ckpt
        stopped = study.trials[resumes]
        previous = dict(stopped.intermediate_values)
        last = folder / "checkpoints" / "last.ckpt"
        if last.is_file():
            resume_from = last
        else:
            previous = {}  # nothing saved: the run starts again (its earlier validations would not match)
    for key, value in (("folder", str(folder)), ("host", socket.gethostname()), ("pid", os.getpid()),
                       ("pid_start", process_start(os.getpid())), ("slurm_job_id", os.environ.get("SLURM_JOB_ID"))):
        trial.set_user_attr(key, value)
    folder.mkdir(parents=True, exist_ok=True)
    pruning = OptunaPruning(trial, job.tune.metric, job.tune.direction, previous=previous)
    args = ["fit", *job.trial_args(folder, params), *([f"--ckpt_path={resume_from}"] if resume_from else [])]
    with output_to(folder / "run.log"):
        cli_main(args, callbacks=[pruning, RunProgress(folder)])
    status = read_json(folder / STATUS_FILE) or {}
    write_json(folder / STATUS_FILE, {**status, "state": "pruned" if pruning.pruned else "done",
                                      "updated_at": time.time()})
    if pruning.pruned:
        raise optuna.TrialPruned(f"pruned at step {max(pruning.values)}")
    if pruning.best is None:
        raise RuntimeError(f"the run never validated, so it has no {job.tune.metric}; validate at least once "
                           "(trainer.check_val_every_n_epoch, val_check_interval).")
    return pruning.best


def work(job: TuneJob, worker: int = 0, here: bool = True, log: Any = None) -> int:
    """A worker: trials one after another until the budget (or the timeout) is reached; returns how many it ran.
    Stops like a run (SIGTERM, Ctrl-C): its trial is marked stopped and queued to resume, then the stop goes on."""
    optuna = optuna_module()
    spec, start, ran = job.tune, time.time(), 0
    study = load_study(job, worker)
    while True:
        retry_stopped(study, job, here)
        if len(spent(study)) >= spec.trials:
            return ran
        if spec.timeout is not None and time.time() - start >= spec.timeout:
            return ran
        with one_ask_at_a_time(job.storage):
            trial = study.ask()  # the first queued trial (the run's own settings, a stopped one), else TPE's
        ahead = [t for t in spent(study) if t.number < trial.number]
        if len(ahead) >= spec.trials:  # another worker took the last trial of the budget first
            trial.set_user_attr("outcome", "over_budget")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return ran
        try:
            with quiet_lightning():
                value = run_trial(job, trial, study)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except (KeyboardInterrupt, SystemExit) as err:
            if was_stopped(err):
                stop_trial(study, study.trials[trial.number])
            else:
                _fail(study, trial, err)
            raise
        except MetricNotLogged as err:  # every trial would fail the same way: stop the search, say why
            _fail(study, trial, err)
            raise TuneError(f"{err} Set tune.metric to one of those.") from None
        except Exception as err:  # noqa: BLE001 - the trial failed (its run.log says why); the search goes on
            _fail(study, trial, err)
        else:
            study.tell(trial, value)
        ran += 1
        if log is not None:
            log(trial_line(study.trials[trial.number], spec))


def _fail(study: Any, trial: Any, err: BaseException) -> None:
    optuna = optuna_module()
    lines = [line for line in f"{type(err).__name__}: {err}".splitlines() if line.strip()]
    trial.set_user_attr("outcome", "failed")
    trial.set_user_attr("error", lines[-1] if lines else type(err).__name__)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def trial_line(trial: Any, spec: TuneSpec) -> str:
    state = outcome(trial)
    value = f" {spec.metric} {trial.value:.4f}" if trial.value is not None else ""
    if state == "pruned" and trial.intermediate_values:  # its value is the last validation's, not a best
        step = max(trial.intermediate_values)
        value = f" at step {step} ({spec.metric} {trial.intermediate_values[step]:.4f})"
    params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in trial.params.items())
    error = f" ({trial.user_attrs['error']})" if state == "failed" else ""
    return f"trial {trial.number}: {state}{value}  [{params}]{error}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_job(path: Path) -> TuneJob:
    record = read_json(path)
    if record is None:
        raise TuneError(f"{path} is not the job file of a search.")
    return TuneJob(**record)


def main(argv: list[str] | None = None) -> None:
    """``python -m kd_lightning.commands.tune.search <tune.json> [WORKER]``: one worker of a search (what the local
    and SLURM launchers start)."""
    import signal
    import sys

    from kd_lightning.commands.study.jobs import stop_worker

    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, stop_worker)  # Lightning's stop inside a fit, KeyboardInterrupt outside
    job = read_job(Path(args[0]))
    work(job, worker=int(args[1]) if len(args) > 1 else 0, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
