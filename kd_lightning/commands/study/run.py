"""Running a study: plan and check every run, hand the runs to a launcher (in this process, local processes,
SLURM jobs: :mod:`kd_lightning.commands.study.launchers`), then the results table and figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from kd_lightning.commands.study.jobs import is_training_elsewhere, training_elsewhere_message
from kd_lightning.commands.study.launchers import Launcher, SerialLauncher, terminal_log
from kd_lightning.commands.study.plan import PlannedRun, check_and_hash, plan
from kd_lightning.commands.study.report import (RunResult, mean_curve, plot_results, read_scalar_curve, summarize,
                                                write_results)
from kd_lightning.commands.study.spec import StudyError, StudySpec


def run_study(spec: StudySpec, out: str | Path, launcher: Launcher | None = None,
              log: Callable[[str], None] | None = None, retrain: Sequence[str] = ()) -> list[dict[str, Any]] | None:
    """Check every run, have ``launcher`` (default: :class:`SerialLauncher`) run those not finished before, and
    write ``results.{md,csv,json}`` and ``results.png`` to ``out`` once every run is done; returns the summary rows
    (None while runs are still queued elsewhere, e.g. on SLURM)."""
    out, log = Path(out), log or terminal_log()
    planned = plan(spec, out)
    launcher = launcher or SerialLauncher()
    for run in planned:  # in training order, so a teacher's hash is known before its students'
        run.config_hash = check_and_hash(run, trains_here=launcher.trains_here)
    unknown = sorted(set(retrain) - {r.name for r in spec.runs})
    if unknown:
        raise StudyError(f"--retrain names {unknown}, which are not runs of this study "
                         f"({', '.join(r.name for r in spec.runs)}).")
    if launcher.trains_here:  # before anything is written; a job checks again when it starts (training_lock)
        busy = [run for run in planned if is_training_elsewhere(run)]
        if busy:
            others = f" Also training elsewhere: {', '.join(r.title for r in busy[1:])}." if busy[1:] else ""
            raise StudyError(training_elsewhere_message(busy[0]) + others)
    if any(run.tune is not None for run in spec.runs):
        from kd_lightning.commands.study.tuning import check_tunes, tuned_spec

        starts = check_tunes(spec, out, launcher.trains_here)  # every space, before anything trains
        tuned = tuned_spec(spec, out, launcher, log, starts)
        if tuned is None:
            log("Teachers or searches run on elsewhere: start the study again once they have finished "
                "(--status says where they stand).")
            return None
        spec, planned = tuned, plan(tuned, out)
        for run in planned:
            run.config_hash = check_and_hash(run, trains_here=launcher.trains_here)
    results = launcher.run(planned, log, retrain=set(retrain))
    if results is None:
        return None
    return write_study_results(spec, out, planned, results)


def write_study_results(spec: StudySpec, out: Path, planned: Sequence[PlannedRun], results: Sequence[RunResult],
                        missing: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``results.{md,csv,json}`` and ``results.png`` of the finished runs (``missing``: the titles of runs without
    results, marked in the table)."""
    names = [r.name for r in spec.runs]
    rows = summarize(results, names, {r.name: r.label for r in spec.runs}, {r.name: r.group for r in spec.runs},
                     {r.name: r.x for r in spec.runs})
    curves = {}
    for name in names:
        seed_curves = [read_scalar_curve(run.folder, "val/acc") for run in planned if run.spec.name == name]
        curves[name] = mean_curve([c for c in seed_curves if c])
    study = {"file": str(spec.path), "seeds": list(spec.seeds), "missing": list(missing),
             "runs": {run.title: {"folder": str(run.folder), "args": run.args} for run in planned}}
    write_results(out, spec.title, rows, results, curves, study)
    if any(run.tune is not None for run in spec.runs):
        from kd_lightning.commands.study.tuning import tuning_notes

        with open(out / "results.md", "a") as handle:
            handle.write(tuning_notes(spec, out))
    plot_results(out / "results.png", spec.title, rows, curves, spec.x_label)
    return rows
