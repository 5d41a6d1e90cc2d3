"""``kd-lightning tune TUNE.yaml``: a hyperparameter search on validation with Optuna (``pip install
'kd_lightning[tune]'``), every trial a ``kd-lightning fit`` of the same run with other settings.

A tune file is one run of a study plus its ``tune:`` block (a study's run may carry the same block):

    title: "Digits: Hinton KD, temperature and weight"
    configs: [base.yaml, kd.yaml]        # the run, as `kd-lightning fit --config ...` (relative to this file)
    overrides: {trainer.max_epochs: 10}  # optional, as a study's run
    teacher: ../../logs/digits/teacher/version_0/checkpoints/best.ckpt   # optional: a KD run's teacher
    seed: 0                              # every trial's seed_everything (default 0); also the sampler's seed
    tune:
      trials: 20                         # the budget: complete + pruned + failed trials
      space:                             # dotted config keys (any key `fit` takes) -> distributions
        model.init_args.terms.kd.init_args.temperature: {type: float, low: 1, high: 16, log: true}
        model.init_args.terms.kd.init_args.weight: {type: float, low: 0.1, high: 0.99}
        optim.lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
        data.init_args.batch_size: {type: categorical, choices: [32, 64, 128]}
      metric: val/acc                    # optional: a logged validation metric; its best value is the objective
      direction: maximize                # optional
      pruner: median                     # optional: median (default), hyperband or none; or {type: median,
                                         #   startup_trials: 3, warmup_steps: 0}
      # timeout: 3600                    # optional: seconds after which a worker starts no new trial
      # startup_trials: 5                # optional: TPE's random trials first (default: a third of the budget)

The sampler is Optuna's TPE, seeded; the first trial is the run's own settings (when they lie in the space), so
the search reports how far it got from where it started. The pruner hears every validation. Trials never test:
the search sees the validation split only. Storage: a SQLite file ``<out>/optuna.db`` (starting again continues the
search), ``--storage journal:FILE`` (a shared file system) or a database URL (``postgresql://...``) for workers on
several machines. ``--launcher local --jobs N`` runs N worker processes, ``--launcher slurm --jobs N`` N SLURM jobs
(submitit), all sharing the storage and the budget. A stopped trial (Ctrl-C, SIGTERM, a killed worker) is resumed
from its ``last.ckpt`` by the next start. Output in ``<out>``: ``trials.{md,csv}``, ``best.yaml`` (an overlay for
``kd-lightning fit --config`` and a study's ``configs:``), ``history.png``, ``importances.png``, ``slices.png``, and
every trial's TensorBoard logs, checkpoints and ``run.log`` in ``trials/trial_<n>/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from kd_lightning.commands.errors import OneLineArgumentParser, exit_with_error
from kd_lightning.commands.study.spec import (OWNED_KEYS, StudyError, _config_paths, _overrides, check_resources,
                                             read_yaml)
from kd_lightning.commands.tune.space import TuneError, TuneSpec, parse_tune
from kd_lightning.commands.tune.spec import TuneJob, lookup, run_args, teacher_args

TUNE_FILE_KEYS = ("title", "configs", "overrides", "teacher", "seed", "tune", "resources")
LAUNCHERS = ("serial", "local", "slurm")


# -- the job ---------------------------------------------------------------------------------------------------------
def make_job(title: str, configs: Sequence[Path], overrides: dict[str, Any], seed: int, teacher: str | None,
             spec: TuneSpec, out: Path, storage: str | None, launcher: str, name: str,
             study_name: str | None = None) -> TuneJob:
    from kd_lightning.commands.tune.search import check_storage, default_storage

    out = out.resolve()
    storage = check_storage(storage) if storage else None
    return TuneJob(title=title, out=str(out), args=run_args([str(c) for c in configs], overrides, seed, teacher),
                   seed=seed, spec=spec.__dict__.copy(), storage=storage or default_storage(out, launcher),
                   study_name=study_name or name, overrides=dict(overrides), teacher=teacher,
                   configs=[str(c) for c in configs])


def check_job(job: TuneJob, trains_here: bool = True) -> dict[str, Any] | None:
    """Build the run with a sample of the space through the kd-lightning CLI (nothing is written): an unknown key
    or a value the run rejects is one line here, before any trial. Returns the run's own settings of the space's
    keys when every one lies inside the space (the search's first trial), else None."""
    from kd_lightning.commands.study.plan import build_checked

    space = job.tune.space
    sample = {k: d["choices"][0] if d["type"] == "categorical" else d["low"] for k, d in space.items()}
    probe = job.folder / "trials" / "trial_check"  # a trial's arguments; nothing is written there
    own = build_checked(job.args + [f"--checkpoint.dirpath={probe / 'checkpoints'}"], job.title, trains_here)
    config = yaml.safe_load(own.parser.dump(own.config, skip_check=True))
    teacher = lookup(config, "model.init_args.teacher_checkpoint")
    if job.teacher is None and teacher:  # the config's teacher_run, found once for every trial
        job.teacher = str(Path(teacher).resolve())
        job.args += teacher_args(job.teacher)
    build_checked(job.trial_args(probe, sample), job.title, trains_here)  # every key of the space, with a value
    start = {key: lookup(config, key) for key in space}
    for key, value in start.items():
        dist = space[key]
        inside = (value in dist["choices"] if dist["type"] == "categorical" else
                  isinstance(value, (int, float)) and not isinstance(value, bool)
                  and dist["low"] <= value <= dist["high"])
        if not inside:
            return None
    return start


def prepare(job: TuneJob, start: dict[str, Any] | None) -> Any:
    """The search's folder, job file and Optuna study; a new search's first trial is the run's own settings."""
    from kd_lightning.commands.study.jobs import write_json
    from kd_lightning.commands.tune.search import JOB_FILE, load_study

    job.folder.mkdir(parents=True, exist_ok=True)
    study = load_study(job, create=True)
    write_json(job.folder / JOB_FILE, job.to_dict())
    if start is not None and not study.get_trials(deepcopy=False):
        study.enqueue_trial(start, user_attrs={"start": True})
    return study


# -- launching workers ---------------------------------------------------------------------------------------------
def run_local(job: TuneJob, jobs: int, threads: int | None, log: Callable[[str], None]) -> None:
    """``jobs`` worker processes sharing the storage, CPU threads divided between them; stopping this process
    (Ctrl-C, SIGTERM) stops them, each saving its trial to resume."""
    import signal

    from kd_lightning.commands.study.launchers import stop_jobs_on_sigterm, threads_per_job
    from kd_lightning.commands.tune.report import summary
    from kd_lightning.commands.tune.search import JOB_FILE, load_study

    per_worker = threads_per_job(jobs, threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_worker)}
    logs = job.folder / "workers"
    logs.mkdir(exist_ok=True)
    previous_handler = stop_jobs_on_sigterm()
    workers: list[subprocess.Popen] = []
    try:
        for index in range(jobs):
            with open(logs / f"worker_{index}.log", "a") as out:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "kd_lightning.commands.tune.search", str(job.folder / JOB_FILE), str(index)],
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        study, shown = load_study(job), ""
        while any(w.poll() is None for w in workers):
            time.sleep(2.0)
            line = summary(study, job)
            if line != shown:
                log(line)
                shown = line
    except BaseException:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait()
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    failed = [i for i, w in enumerate(workers) if w.returncode != 0]
    if failed:
        raise TuneError(f"worker {', '.join(map(str, failed))} ended with an error; see "
                        f"{logs}/worker_{failed[0]}.log.")


