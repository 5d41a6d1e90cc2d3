"""Runs with a ``tune:`` block: searched on validation with the study's first seed (after their teacher of that
seed has trained), then trained over every seed with the best settings as overrides. The search is a
``kd-lightning tune`` job in ``<out>/<run>/tune/`` run by the study's launcher (this process, ``--jobs`` local
workers, ``--jobs`` SLURM workers); the test split is never read by it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from kd_lightning.commands.study.jobs import RUN_FILE, finished_result
from kd_lightning.commands.study.launchers import Launcher, LocalLauncher, SerialLauncher
from kd_lightning.commands.study.plan import PlannedRun, check_and_hash, fit_args, plan
from kd_lightning.commands.study.spec import RunSpec, StudyError, StudySpec, substitute_seed
from kd_lightning.commands.tune.spec import TuneJob, teacher_args

def tune_folder(out: Path, run: RunSpec) -> Path:
    return out / run.name / "tune"


def tune_job(spec: StudySpec, out: Path, target: PlannedRun, teacher: str | None = None) -> TuneJob:
    """The search of ``target`` (the tuned run's planned run of the first seed) as a tune job."""
    run = target.spec
    configs = [str(c) for c in (*spec.base, *run.configs)]
    overrides = substitute_seed({**spec.overrides, **run.overrides}, target.seed)  # as the study's run (and best.yaml)
    # the study's run without its output folders (a trial writes in the search's folder), its teacher pinned
    args = [*fit_args(configs, overrides, target.seed), *(teacher_args(teacher) if teacher else ["--teacher_run=null"])]
    folder = tune_folder(out, run).resolve()
    return TuneJob(title=f"{spec.title}: {run.label or run.name}", out=str(folder), args=args, seed=target.seed,
                   spec=run.tune.__dict__.copy(), storage=f"sqlite:///{folder / 'optuna.db'}", study_name=run.name,
                   overrides=overrides, teacher=teacher, configs=configs)


def _first_seed_run(planned: Sequence[PlannedRun], spec: StudySpec, run: RunSpec) -> PlannedRun:
    seed = spec.once_seed if run.once else spec.seeds[0]
    return next(p for p in planned if p.spec.name == run.name and p.seed == seed)


def check_tunes(spec: StudySpec, out: Path, trains_here: bool) -> dict[str, dict[str, Any] | None]:
    """Every search's space, checked on its run (with an untrained teacher) before anything trains; returns each
    tuned run's own settings of its space (its search's first trial), None where they lie outside it."""
    from kd_lightning.commands.tune.command import check_job

    planned, starts = plan(spec, out), {}
    for run in spec.runs:
        if run.tune is not None:
            job = tune_job(spec, out, _first_seed_run(planned, spec, run))
            if run.teacher is not None:
                job.args += ["--model.init_args.teacher_checkpoint=null"]
            starts[run.name] = check_job(job, trains_here=trains_here)
    return starts


def _teachers(run: PlannedRun) -> list[PlannedRun]:
    chain, teacher = [], run.teacher
    while teacher is not None:
        chain.insert(0, teacher)
        teacher = teacher.teacher
    return chain


def tuned_spec(spec: StudySpec, out: Path, launcher: Launcher, log: Callable[[str], None],
               starts: dict[str, dict[str, Any] | None] | None = None) -> StudySpec | None:
    """``spec`` with each tuned run's best settings added to its overrides, searching first where the search has
    not spent its budget (a new search's first trial: the run's own settings, ``starts``); None while teachers or
    searches run on elsewhere (SLURM: start the study again)."""
    from kd_lightning.commands.tune.command import prepare, run_local, run_slurm
    from kd_lightning.commands.tune.report import best_trial, summary, write_report
    from kd_lightning.commands.tune.search import load_study, retry_stopped, spent, work

    runs = list(spec.runs)
    for index, run in enumerate(runs):
        if run.tune is None:
            continue
        planned = plan(replace(spec, runs=tuple(runs)), out)
        target = _first_seed_run(planned, spec, run)
        teacher = None
        if target.teacher is not None:
            chain = _teachers(target)
            for item in chain:
                item.config_hash = check_and_hash(item, trains_here=launcher.trains_here)
            if any(finished_result(item) is None for item in chain):
                log(f"{run.name}: training its teacher ({target.teacher.title}) before the search")
                if launcher.run(chain, log, retrain=set()) is None:
                    return None
            record = json.loads((target.teacher.folder / RUN_FILE).read_text())
            teacher = str((target.teacher.folder / record["best_checkpoint"]).resolve())
        job = tune_job(spec, out, target, teacher)
        study = prepare(job, (starts or {}).get(run.name))
        retry_stopped(study, job)
        if len(spent(study)) < job.tune.trials or any(t.state.name == "RUNNING" for t in study.get_trials()):
            log(f"{run.name}: searching on validation with seed {job.seed}, {job.tune.trials} trials "
                f"({job.folder})")
            if isinstance(launcher, LocalLauncher):
                run_local(job, launcher.jobs, None, log)
            elif isinstance(launcher, SerialLauncher):
                work(job, log=lambda line, name=run.name: log(f"{name}: {line}"))
            else:
                run_slurm(job, getattr(launcher, "tune_workers", 1), launcher.resources.get(run.name, {}), False, log)
                return None
        study = load_study(job)
        write_report(study, job)
        best = best_trial(study)
        if best is None:
            raise StudyError(f"{run.name}: its search ended without a complete trial; see {job.folder}/trials.md.")
        log(f"{run.name}: {summary(study, job)}")
        runs[index] = replace(run, overrides={**run.overrides, **best.params})
    return replace(spec, runs=tuple(runs))


def searches(spec: StudySpec, out: Path) -> list[tuple[RunSpec, TuneJob, Any]]:
    """The searches of the tuned runs that have started: (run, job, Optuna study)."""
    from kd_lightning.commands.tune.search import load_study, read_job

    found = []
    for run in spec.runs:
        job_file = tune_folder(out, run).resolve() / "tune.json"
        if run.tune is not None and job_file.is_file():
            job = read_job(job_file)
            found.append((run, job, load_study(job)))
    return found


def tuning_notes(spec: StudySpec, out: Path) -> str:
    """For results.md: which settings each tuned run got, from how many trials, on which seed's validation."""
    from kd_lightning.commands.tune.report import best_trial, summary

    lines = [f"- **{run.label or run.name}**: {summary(study, job)} Tuned on the validation split with seed "
             f"{job.seed}, then every seed trained with these settings; trials in {job.folder / 'trials.md'}."
             for run, job, study in searches(spec, out) if best_trial(study) is not None]
    return ("\n## Tuned on validation (the same budget per run)\n\n" + "\n".join(lines) + "\n") if lines else ""


def search_status(spec: StudySpec, out: Path) -> str:
    """For --status: where each search stands."""
    from kd_lightning.commands.tune.report import summary

    return "\n".join(f"search of {run.name}: {summary(study, job)}" for run, job, study in searches(spec, out))
