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
import copy
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import yaml

from kd_lightning.cli import plain_value
from kd_lightning.study_report import (RunResult, mean_curve, plot_results, read_scalar_curve, summarize,
                                       to_markdown, write_results)

STUDY_KEYS = ("title", "base", "seeds", "overrides", "runs", "x_label")
RUN_KEYS = ("configs", "overrides", "teacher", "once", "label", "group", "x")
SEED_PLACEHOLDER = "${seed}"
RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a folder name
# Output settings the runner owns: a study may not move a run's files out of its folder.
OWNED_KEYS = ("seed_everything", "trainer.logger.init_args.save_dir", "trainer.logger.init_args.name",
              "trainer.logger.init_args.version", "checkpoint.dirpath", "model.init_args.teacher_checkpoint")
# Per-run chatter would bury the one progress line per run; a study may turn these back on in its overrides.
QUIET_ARGS = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
# Display settings, left out of a run's config hash: --verbose must not make a study train again.
DISPLAY_KEYS = ("trainer.enable_progress_bar", "trainer.enable_model_summary")


class StudyError(ValueError):
    """A study that cannot run as written; reported as one line before anything trains."""


@dataclass(frozen=True)
class RunSpec:
    name: str
    configs: tuple[Path, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    once: bool = False
    label: str = ""
    group: str = ""
    x: float | None = None


@dataclass(frozen=True)
class StudySpec:
    path: Path
    title: str
    base: tuple[Path, ...]
    seeds: tuple[int, ...]
    overrides: dict[str, Any]
    runs: tuple[RunSpec, ...]
    # The seed of the ``once`` runs: the study file's first seed, kept when --seeds replaces ``seeds``, so that
    # more seeds add students that distil from the shared teacher already trained, not a second teacher.
    once_seed: int
    x_label: str = ""

    def run(self, name: str) -> RunSpec:
        return next(r for r in self.runs if r.name == name)


# -- reading a study ----------------------------------------------------------------------------------------
def _config_paths(value: Any, where: str, folder: Path) -> tuple[Path, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StudyError(f"{where} must be a config file or a list of them, got {value!r}.")
    paths = tuple(folder / n for n in names)
    for path in paths:
        if not path.is_file():
            raise StudyError(f"{where}: config file not found: {path}")
    return paths


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise StudyError(f"{where} must map dotted config keys to values, e.g. {{trainer.max_steps: 480}}; "
                         f"got {value!r}.")
    for key in value:
        if key in OWNED_KEYS:
            raise StudyError(f"{where}: '{key}' is set by the study runner (seed, output folders, teacher "
                             "checkpoint); use seeds, --out or a run's teacher instead.")
    return dict(value)


def _check_keys(values: dict[str, Any], known: Sequence[str], where: str) -> None:
    unknown = [k for k in values if k not in known]
    if unknown:
        raise StudyError(f"{where}: unknown key {', '.join(repr(k) for k in unknown)} "
                         f"(known: {', '.join(known)}).")


def parse_study(data: Any, path: Path) -> StudySpec:
    """A :class:`StudySpec` from the YAML mapping of the study file at ``path`` (config paths relative to it)."""
    where = str(path)
    if not isinstance(data, dict):
        raise StudyError(f"{where}: a study is a mapping with keys {', '.join(STUDY_KEYS)}.")
    _check_keys(data, STUDY_KEYS, where)
    folder = path.parent
    seeds = data.get("seeds")
    if seeds is None:
        raise StudyError(f"{where}: 'seeds' is required: a list of integers, e.g. seeds: [0, 1, 2].")
    if (not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise StudyError(f"{where}: 'seeds' must be a non-empty list of distinct integers, got {seeds!r}.")
    runs_data = data.get("runs")
    if not isinstance(runs_data, dict) or not runs_data:
        raise StudyError(f"{where}: 'runs' is required: a mapping from run name to its configs.")
    runs: list[RunSpec] = []
    for name, run in runs_data.items():
        run_where = f"{where}: run '{name}'"
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise StudyError(f"{where}: run name {name!r} must be letters, digits, '_', '-' or '.' (a folder name).")
        if not isinstance(run, dict):
            raise StudyError(f"{run_where} must be a mapping with keys {', '.join(RUN_KEYS)}.")
        _check_keys(run, RUN_KEYS, run_where)
        teacher = run.get("teacher")
        if teacher is not None and teacher not in [r.name for r in runs]:
            later = teacher in runs_data and teacher != name
            raise StudyError(f"{run_where} names teacher '{teacher}', which is "
                             + ("listed after it: list the teacher first." if later else
                                f"not a run of this study (runs: {', '.join(map(str, runs_data))})."))
        if not isinstance(run.get("once", False), bool):
            raise StudyError(f"{run_where}: 'once' must be true or false, got {run['once']!r}.")
        x = run.get("x")
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            raise StudyError(f"{run_where}: 'x' must be a number (e.g. the % of labels), got {x!r}.")
        runs.append(RunSpec(name=name, configs=_config_paths(run.get("configs", []), run_where, folder),
                            overrides=_overrides(run.get("overrides"), f"{run_where}: overrides"),
                            teacher=teacher, once=run.get("once", False), label=str(run.get("label", "")),
                            group=str(run.get("group", "")), x=None if x is None else float(x)))
    return StudySpec(path=path, title=str(data.get("title") or path.stem), seeds=tuple(seeds),
                     once_seed=seeds[0], base=_config_paths(data.get("base", []), f"{where}: base", folder),
                     overrides=_overrides(data.get("overrides"), f"{where}: overrides"), runs=tuple(runs),
                     x_label=str(data.get("x_label") or "x"))


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    return parse_study(data, path)


def with_overrides(spec: StudySpec, overrides: dict[str, Any]) -> StudySpec:
    """``spec`` with ``overrides`` applied to every run after the run's own (e.g. from ``--set``)."""
    extra = _overrides(overrides, "--set")
    return replace(spec, runs=tuple(replace(r, overrides={**r.overrides, **extra}) for r in spec.runs))


# -- planning: every run's arguments, checked before anything trains -------------------------------------------
@dataclass
class PlannedRun:
    spec: RunSpec
    seed: int
    folder: Path  # <out>/<run>/seed_<seed>: logs, config.yaml, checkpoints/, run.json
    args: list[str]  # kd-lightning arguments, without the subcommand and the teacher checkpoint
    teacher: "PlannedRun | None" = None
    config_hash: str = ""

    @property
    def title(self) -> str:
        return f"seed {self.seed} {self.spec.name}"


def substitute_seed(value: Any, seed: int) -> Any:
    """``value`` with the placeholder ``${seed}`` replaced: the whole string ``"${seed}"`` becomes the int seed,
    a longer string gets the seed's digits (``"run_${seed}"`` -> ``"run_3"``), lists and mappings recursively."""
    if isinstance(value, str):
        if value == SEED_PLACEHOLDER:
            return seed
        unknown = set(re.findall(r"\$\{[^}]*\}", value)) - {SEED_PLACEHOLDER}
        if unknown:
            raise StudyError(f"unknown placeholder {', '.join(sorted(unknown))} in {value!r}: only "
                             f"{SEED_PLACEHOLDER} is replaced.")
        return value.replace(SEED_PLACEHOLDER, str(seed))
    if isinstance(value, list):
        return [substitute_seed(v, seed) for v in value]
    if isinstance(value, dict):
        return {k: substitute_seed(v, seed) for k, v in value.items()}
    return value


def _cli_value(value: Any) -> str:
    # jsonargparse reads command-line values as YAML, of which JSON is a subset; plain strings go as they are
    return value if isinstance(value, str) else json.dumps(value)


def run_args(spec: StudySpec, run: RunSpec, seed: int, folder: Path) -> list[str]:
    """The kd-lightning arguments of ``run`` for ``seed``: configs, then the runner's quiet defaults, the seed,
    the study's and the run's overrides, and last the output folders (which nothing may override)."""
    overrides = {**spec.overrides, **run.overrides}
    return [*(f"--config={c}" for c in (*spec.base, *run.configs)), *QUIET_ARGS, f"--seed_everything={seed}",
            *(f"--{key}={_cli_value(substitute_seed(value, seed))}" for key, value in overrides.items()),
            f"--trainer.logger.init_args.save_dir={folder.parent.parent}",
            f"--trainer.logger.init_args.name={run.name}", f"--trainer.logger.init_args.version={folder.name}",
            f"--checkpoint.dirpath={folder / 'checkpoints'}"]


def plan(spec: StudySpec, out: Path) -> list[PlannedRun]:
    """Every run of every seed in training order; a ``once`` run only with the study's first seed (the study
    file's, also under --seeds), and its students of every seed distil from that one."""
    planned: list[PlannedRun] = []
    by_key: dict[tuple[str, int], PlannedRun] = {}
    for position, study_seed in enumerate(spec.seeds):
        for run in spec.runs:
            if run.once and position > 0:
                continue
            seed = spec.once_seed if run.once else study_seed
            folder = out / run.name / f"seed_{seed}"
            try:
                args = run_args(spec, run, seed, folder)
            except StudyError as err:
                raise StudyError(f"{spec.path}: run '{run.name}': {err}") from None
            teacher = None
            if run.teacher is not None:
                teacher_seed = spec.once_seed if spec.run(run.teacher).once else seed
                teacher = by_key[(run.teacher, teacher_seed)]
            by_key[(run.name, seed)] = PlannedRun(run, seed, folder, args, teacher)
            planned.append(by_key[(run.name, seed)])
    return planned


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cli_error(stderr: str) -> str:
    """The message of a CLI error (jsonargparse prints usage, then ``error: ...``; kd-lightning's own checks print
    ``kd-lightning: error: ...``), on one line."""
    at = max(stderr.rfind("\nerror: "), stderr.rfind("kd-lightning: error: "))
    if at < 0:
        return _one_line(stderr) or "the configuration was rejected"
    lines = stderr[at:].split("error: ", 1)[1].splitlines()
    # A class_path value that fails comes as a report on every type of a Union: keep the class's own problem.
    problem = next((i for i, line in enumerate(lines) if line.strip().startswith("- Problem with given class_path")),
                   None)
    if problem is not None:
        indent = len(lines[problem]) - len(lines[problem].lstrip())
        detail = [lines[problem].strip()[2:]]
        for line in lines[problem + 1:]:
            if len(line) - len(line.lstrip()) <= indent:
                break
            detail.append(line)
        lines = [lines[0], *detail]
    return _one_line("\n".join(lines))


def check_and_hash(run: PlannedRun) -> str:
    """Parse ``run``'s config with the kd-lightning CLI and build its model, data and trainer (nothing is
    written), check the model runs on the data's input shape, and return a hash of the resolved config (and of
    the teacher's, so a retrained teacher reruns its students)."""
    from kd_lightning.cli import cli_main

    # the teacher's checkpoint does not exist yet: build a random teacher of the configured architecture
    args = run.args + (["--model.init_args.teacher_checkpoint=null"] if run.teacher else [])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli = cli_main(args, run=False)
    except SystemExit:
        raise StudyError(f"run '{run.spec.name}' (seed {run.seed}): {_cli_error(stderr.getvalue())}") from None
    except Exception as err:  # noqa: BLE001 - any failure to build the run is this study's input error
        raise StudyError(f"run '{run.spec.name}' (seed {run.seed}): {type(err).__name__}: {err}") from None
    sys.stderr.write(stderr.getvalue())  # warnings of a run that builds are the user's to see
    input_shape = getattr(cli.datamodule, "input_shape", None)
    if input_shape is not None and hasattr(cli.model, "check_input_shape"):
        try:
            cli.model.check_input_shape(input_shape)
        except ValueError as err:
            raise StudyError(f"run '{run.spec.name}' (seed {run.seed}): {err}") from None
    config = cli.config.clone()
    for key in DISPLAY_KEYS:
        config[key] = None
    resolved = yaml.safe_load(cli.parser.dump(config, skip_check=True))
    defaults = yaml.safe_load(cli.parser.dump(cli.parser.get_defaults(), skip_check=True))
    settings = yaml.safe_dump(non_default_settings(resolved, defaults), sort_keys=True)
    teacher_hash = run.teacher.config_hash if run.teacher else ""
    return hashlib.sha256(f"{settings}\n{teacher_hash}".encode()).hexdigest()


def non_default_settings(value: Any, default: Any = None) -> Any:
    """``value`` (a resolved config) without the settings equal to their defaults: the parser's for plain
    sections, the class signature's for ``class_path``/``init_args`` objects. A run's hash is taken over this, so
    that a new option with a default (a package upgrade) does not make finished runs train again, while any
    setting a config or override gives, default or not, still counts when it differs from the default."""
    if isinstance(value, list):
        return [non_default_settings(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "class_path" in value:
        signature_defaults = _signature_defaults(str(value["class_path"]))
        init_args = {k: non_default_settings(v) for k, v in (value.get("init_args") or {}).items()
                     if k not in signature_defaults or plain_value(signature_defaults[k]) != plain_value(v)}
        return {"class_path": value["class_path"], **({"init_args": init_args} if init_args else {})}
    default = default if isinstance(default, dict) else {}
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):  # a section: kept when something in it differs
            section = non_default_settings(item, default.get(key))
            if section:
                out[key] = section
        elif key not in default or plain_value(default[key]) != plain_value(item):
            out[key] = non_default_settings(item)
    return out


def _signature_defaults(class_path: str) -> dict[str, Any]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    defaults: dict[str, Any] = {}
    for klass in getattr(cls, "__mro__", ()):  # a subclass's **kwargs reach its bases' arguments
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(p.name, p.default)
    return defaults


# -- running ----------------------------------------------------------------------------------------------------
def network_stats(net: torch.nn.Module, input_shape: Sequence[int], repeats: int = 300) -> dict[str, Any]:
    """Parameters, size on disk of the state_dict (KB) and best-of-``repeats`` CPU latency of one single-image
    forward pass on one thread (µs); the minimum is the stable statistic on a shared machine."""
    net = copy.deepcopy(net).cpu().eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.rand(1, *input_shape)
        times = []
        with torch.inference_mode():
            for _ in range(20):
                net(x)
            for _ in range(repeats):
                start = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"params": sum(p.numel() for p in net.parameters()), "size_kb": buffer.tell() / 1024,
            "latency_us": min(times) * 1e6}


def _checkpoint_step(path: Path) -> int | None:
    return torch.load(path, map_location="cpu", weights_only=False).get("global_step")


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
    from kd_lightning.cli import cli_main

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
    network = model.trainable_module() if hasattr(model, "trainable_module") else model
    input_shape = getattr(datamodule, "input_shape", None)
    score = checkpoints[0].best_model_score
    result = RunResult(
        run=run.spec.name, seed=run.seed, test_acc_best=float(test_best["test/acc"]),
        test_acc_last=float(test_last["test/acc"]), best_val_acc=None if score is None else float(score),
        best_ckpt_step=_checkpoint_step(best), last_ckpt_step=_checkpoint_step(last),
        **(network_stats(network, input_shape) if input_shape is not None else {}),
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
                        help=f"CPU threads for PyTorch (default: {default_threads or 'PyTorch’s choice'}); tiny "
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
    from kd_lightning.cli import _exit_with_error

    try:
        spec = load_study(study_file)
        if options.seeds:
            if len(set(options.seeds)) != len(options.seeds):
                raise StudyError(f"--seeds must be distinct, got {options.seeds}.")
            spec = replace(spec, seeds=tuple(options.seeds))
        sets = _parse_sets(options.overrides)
        if options.verbose:
            sets = {"trainer.enable_progress_bar": True, "trainer.enable_model_summary": True, **sets}
        spec = with_overrides(spec, sets)
        out = Path(options.out or default_out)
        if options.threads is not None:
            if options.threads < 1:
                raise StudyError(f"--threads must be >= 1, got {options.threads}.")
            torch.set_num_threads(options.threads)
        start = time.perf_counter()
        with contextlib.nullcontext() if options.verbose else quiet_lightning():
            rows = run_study(spec, out)
    except StudyError as err:
        _exit_with_error(err)
        raise  # unreachable: _exit_with_error exits
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
