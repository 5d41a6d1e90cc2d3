"""Planning a study: every run of every seed with its kd-lightning arguments, built and checked through the CLI
before anything trains, and a hash of what it trains (its identity: settings only, never where it is written).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from kd_lightning.commands.config_errors import condense
from kd_lightning.commands.errors import plain_value
from kd_lightning.commands.study.spec import OWNED_KEYS, RunSpec, StudyError, StudySpec, substitute_seed

# Per-run chatter would bury the one progress line per run; a study may turn these back on in its overrides.
QUIET_ARGS = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
# Where a run writes and which file its teacher is: never part of its identity, so that the same study reached by
# another path (relative, absolute, a symlink, another working directory) is the same study.
RUNNER_PATHS = tuple(key for key in OWNED_KEYS if key != "seed_everything")
# Display and speed settings, left out of a run's config hash: --verbose or --threads must not make a study train again.
DISPLAY_KEYS = ("trainer.enable_progress_bar", "trainer.enable_model_summary", "threads")


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


def _cli_value(value: Any) -> str:
    # jsonargparse reads command-line values as YAML, of which JSON is a subset; plain strings go as they are
    return value if isinstance(value, str) else json.dumps(value)


def fit_args(configs: Sequence[Path | str], overrides: dict[str, Any], seed: int) -> list[str]:
    """What a run trains: its configs, then the runner's quiet defaults, the seed and the overrides (dotted keys)."""
    return [*(f"--config={c}" for c in configs), *QUIET_ARGS, f"--seed_everything={seed}",
            *(f"--{key}={_cli_value(value)}" for key, value in overrides.items())]


def output_args(folder: Path) -> list[str]:
    """Where a run writes, ``<save_dir>/<name>/<version>``: the run ``folder.parent.name`` (its name and logger
    name), log version ``folder.name``, checkpoints in ``folder/checkpoints``."""
    return [f"--name={folder.parent.name}", f"--trainer.logger.init_args.save_dir={folder.parent.parent}",
            f"--trainer.logger.init_args.name={folder.parent.name}",
            f"--trainer.logger.init_args.version={folder.name}",
            f"--checkpoint.dirpath={folder / 'checkpoints'}"]


def run_args(spec: StudySpec, run: RunSpec, seed: int, folder: Path) -> list[str]:
    """The kd-lightning arguments of ``run`` for ``seed`` (written to ``folder``, ``<out>/<run>/seed_<seed>``):
    :func:`fit_args` with the study's and the run's overrides, no ``teacher_run`` (the study gives each student its
    teacher), and last the output folders (which nothing may override)."""
    overrides = substitute_seed({**spec.overrides, **run.overrides}, seed)
    return [*fit_args((*spec.base, *run.configs), overrides, seed), "--teacher_run=null", *output_args(folder)]


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


def _cli_error(stderr: str) -> str:
    """The message of a CLI error on one line: kd-lightning's own ``kd-lightning: error: ...`` line, else
    whatever jsonargparse printed, condensed."""
    at = stderr.rfind("kd-lightning: error: ")
    if at >= 0:
        return stderr[at + len("kd-lightning: error: "):].splitlines()[0]
    at = stderr.rfind("error: ")
    return condense(stderr[at + len("error: "):] if at >= 0 else stderr) or "the configuration was rejected"


def build_checked(args: list[str], where: str, trains_here: bool = True) -> Any:
    """The kd-lightning CLI of ``args`` built (model, data, trainer; nothing written) and the model checked on the
    data's input shape; any failure is one line, a :class:`StudyError` that starts with ``where``. ``trains_here``
    False: the trainer is built on the CPU (the run trains on another machine)."""
    from kd_lightning.commands.cli import cli_main

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli = cli_main(args, run=False, trainer_on_cpu=not trains_here)
    except SystemExit:
        raise StudyError(f"{where}: {_cli_error(stderr.getvalue())}") from None
    except Exception as err:  # noqa: BLE001 - any failure to build the run is this input's error
        raise StudyError(f"{where}: {type(err).__name__}: {err}") from None
    sys.stderr.write(stderr.getvalue())  # warnings of a run that builds are the user's to see
    input_shape = getattr(cli.datamodule, "input_shape", None)
    if input_shape is not None and hasattr(cli.model, "check_input_shape"):
        try:
            cli.model.check_input_shape(input_shape)
        except ValueError as err:
            raise StudyError(f"{where}: {err}") from None
    return cli


def check_and_hash(run: PlannedRun, trains_here: bool = True) -> str:
    """Parse ``run``'s config with the kd-lightning CLI and build its model, data and trainer (nothing is
    written), check the model runs on the data's input shape, and return a hash of the resolved config (and of
    the teacher's, so a retrained teacher reruns its students). A run that trains elsewhere (``trains_here``
    False: a SLURM job) has its trainer built on the CPU, the GPUs it asks for being on another machine; its hash
    is the same."""
    # the teacher's checkpoint does not exist yet: build a random teacher of the configured architecture
    args = run.args + (["--model.init_args.teacher_checkpoint=null"] if run.teacher else [])
    cli = build_checked(args, f"run '{run.spec.name}' (seed {run.seed})", trains_here)
    config = cli.config.clone()
    for key in (*DISPLAY_KEYS, *RUNNER_PATHS):  # not what the run trains: where it writes, how it displays
        if key in config:
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
