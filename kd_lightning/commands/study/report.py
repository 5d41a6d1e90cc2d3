"""What a study reports: per-run results over seeds (mean ± sample std of test accuracy at ``best.ckpt`` and at
``last.ckpt``), validation-accuracy curves averaged over seeds, and the files ``results.{md,csv,json}`` and
``results.png``. The aggregation functions are pure; only ``read_scalar_curve`` and the writers touch files.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

Curve = list[tuple[int, float]]  # (global step, value)


@dataclass(frozen=True)
class RunResult:
    """One run of one seed. Accuracies are fractions in [0, 1]; ``None`` where a figure does not apply."""

    run: str
    seed: int
    test_acc_best: float  # test accuracy of the best-validation checkpoint (best.ckpt)
    test_acc_last: float  # test accuracy of the last checkpoint (last.ckpt)
    best_val_acc: float | None = None
    best_ckpt_step: int | None = None
    last_ckpt_step: int | None = None
    params: int | None = None
    size_kb: float | None = None
    latency_us: float | None = None
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunResult":
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); a single value has no std (None: undefined, not 0)."""
    if not values:
        raise ValueError("mean_std needs at least one value.")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(results: Sequence[RunResult], runs: Sequence[str], labels: dict[str, str] | None = None,
              groups: dict[str, str] | None = None, xs: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """One row per run (in the order of ``runs``; runs without results are left out), accuracies in percent:
    mean ± std over seeds at the best-validation checkpoint and at the last checkpoint, and the best validation
    accuracy (the number to tune on); ``xs``: a run's position on the figure's x axis (e.g. % of labels)."""
    labels, groups, xs = labels or {}, groups or {}, xs or {}
    rows = []
    for run in runs:
        of_run = [r for r in results if r.run == run]
        if not of_run:
            continue
        best_mean, best_std = mean_std([100 * r.test_acc_best for r in of_run])
        last_mean, last_std = mean_std([100 * r.test_acc_last for r in of_run])
        latencies = [r.latency_us for r in of_run if r.latency_us is not None]
        val_accs = [100 * r.best_val_acc for r in of_run if r.best_val_acc is not None]
        val_mean, val_std = mean_std(val_accs) if val_accs else (None, None)
        rows.append({
            "group": groups.get(run, ""), "run": run, "label": labels.get(run) or run,
            "seeds": len(of_run),
            "best_ckpt_test_acc_mean": best_mean, "best_ckpt_test_acc_std": best_std,
            "last_ckpt_test_acc_mean": last_mean, "last_ckpt_test_acc_std": last_std,
            "best_val_acc_mean": val_mean, "best_val_acc_std": val_std, "x": xs.get(run),
            "params": of_run[0].params, "size_kb": of_run[0].size_kb,
            # the minimum is the stable statistic on a shared machine: noise only ever adds time
            "latency_us": min(latencies) if latencies else None,
        })
    return rows


def mean_curve(curves: Sequence[Curve]) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and sample std over ``curves`` at each step (each seed's curve counts once per step; a step
    only some seeds reached averages those)."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in dict(curve).items():  # a repeated step (a resumed run) counts its last value
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    stats = [mean_std(by_step[step]) for step in steps]
    return steps, [m for m, _ in stats], [s or 0.0 for _, s in stats]  # a band of 0 where one seed reached it


def read_scalar_curve(log_dir: Path, tag: str) -> Curve:
    """``tag``'s (step, value) points from the TensorBoard event files in ``log_dir``; empty if it has none."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    if not log_dir.is_dir():
        return []
    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    if tag not in accumulator.Tags()[SCALARS]:
        return []
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


# -- writers ------------------------------------------------------------------------------------------------
def _pct(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    with_groups = any(r["group"] for r in rows)
    header = (["group"] if with_groups else []) + [
        "run", "seeds", "test acc, best.ckpt (%)", "test acc, last.ckpt (%)", "best val acc (%)", "params",
        "size on disk",
        "CPU latency / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = ([r["group"]] if with_groups else []) + [
            r["label"], str(r["seeds"]),
            _pct(r["best_ckpt_test_acc_mean"], r["best_ckpt_test_acc_std"]),
            _pct(r["last_ckpt_test_acc_mean"], r["last_ckpt_test_acc_std"]),
            "" if r.get("best_val_acc_mean") is None else _pct(r["best_val_acc_mean"], r["best_val_acc_std"]),
            "" if r["params"] is None else f"{r['params']:,}",
            "" if r["size_kb"] is None else f"{r['size_kb']:.1f} KB",
            "" if r["latency_us"] is None else f"{r['latency_us']:.0f} µs"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nTest accuracy: mean ± sample std over seeds (a single seed: its value); best.ckpt is the checkpoint of the best validation accuracy, "
        "last.ckpt the last one written; best val acc: the validation accuracy that chose best.ckpt (tune on it, "
        "not on test). Size on disk: the trained network's state_dict; latency: best of 300 "
        "single-image forward passes on one CPU thread.")
    return "\n".join(lines)


def write_results(out: Path, title: str, rows: Sequence[dict[str, Any]], results: Sequence[RunResult],
                  curves: dict[str, tuple[list[int], list[float], list[float]]], study: dict[str, Any]) -> None:
    """``results.md``, ``results.csv`` (one row per run) and ``results.json`` (rows, every seed, the curves and
    the study as run) in ``out``."""
    (out / "results.md").write_text(f"# {title}\n\n{to_markdown(rows)}\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curves_json = {run: {"step": steps, "val_acc_mean": means, "val_acc_std": stds}
                   for run, (steps, means, stds) in curves.items()}
    (out / "results.json").write_text(json.dumps(
        {"title": title, "study": study, "runs": list(rows), "per_seed": [r.to_dict() for r in results],
         "val_acc_curves": curves_json}, indent=2) + "\n")


def plot_results(path: Path, title: str, rows: Sequence[dict[str, Any]],
                 curves: dict[str, tuple[list[int], list[float], list[float]]], x_label: str = "x") -> None:
    """Left: test accuracy per run (best.ckpt and last.ckpt, error bars: std over seeds). Right: validation
    accuracy against optimizer steps per run, mean over seeds (band: ± std). Where runs have an ``x`` (e.g. %
    of labels), a middle panel: best.ckpt test accuracy against x, one line per label, and the runs without
    an x (e.g. the teacher) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    names = [f"{r['group']}\n{r['label']}" if r["group"] else r["label"] for r in rows]
    with_x = any(r.get("x") is not None for r in rows)
    many = len(rows) >= 8  # long lists: horizontal bars and legends under the panels, so that names stay readable
    height = max(4.2, 0.42 * len(rows) + 1.5) if many else 4.2
    fig, axes = plt.subplots(1, 3 if with_x else 2, figsize=(18 if with_x else 12, height), dpi=90)
    bars, lines = axes[0], axes[-1]
    x = range(len(rows))
    width = 0.38
    low = min(r[f"{k}_test_acc_mean"] - (r[f"{k}_test_acc_std"] or 0.0) for r in rows
              for k in ("best_ckpt", "last_ckpt"))
    limits = (max(0.0, 5 * math.floor((low - 5) / 5)), 100)  # zoom in: the differences are what matter
    axis_title = "test accuracy (%)" + (f", axis from {limits[0]:.0f}" if limits[0] > 0 else "")
    for offset, key, label in ((-width / 2, "best_ckpt", "best.ckpt"), (width / 2, "last_ckpt", "last.ckpt")):
        means, stds = [r[f"{key}_test_acc_mean"] for r in rows], [r[f"{key}_test_acc_std"] or 0.0 for r in rows]
        if many:
            bars.barh([i - offset for i in x], means, width, xerr=stds, capsize=3, label=label)
        else:
            bars.bar([i + offset for i in x], means, width, yerr=stds, capsize=3, label=label)
    if many:
        bars.set_xlim(*limits)
        bars.set_yticks(list(x), [n.replace("\n", ": ") for n in names], fontsize=7)
        bars.invert_yaxis()  # the study's order, top to bottom
        bars.set_xlabel(axis_title)
        bars.grid(axis="x", alpha=0.3)
    else:
        bars.set_ylim(*limits)
        # long labels wrapped, so that neighbouring ones do not run into each other
        bars.set_xticks(list(x), ["\n".join(textwrap.fill(part, 16) for part in n.split("\n")) for n in names],
                        fontsize=8)
        bars.set_ylabel(axis_title)
    bars.set_title("Test accuracy, mean ± std over seeds")
    bars.legend(loc="lower right" if many else "upper right", fontsize=8)
    if with_x:
        _plot_against_x(axes[1], rows, x_label, legend_below=many)
    # a colour per label, a line style per group: runs of the same kind in two groups (the KD student with all
    # labels and with 10%) often lie on top of each other; the styles keep both visible
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(r["label"] for r in rows))}
    styles = {group: style for group, style in zip(dict.fromkeys(r["group"] for r in rows),
                                                   ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))] * 4)}
    for r, name in zip(rows, names):
        steps, means, stds = curves.get(r["run"], ([], [], []))
        if not steps:
            continue
        means_pct = [100 * m for m in means]
        line, = lines.plot(steps, means_pct, label=name.replace("\n", ": "), color=colours[r["label"]],
                           linestyle=styles[r["group"]], linewidth=1.6)
        lines.fill_between(steps, [m - 100 * s for m, s in zip(means_pct, stds)],
                           [m + 100 * s for m, s in zip(means_pct, stds)], color=line.get_color(), alpha=0.15)
    lines.set_xlabel("optimizer step")
    lines.set_ylabel("validation accuracy (%)")
    lines.set_title("Validation accuracy, mean over seeds")
    lines.grid(alpha=0.3)
    if lines.lines:
        if many:
            lines.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
        else:
            lines.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _plot_against_x(ax: Any, rows: Sequence[dict[str, Any]], x_label: str, legend_below: bool = False) -> None:
    """best.ckpt test accuracy against each run's ``x``: a line (error bars: std over seeds) per label; a run
    without an x is a horizontal line (band: ± std) across the panel."""
    labels = list(dict.fromkeys(r["label"] for r in rows if r.get("x") is not None))
    for label in labels:
        points = sorted((r["x"], r["best_ckpt_test_acc_mean"], r["best_ckpt_test_acc_std"] or 0.0, r["seeds"])
                        for r in rows if r["label"] == label and r.get("x") is not None)
        xs, means, stds, seeds = zip(*points)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
        for x_value, mean, n in zip(xs, means, seeds):
            ax.annotate(f"{mean:.1f}" + ("" if n > 1 else "*"), (x_value, mean), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    for r in rows:
        if r.get("x") is None:
            line = ax.axhline(r["best_ckpt_test_acc_mean"], linestyle="--", color="gray", label=r["label"])
            std = r["best_ckpt_test_acc_std"] or 0.0
            ax.axhspan(r["best_ckpt_test_acc_mean"] - std, r["best_ckpt_test_acc_mean"] + std,
                       color=line.get_color(), alpha=0.1)
    ax.set_xscale("log")
    ticks = sorted({r["x"] for r in rows if r.get("x") is not None})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy, best.ckpt (%)")
    ax.set_title("Test accuracy against " + x_label + " (* one seed)")
    ax.grid(alpha=0.3)
    if legend_below:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax.legend(fontsize=8)
