"""What a search leaves: ``trials.{md,csv}`` (every trial with its state, value and settings), ``best.yaml`` (a
config overlay with the best settings: ``kd-lightning fit --config ... --config best.yaml`` and a study's
``configs:`` take it) and Optuna's matplotlib figures (optimisation history, parameter importances, slices).
"""

from __future__ import annotations

import csv
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.commands.study.jobs import STATUS_FILE, read_json
from kd_lightning.commands.tune.search import counted, optuna_module, outcome
from kd_lightning.commands.tune.spec import TuneJob, lookup, nested

FIGURES = ("history", "importances", "slices")


def trial_rows(study: Any, job: TuneJob) -> list[dict[str, Any]]:
    """One row per trial (the dropped ``over_budget`` ones left out), with a running trial's step and ETA."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        state = outcome(trial)
        if state == "over_budget":
            continue
        row: dict[str, Any] = {"trial": trial.number, "state": state,
                               job.tune.metric: None if trial.value is None else round(trial.value, 6)}
        steps = trial.intermediate_values
        row["last step"] = max(steps) if steps else None
        row.update({key: trial.params.get(key) for key in job.tune.space})
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        row["seconds"] = None if duration is None else round(duration)
        notes = []
        if trial.user_attrs.get("start"):
            notes.append("the run's own settings")
        if trial.user_attrs.get("resumes") is not None:
            notes.append(f"resumes trial {trial.user_attrs['resumes']}")
        if state == "failed":
            notes.append(str(trial.user_attrs.get("error", "")))
        if state == "running":
            status = read_json(Path(trial.user_attrs.get("folder", "")) / STATUS_FILE) or {}
            if status.get("step") is not None:
                eta = status.get("eta_s")
                notes.append(f"step {status['step']}/{status.get('max_steps') or '?'}"
                             + (f", ETA {eta / 60:.0f} min" if eta else ""))
        row["notes"] = "; ".join(n for n in notes if n)
        rows.append(row)
    return rows


def best_trial(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials yet)"
    names = list(rows[0])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_cell(row[n]) for n in names) + " |" for row in rows]
    return "\n".join(lines)


def summary(study: Any, job: TuneJob) -> str:
    """One paragraph: the budget spent, by state, and the best trial."""
    trials = study.get_trials(deepcopy=False)
    states = [outcome(t) for t in counted(trials)]
    parts = [f"{states.count(s)} {s}" for s in ("complete", "pruned", "failed", "running", "waiting") if s in states]
    text = f"{len(states)} of {job.tune.trials} trials ({', '.join(parts) or 'none'})"
    stopped = sum(outcome(t) == "stopped" for t in trials)
    if stopped:
        text += f"; {stopped} stopped, each queued again to resume from its last.ckpt"
    best = best_trial(study)
    if best is not None:
        settings = ", ".join(f"{k} = {_cell(v)}" for k, v in best.params.items())
        text += f". Best: trial {best.number}, {job.tune.metric} {best.value:.4f} with {settings}"
    return text + "."


def best_overlay(job: TuneJob, params: dict[str, Any], resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config overlay of the best trial: the search's own overrides, its seed and teacher, and the settings
    found, nested (the form ``--config`` merges). A config file replaces a dict-typed argument (``terms``,
    ``student_kwargs``: a mapping right under ``init_args``) as a whole, where a dotted key on the command line
    changes one entry: such an argument is written whole, from the trial's ``resolved`` config, so the overlay
    gives the trial's config exactly."""
    own = {k: v for k, v in job.overrides.items() if k != "threads"}  # a speed setting, not the run's
    values: dict[str, Any] = {"seed_everything": job.seed, **own, **params}
    if job.teacher:
        values.update({"teacher_run": None, "model.init_args.teacher_checkpoint": job.teacher})
    if resolved is not None:
        for key in list(values):
            parts = key.split(".")
            for i in range(1, len(parts) - 1):
                prefix = ".".join(parts[:i + 1])
                whole = lookup(resolved, prefix)
                if parts[i - 1] == "init_args" and isinstance(whole, dict):
                    values = {k: v for k, v in values.items() if not (k == prefix or k.startswith(prefix + "."))}
                    values[prefix] = whole
                    break
    return nested(values)


def write_best(job: TuneJob, study: Any) -> Path | None:
    best = best_trial(study)
    if best is None:
        return None
    path = job.folder / "best.yaml"
    configs = " ".join(f"--config {c}" for c in job.configs)
    header = (f"# The best settings of {job.title!r}: trial {best.number} of {job.tune.trials}, "
              f"{job.tune.metric} {best.value:.6f} (best over its validations; seed {job.seed}).\n"
              f"# Reproduce it: kd-lightning fit {configs} --config {path}\n")
    config = Path(best.user_attrs.get("folder", "")) / "config.yaml"
    resolved = yaml.safe_load(config.read_text()) if config.is_file() else None
    path.write_text(header + yaml.safe_dump(best_overlay(job, dict(best.params), resolved), sort_keys=False))
    return path


def short_name(key: str) -> str:
    """A dotted key as a label: without ``init_args`` and the ``model.``/``data.`` prefixes, the term's name kept."""
    parts = [p for p in key.split(".") if p != "init_args"]
    if parts and parts[0] in ("model", "data") and len(parts) > 1:
        parts = parts[1:]
    if parts and parts[0] == "terms" and len(parts) > 2:
        parts = parts[1:]
    return ".".join(parts)


def write_figures(study: Any, job: TuneJob) -> list[Path]:
    """Optuna's matplotlib plots as PNG; a figure that cannot be drawn yet (e.g. importances need two complete
    trials) is skipped."""
    optuna = optuna_module()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    written = []
    makers = {"history": lambda: plots.plot_optimization_history(study, target_name=job.tune.metric),
              "importances": lambda: plots.plot_param_importances(study),
              "slices": lambda: plots.plot_slice(study, target_name=job.tune.metric)}
    for name in FIGURES:
        if not complete or (name == "importances" and (len(complete) < 2 or len(job.tune.space) < 1)):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = makers[name]()
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. every trial with the same settings: nothing to rank
        all_axes = list(axes.flat) if hasattr(axes, "flat") else [axes]
        figure = all_axes[0].get_figure()
        for ax in all_axes:  # dotted keys shortened: model.init_args.terms.kd.init_args.temperature -> kd.temperature
            ax.set_xlabel(short_name(ax.get_xlabel()) if ax.get_xlabel() in job.tune.space else ax.get_xlabel())
            if name == "importances":  # one bar per setting, named on the y axis
                ax.set_yticklabels([short_name(t.get_text()) for t in ax.get_yticklabels()])
        figure.set_size_inches(3.6 * len(job.tune.space) + 1.2 if name == "slices" else 7.5, 4.2)
        if name != "slices":  # the slices' colour bar has its own axes, which tight_layout would squeeze
            figure.tight_layout()
        path = job.folder / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write_report(study: Any, job: TuneJob) -> dict[str, Any]:
    """``trials.md``, ``trials.csv``, ``best.yaml`` and the figures; returns what was written."""
    rows = trial_rows(study, job)
    text = summary(study, job)
    (job.folder / "trials.md").write_text(f"# {job.title}\n\n{text}\n\n{to_markdown(rows)}\n\n"
                                          f"_Written {time.strftime('%Y-%m-%d %H:%M')}; storage {job.storage}._\n")
    with open(job.folder / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial", "state"])
        writer.writeheader()
        writer.writerows(rows)
    best = write_best(job, study)
    return {"summary": text, "rows": rows, "best": best, "figures": write_figures(study, job)}
