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
        # tune: {trials: 12, space: {optim.lr: {type: float, low: 1.0e-3, high: 0.1, log: true}}}
                                        # optional: searched on validation with the first seed, then every
                                        # seed trains with the best settings (kd-lightning tune --help)

Every run goes through the kd-lightning LightningCLI (no second config system, no second training loop), as a job
of a launcher: in this process one after another (``--launcher serial``, the default), up to N local processes at
once (``--launcher local --jobs N``) or SLURM jobs (``--launcher slurm``, :mod:`kd_lightning.commands.study.slurm`);
a student starts once its teacher has finished. Its TensorBoard logs, ``config.yaml``, checkpoints
(``checkpoints/best.ckpt``, ``checkpoints/last.ckpt``) and whole output (``run.log``) land in
``<out>/<run>/seed_<seed>/``, with a ``run.json`` written when it has finished. A study started again skips the runs
whose resolved settings (those that differ from their defaults, never where they write) and teacher have not
changed, and resumes the interrupted ones; a finished run whose settings changed is set aside, never deleted.
Every run's config is parsed and its model and data built before anything runs, so a bad study fails before
anything is written. ``--status`` says where each run stands, from the study folder alone. Results:
``<out>/results.{md,csv,json}`` and ``<out>/results.png``.
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

from kd_lightning.commands.errors import OneLineArgumentParser, exit_with_error
from kd_lightning.commands.study.jobs import quiet_lightning
from kd_lightning.commands.study.launchers import LAUNCHERS, Launcher, LocalLauncher, SerialLauncher
from kd_lightning.commands.study.plan import plan
from kd_lightning.commands.study.report import to_markdown
from kd_lightning.commands.study.run import run_study, write_study_results
from kd_lightning.commands.study.spec import RESOURCE_KEYS, StudyError, StudySpec, load_study, with_overrides
from kd_lightning.commands.study.status import status_table, study_states
from kd_lightning.commands.tune.space import TuneError


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
    parser.add_argument("--launcher", choices=LAUNCHERS, default="serial",
                        help="who runs the jobs: this process (serial, the default), up to --jobs local processes "
                             "at once (local), or SLURM jobs through submitit (slurm)")
    parser.add_argument("--jobs", type=int, default=2, help="--launcher local: runs at once (default 2)")
    parser.add_argument("--resource", dest="resources", action="append", default=[], metavar="KEY=VALUE",
                        help=f"--launcher slurm: a resource of every job ({', '.join(RESOURCE_KEYS)}), after the "
                             "study's own; repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="--launcher slurm: print every job's script and the dependency graph; submit nothing")
    parser.add_argument("--wait", action="store_true",
                        help="--launcher slurm: follow the jobs until they end, then write the results")
    parser.add_argument("--status", action="store_true",
                        help="where every run stands (done, running, queued, failed, blocked), read from --out; "
                             "writes the results once every run is done")
    parser.add_argument("--report", action="store_true",
                        help="write the results of the runs done so far, the missing ones marked")
    parser.add_argument("--retrain", nargs="+", default=[], metavar="RUN",
                        help="train these runs again although they finished (the finished ones are set aside, "
                             "not deleted), and their students")


def parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StudyError(f"{flag} expects KEY=VALUE, got {pair!r}.")
        values[key] = yaml.safe_load(value)
    return values


def make_launcher(options: argparse.Namespace, spec: StudySpec, out: Path) -> Launcher:
    """The launcher the options ask for, checked (submitit installed, sbatch found, resources known)."""
    resources = parse_pairs(options.resources, "--resource")
    unknown = [k for k in resources if k not in RESOURCE_KEYS]
    if unknown:
        raise StudyError(f"--resource: unknown resource key {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(RESOURCE_KEYS)}).")
    if options.launcher != "slurm" and (resources or options.dry_run or options.wait):
        raise StudyError("--resource, --dry-run and --wait are for --launcher slurm.")
    if options.launcher == "local":
        launcher: Launcher = LocalLauncher(options.jobs, options.threads)
    elif options.launcher == "slurm":
        from kd_lightning.commands.study.slurm import SlurmLauncher

        launcher = SlurmLauncher(spec.run_resources(resources), out, options.dry_run, options.wait)
    else:
        launcher = SerialLauncher(verbose=options.verbose)
    launcher.check()
    return launcher


def show_status(spec: StudySpec, out: Path, report: bool) -> list[dict[str, Any]] | None:
    """Print every run's state; write the results when every run is done (or, with ``report``, those done)."""
    planned = plan(spec, out)
    states = study_states(planned)
    print(f"{spec.title}: {out}\n{status_table(states)}")
    if any(run.tune is not None for run in spec.runs):
        from kd_lightning.commands.study.tuning import search_status

        print(search_status(spec, out))
    missing = [s.run.title for s in states if s.state != "done"]
    done = [s.result for s in states if s.result is not None]
    if done and (not missing or report):
        rows = write_study_results(spec, out, planned, done, missing)
        print(f"\nWrote {out}/results.md, results.csv, results.json and results.png"
              + (f" ({len(missing)} runs not done: {', '.join(missing)})" if missing else ""))
        return rows
    return None


def run_from_options(study_file: str | Path, options: argparse.Namespace, default_out: str) -> list[dict[str, Any]]:
    """Load the study, apply ``--seeds``/``--set``, run it (or report on it) and print the table; bad input exits
    with one line before anything is written or submitted."""
    try:
        spec = load_study(study_file)
        if options.seeds:
            if len(set(options.seeds)) != len(options.seeds):
                raise StudyError(f"--seeds must be distinct, got {options.seeds}.")
            spec = replace(spec, seeds=tuple(options.seeds))
        sets = parse_pairs(options.overrides, "--set")
        if options.verbose:
            sets = {"trainer.enable_progress_bar": True, "trainer.enable_model_summary": True, **sets}
        out = Path(options.out or default_out)
        if options.threads is not None:
            if options.threads < 1:
                raise StudyError(f"--threads must be >= 1, got {options.threads}.")
            torch.set_num_threads(options.threads)  # the checks before the runs, and each run (a speed setting)
            sets = {**sets, "threads": options.threads}
        spec = with_overrides(spec, sets)
        if options.status or options.report:
            return show_status(spec, out, options.report) or []
        launcher = make_launcher(options, spec, out)
        start = time.perf_counter()
        with contextlib.nullcontext() if options.verbose else quiet_lightning():
            rows = run_study(spec, out, launcher, retrain=options.retrain)
    except (StudyError, TuneError) as err:  # TuneError: a run's search (kd_lightning.commands.tune)
        exit_with_error(err)
    if rows is None:  # the jobs run on elsewhere (SLURM)
        return []
    seeds = len(spec.seeds)
    print(f"\n{spec.title} ({seeds} seed{'s' if seeds != 1 else ''})\n\n{to_markdown(rows)}\n")
    print(f"Wrote {out}/results.md, results.csv, results.json and results.png; checkpoints and run.log in "
          f"{out}/<run>/seed_<seed>/; TensorBoard: tensorboard --logdir {out}  ({time.perf_counter() - start:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = OneLineArgumentParser(prog="kd-lightning study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the study YAML, e.g. experiments/digits/study.yaml")
    add_study_options(parser, default_out="logs/<the study's folder>/<its name>, e.g. logs/digits/study")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    study = Path(options.study)
    return run_from_options(study, options, default_out=f"logs/{study.parent.name}/{study.stem}")


if __name__ == "__main__":
    main()