def slurm_worker(job_file: str, index: int) -> int:
    """What a SLURM job of a search runs (pickled by submitit)."""
    from kd_lightning.commands.tune.search import read_job, work

    return work(read_job(Path(job_file)), worker=index, here=False, log=lambda line: print(line, flush=True))


def check_slurm(dry_run: bool) -> None:
    """--launcher slurm: submitit installed and SLURM's sbatch on PATH (unless only printing), or one line."""
    from kd_lightning.commands.study.slurm import SlurmLauncher

    try:
        SlurmLauncher({}, Path("."), dry_run=dry_run).check()
    except StudyError as err:
        raise TuneError(str(err)) from None


def run_slurm(job: TuneJob, jobs: int, resources: dict[str, Any], dry_run: bool, log: Callable[[str], None]) -> None:
    import submitit

    from kd_lightning.commands.study.slurm import sbatch_parameters
    from kd_lightning.commands.tune.search import JOB_FILE

    params = sbatch_parameters(resources, f"tune-{job.study_name}")
    if dry_run:
        log(f"{jobs} SLURM job(s), each a worker of {job.folder / JOB_FILE} sharing {job.storage}; sbatch "
            f"parameters: {params}")
        return
    executor = submitit.SlurmExecutor(folder=job.folder / "slurm", max_num_timeout=100)
    executor.update_parameters(**params)
    submitted = [executor.submit(slurm_worker, str(job.folder / JOB_FILE), index) for index in range(jobs)]
    log(f"Submitted {len(submitted)} worker job(s): {', '.join(j.job_id for j in submitted)}. Follow them with "
        f"kd-lightning tune ... --status (reads {job.storage}).")


