"""``kd-lightning study STUDY.yaml``: a teacher, KD students and scratch students over several seeds, one command.

A study is YAML; its runs are the same config files ``kd-lightning fit`` takes, plus overrides:

    title: "Digits: teacher vs KD student vs scratch student"
    base: [base.yaml]                   # merged first in every run; paths are relative to the study file
    seeds: [0, 1, 2]                    # required: every run once per seed (seed_everything = seed)
    overrides:                          # for every run; "${seed}" becomes the run's seed
      data.init_args.split_seed: ${seed}
    runs:                               # trained in this order, per seed
      teacher:
        configs: [teacher.yaml]         # merged after base, left to right
      kd_student:
        configs: [kd.yaml]
        teacher: teacher                # distils from this run's best.ckpt of the same seed
      scratch_student:
        configs: [scratch.yaml]
        overrides: {trainer.max_steps: 480}   # after the study's overrides
        label: scratch student          # optional: the name in tables and figures
        group: all labels               # optional: a first column that groups runs
        # once: true                    # optional: train with the first seed only (e.g. one shared teacher;
                                        # --seeds keeps it: more seeds reuse it)
        # x: 10                         # optional: a number (e.g. % of labels); the figure then adds test
                                        # accuracy against x, one line per label (x_label: the axis title)

Every run goes through the kd-lightning LightningCLI in this process (no second config system, no second
training loop); its TensorBoard logs, ``config.yaml`` and checkpoints (``checkpoints/best.ckpt``,
``checkpoints/last.ckpt``) land in ``<out>/<run>/seed_<seed>/``, with a ``run.json`` written when it has finished.
A study started again skips the runs whose resolved config (the settings that differ from their defaults) and
teacher have not changed. Every run's config is parsed and its model and data built before the first run
trains, so a bad study fails before anything is written. Results: ``<out>/results.{md,csv,json}`` and ``<out>/results.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from kd_lightning.commands.errors import exit_with_error
from kd_lightning.commands.study.report import to_markdown
from kd_lightning.commands.study.run import quiet_lightning, run_study
from kd_lightning.commands.study.spec import StudyError, load_study, with_overrides


# -- command line -----------------------------------------------------------------------------------------------
def add_study_options(parser: argparse.ArgumentParser, default_out: str, default_threads: int | None = None) -> None:
    """The options of ``kd-lightning study`` (and the quickstart); ``default_out`` says what --out defaults to."""
    parser.add_argument("--out", help="output folder: one subfolder per run and seed, results.{md,csv,json,png} "
                                      f"(default: {default_out})")
    parser.add_argument("--seeds", type=int, nargs="+", help="these seeds instead of the study's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, after the study's own, e.g. --set trainer.max_steps=32 "
                             "(a quick smoke test) or --set trainer.accelerator=gpu; repeatable")
    parser.add_argument("--threads", type=int, default=default_threads,
                        help=f"CPU threads for PyTorch (default: {default_threads or 'each run chooses: 1 for networks under a million parameters on a CPU, else PyTorch’s choice'}); tiny "
                             "models train fastest on 1")
    parser.add_argument("--verbose", action="store_true", help="show Lightning's notices, warnings and progress bars")


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StudyError(f"--set expects KEY=VALUE, got {pair!r}.")
        overrides[key] = yaml.safe_load(value)
    return overrides


def run_from_options(study_file: str | Path, options: argparse.Namespace, default_out: str) -> list[dict[str, Any]]:
    """Load the study, apply ``--seeds``/``--set``, run it and print the table; bad input exits with one line."""
    try:
        spec = load_study(study_file)
        if options.seeds:
            if len(set(options.seeds)) != len(options.seeds):
                raise StudyError(f"--seeds must be distinct, got {options.seeds}.")
            spec = replace(spec, seeds=tuple(options.seeds))
        sets = _parse_sets(options.overrides)
        if options.verbose:
            sets = {"trainer.enable_progress_bar": True, "trainer.enable_model_summary": True, **sets}
        out = Path(options.out or default_out)
        if options.threads is not None:
            if options.threads < 1:
                raise StudyError(f"--threads must be >= 1, got {options.threads}.")
            torch.set_num_threads(options.threads)  # the checks before the runs, and each run (a speed setting)
            sets = {**sets, "threads": options.threads}
        spec = with_overrides(spec, sets)
        start = time.perf_counter()
        with contextlib.nullcontext() if options.verbose else quiet_lightning():
            rows = run_study(spec, out)
    except StudyError as err:
        exit_with_error(err)
    seeds = len(spec.seeds)
    print(f"\n{spec.title} ({seeds} seed{'s' if seeds != 1 else ''})\n\n{to_markdown(rows)}\n")
    print(f"Wrote {out}/results.md, results.csv, results.json and results.png; checkpoints in "
          f"{out}/<run>/seed_<seed>/checkpoints/; TensorBoard: tensorboard --logdir {out}  "
          f"({time.perf_counter() - start:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="kd-lightning study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the study YAML, e.g. experiments/digits/study.yaml")
    add_study_options(parser, default_out="logs/<the study's folder>/<its name>, e.g. logs/digits/study")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    study = Path(options.study)
    return run_from_options(study, options, default_out=f"logs/{study.parent.name}/{study.stem}")


if __name__ == "__main__":
    main()
