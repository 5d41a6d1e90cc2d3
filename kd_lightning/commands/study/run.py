"""Running a planned study: each run through the kd-lightning CLI in this process (fit, then test of best.ckpt and
last.ckpt), skipping finished runs and resuming interrupted ones, then the results table and figure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.commands.study.plan import PlannedRun, check_and_hash, plan
from kd_lightning.commands.study.report import (RunResult, mean_curve, plot_results, read_scalar_curve, summarize,
                                                write_results)
from kd_lightning.commands.study.spec import StudySpec
from kd_lightning.measure import network_cost


def _checkpoint_step(path: Path) -> int | None:
    return read_checkpoint(path).get("global_step")


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    # a study stopped mid-write must not leave a run.json that looks finished
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def finished_result(run: PlannedRun) -> RunResult | None:
    """The results of ``run`` if it finished before with the same resolved config and its checkpoints are there."""
    try:
        record = json.loads((run.folder / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("config_hash") != run.config_hash:
        return None
    if not all((run.folder / record[k]).is_file() for k in ("best_checkpoint", "last_checkpoint")):
        return None
    return RunResult.from_dict(record["results"])


def interrupted_checkpoint(run: PlannedRun) -> Path | None:
    """``last.ckpt`` of an earlier, unfinished attempt at ``run`` with the same resolved config, else None: the
    attempt resumes from it (exactly: see kd_lightning.seeding) instead of training again from the start."""
    try:
        started = json.loads((run.folder / "started.json").read_text())
    except (OSError, ValueError):
        return None
    last = run.folder / "checkpoints" / "last.ckpt"
    return last if started.get("config_hash") == run.config_hash and last.is_file() else None


def train_run(run: PlannedRun, resume_from: Path | None = None) -> RunResult:
    """Fit ``run`` through the kd-lightning CLI (from ``resume_from`` if given), test its best.ckpt and
    last.ckpt, measure the network, and record it all in ``run.json``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kd_lightning.callbacks import LastCheckpoint
    from kd_lightning.commands.cli import cli_main

    start = time.perf_counter()
    if resume_from is None:
        # a leftover of an outdated run would mix its TensorBoard events and checkpoints into this one
        shutil.rmtree(run.folder, ignore_errors=True)
        run.folder.mkdir(parents=True)
        _write_json_atomically(run.folder / "started.json", {"config_hash": run.config_hash})
    args = ["fit", *run.args, *([f"--ckpt_path={resume_from}"] if resume_from else [])]
    if run.teacher is not None:
        teacher_record = json.loads((run.teacher.folder / "run.json").read_text())
        args.append(f"--model.init_args.teacher_checkpoint={run.teacher.folder / teacher_record['best_checkpoint']}")
    cli = cli_main(args)
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
    _write_json_atomically(run.folder / "run.json", {
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


def run_study(spec: StudySpec, out: str | Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Check every run, train those not finished before, and write ``results.{md,csv,json}`` and
    ``results.png`` to ``out``; returns the summary rows."""
    out = Path(out)
    start = time.perf_counter()
    planned = plan(spec, out)
    for run in planned:  # in training order, so a teacher's hash is known before its students'
        run.config_hash = check_and_hash(run)

    results: list[RunResult] = []
    for run in planned:
        result = finished_result(run)
        note = " (finished before: skipped)" if result else ""
        if result is None:
            resume_from = interrupted_checkpoint(run)
            note = " (resumed an interrupted run from its last.ckpt)" if resume_from else ""
            result = train_run(run, resume_from)
        results.append(result)
        log(f"[{time.perf_counter() - start:6.1f}s] {run.title}: test acc {100 * result.test_acc_best:.1f}% (best) "
            f"/ {100 * result.test_acc_last:.1f}% (last){note}")

    names = [r.name for r in spec.runs]
    rows = summarize(results, names, {r.name: r.label for r in spec.runs}, {r.name: r.group for r in spec.runs},
                     {r.name: r.x for r in spec.runs})
    curves = {}
    for name in names:
        seed_curves = [read_scalar_curve(run.folder, "val/acc") for run in planned if run.spec.name == name]
        curves[name] = mean_curve([c for c in seed_curves if c])
    study = {"file": str(spec.path), "seeds": list(spec.seeds),
             "runs": {run.title: {"folder": str(run.folder), "args": run.args} for run in planned}}
    write_results(out, spec.title, rows, results, curves, study)
    plot_results(out / "results.png", spec.title, rows, curves, spec.x_label)
    return rows