def run_tune(job: TuneJob, start: dict[str, Any] | None, launcher: str = "serial", jobs: int = 1,
             threads: int | None = None, resources: dict[str, Any] | None = None, dry_run: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run the search ``job`` (checked by :func:`check_job`) with ``launcher`` and write its report; returns it
    (None while SLURM workers run on)."""
    from kd_lightning.commands.tune.report import summary, write_report
    from kd_lightning.commands.tune.search import load_study, retry_stopped, work

    if dry_run:
        if launcher != "slurm":
            raise TuneError("--dry-run is for --launcher slurm.")
        run_slurm(job, jobs, resources or {}, True, log)
        return None
    study = prepare(job, start)
    stopped = retry_stopped(study, job)
    if stopped:
        log(f"Trial(s) {', '.join(map(str, stopped))} had stopped: queued to resume from their last.ckpt.")
    log(f"{job.title}: {summary(study, job)} Storage: {job.storage}")
    if launcher == "local":
        run_local(job, jobs, threads, log)
    elif launcher == "slurm":
        run_slurm(job, jobs, resources or {}, False, log)
        return None
    else:
        work(job, log=log)
    return write_report(load_study(job), job)


def show_status(job: TuneJob) -> dict[str, Any]:
    from kd_lightning.commands.tune.report import summary, to_markdown, trial_rows, write_report
    from kd_lightning.commands.tune.search import load_study

    if job.storage.startswith("sqlite:///") and not Path(job.storage[len("sqlite:///"):]).exists():
        raise TuneError(f"no search in {job.folder} yet (no {job.storage[len('sqlite:///'):]}).")
    study = load_study(job)
    print(f"{job.title}: {summary(study, job)}\n\n{to_markdown(trial_rows(study, job))}")
    return write_report(study, job)


def _as_started(job: TuneJob, trials: int | None) -> TuneJob:
    """For --status: the search as it was started (its storage and budget from its tune.json), unless --trials."""
    from kd_lightning.commands.tune.search import JOB_FILE, read_job

    if not (job.folder / JOB_FILE).is_file():
        return job
    started = read_job(job.folder / JOB_FILE)
    if trials is not None:
        started.spec = {**started.spec, "trials": trials}
    return started


def _stopped(job: TuneJob) -> None:
    """Ctrl-C or SIGTERM: the report as it stands, one line, exit status 130."""
    from kd_lightning.commands.tune.report import write_report
    from kd_lightning.commands.tune.search import load_study

    try:
        write_report(load_study(job), job)
    except Exception:  # noqa: BLE001 - the stop matters more than the report
        pass
    print(f"\nkd-lightning: stopped; the running trial resumes from its last.ckpt when the same command runs again "
          f"({job.folder}/trials.md).", file=sys.stderr)
    raise SystemExit(130)


# -- command line ------------------------------------------------------------------------------------------------
def load_tune_file(path: Path, sets: dict[str, Any]) -> tuple[str, list[Path], dict[str, Any], int, str | None,
                                                               TuneSpec, dict[str, Any]]:
    where = str(path)
    data = read_yaml(path, "tune file")
    if not isinstance(data, dict):
        raise TuneError(f"{where}: a tune file is a mapping with keys {', '.join(TUNE_FILE_KEYS)}.")
    unknown = [k for k in data if k not in TUNE_FILE_KEYS]
    if unknown:
        raise TuneError(f"{where}: unknown key {', '.join(map(repr, unknown))} (known: {', '.join(TUNE_FILE_KEYS)}).")
    configs = list(_config_paths(data.get("configs", []), f"{where}: configs", path.parent))
    if not configs:
        raise TuneError(f"{where}: 'configs' is required: the run's config files, as kd-lightning fit --config.")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TuneError(f"{where}: seed must be an integer, got {seed!r}.")
    teacher = data.get("teacher")
    if teacher is not None:
        teacher_path = (path.parent / str(teacher)).resolve()
        if not teacher_path.is_file():
            raise TuneError(f"{where}: teacher checkpoint not found: {teacher_path}")
        teacher = str(teacher_path)
    overrides = {**_overrides(data.get("overrides"), f"{where}: overrides"), **_overrides(sets, "--set")}
    if "tune" not in data:
        raise TuneError(f"{where}: 'tune' is required: the space and the budget (see kd-lightning tune --help).")
    spec = parse_tune(data["tune"], f"{where}: tune", OWNED_KEYS)
    return (str(data.get("title") or path.stem), configs, overrides, seed, teacher, spec,
            check_resources(data.get("resources"), where))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = OneLineArgumentParser(prog="kd-lightning tune", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tune", help="the tune YAML, e.g. experiments/digits/tune.yaml")
    parser.add_argument("--out", help="the search's folder (default: logs/<the file's folder>/<its name>)")
    parser.add_argument("--trials", type=int, help="the budget, instead of the file's tune.trials")
    parser.add_argument("--timeout", type=float, help="seconds after which a worker starts no new trial")
    parser.add_argument("--storage", help="sqlite:///FILE (default: <out>/optuna.db), journal:FILE (a shared file "
                                          "system) or a database URL (postgresql://...): workers on several machines")
    parser.add_argument("--study-name", help="the search's name in the storage (default: the folder's name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every trial, e.g. --set trainer.max_epochs=5; repeatable")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="serial",
                        help="who runs the trials: this process (serial), --jobs local processes, or --jobs SLURM jobs")
    parser.add_argument("--jobs", type=int, default=2, help="--launcher local/slurm: workers at once (default 2)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: the cores divided by --jobs)")
    parser.add_argument("--resource", dest="resources", action="append", default=[], metavar="KEY=VALUE",
                        help="--launcher slurm: a resource of every worker job (as kd-lightning study)")
    parser.add_argument("--dry-run", action="store_true", help="--launcher slurm: print the jobs; submit nothing")
    parser.add_argument("--status", action="store_true",
                        help="every trial's state, value and settings, read from the storage; writes the report")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from kd_lightning.commands.study import parse_pairs

    try:
        path = Path(options.tune)
        title, configs, overrides, seed, teacher, spec, resources = load_tune_file(
            path, parse_pairs(options.overrides, "--set"))
        if options.trials is not None or options.timeout is not None:
            if options.trials is not None and options.trials < 1:
                raise TuneError(f"--trials must be >= 1, got {options.trials}.")
            spec = TuneSpec(**{**spec.__dict__, **({"trials": options.trials} if options.trials else {}),
                               **({"timeout": options.timeout} if options.timeout else {})})
        if options.jobs < 1:
            raise TuneError(f"--jobs must be >= 1, got {options.jobs}.")
        if options.threads is not None:
            if options.threads < 1:
                raise TuneError(f"--threads must be >= 1, got {options.threads}.")
            overrides = {**overrides, "threads": options.threads}
        out = Path(options.out or f"logs/{path.parent.name}/{path.stem}")
        resources = {**resources, **parse_pairs(options.resources, "--resource")}
        check_resources(resources, "--resource")
        job = make_job(title, configs, overrides, seed, teacher, spec, out, options.storage, options.launcher,
                       name=path.stem, study_name=options.study_name)
        if options.status:
            return show_status(_as_started(job, options.trials))
        if options.launcher == "slurm" or options.dry_run:
            check_slurm(options.dry_run)
        from kd_lightning.commands.study.jobs import quiet_lightning

        with quiet_lightning():
            start = check_job(job, trains_here=options.launcher != "slurm")
        try:
            report = run_tune(job, start, options.launcher, options.jobs, options.threads, resources,
                              options.dry_run)
        except KeyboardInterrupt:
            _stopped(job)
        except SystemExit as err:
            from kd_lightning.commands.study.jobs import was_stopped

            if not was_stopped(err):
                raise
            _stopped(job)
        if report is not None and report["best"] is None:
            raise TuneError(f"no trial completed ({report['summary']}); see {job.folder}/trials.md and the trials' "
                            "run.log.")
    except (StudyError, TuneError) as err:
        exit_with_error(err)
    if report is not None:
        print(f"\n{report['summary']}\n\nWrote {job.folder}/trials.md, trials.csv"
              + (f", {report['best'].name}" if report["best"] else "")
              + "".join(f", {p.name}" for p in report["figures"])
              + f"; trials in {job.folder}/trials/; TensorBoard: tensorboard --logdir {job.folder / 'trials'}")
    return report


if __name__ == "__main__":
    main()
