"""A study file read into :class:`StudySpec`: its runs, seeds and overrides, checked before anything runs.

The format is in the docstring of :mod:`kd_lightning.commands.study`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from kd_lightning.commands.tune.space import TuneError, parse_tune

STUDY_KEYS = ("title", "base", "seeds", "overrides", "runs", "x_label", "resources")
RUN_KEYS = ("configs", "overrides", "teacher", "once", "label", "group", "x", "resources", "tune")
# what a SLURM job of a run asks for (kd_lightning.commands.study.slurm): study-wide, per run, --resource KEY=VALUE
RESOURCE_KEYS = ("gpus", "cpus", "mem", "time", "partition", "account", "qos", "constraint", "sbatch", "setup")
SEED_PLACEHOLDER = "${seed}"
RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a folder name
# What the runner owns (the seed, where a run writes, its teacher's checkpoint): no study may set it, and no run's
# identity depends on it, so that the same study reached by another path is the same study.
OWNED_KEYS = ("seed_everything", "name", "teacher_run", "trainer.logger.init_args.save_dir",
              "trainer.logger.init_args.name", "trainer.logger.init_args.version", "checkpoint.dirpath",
              "last_checkpoint.dirpath", "model.init_args.teacher_checkpoint")


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
    resources: dict[str, Any] = field(default_factory=dict)
    tune: Any = None  # a TuneSpec (kd_lightning.commands.tune.space): searched on validation with the first seed


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
    resources: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str) -> RunSpec:
        return next(r for r in self.runs if r.name == name)

    def run_resources(self, extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Each run's SLURM resources: the study's, the run's, then ``extra`` (the command line's)."""
        return {r.name: {**self.resources, **r.resources, **(extra or {})} for r in self.runs}


def check_resources(value: Any, where: str) -> dict[str, Any]:
    """A ``resources`` mapping whose keys are :data:`RESOURCE_KEYS`, or one clear error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"{where}: resources must be a mapping, e.g. {{gpus: 1, time: '04:00:00'}}; got {value!r}.")
    unknown = [k for k in value if k not in RESOURCE_KEYS]
    if unknown:
        raise StudyError(f"{where}: unknown resource key {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(RESOURCE_KEYS)}).")
    for key in ("sbatch", "setup"):
        if key in value and not (isinstance(value[key], list) and all(isinstance(v, str) for v in value[key])):
            raise StudyError(f"{where}: resources.{key} must be a list of strings, got {value[key]!r}.")
    return dict(value)


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
        try:
            tune = None if run.get("tune") is None else parse_tune(run["tune"], f"{run_where}: tune", OWNED_KEYS)
        except TuneError as err:
            raise StudyError(str(err)) from None
        runs.append(RunSpec(name=name, configs=_config_paths(run.get("configs", []), run_where, folder), tune=tune,
                            overrides=_overrides(run.get("overrides"), f"{run_where}: overrides"),
                            teacher=teacher, once=run.get("once", False), label=str(run.get("label", "")),
                            group=str(run.get("group", "")), x=None if x is None else float(x),
                            resources=check_resources(run.get("resources"), run_where)))
    return StudySpec(path=path, title=str(data.get("title") or path.stem), seeds=tuple(seeds),
                     once_seed=seeds[0], base=_config_paths(data.get("base", []), f"{where}: base", folder),
                     overrides=_overrides(data.get("overrides"), f"{where}: overrides"), runs=tuple(runs),
                     x_label=str(data.get("x_label") or "x"),
                     resources=check_resources(data.get("resources"), where))


def read_yaml(path: Path, what: str) -> Any:
    """The YAML of the file ``path`` (a ``what``: study, tune file), or one clear error."""
    if not path.is_file():
        raise StudyError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    return parse_study(read_yaml(path, "study file"), path)


def with_overrides(spec: StudySpec, overrides: dict[str, Any]) -> StudySpec:
    """``spec`` with ``overrides`` applied to every run after the run's own (e.g. from ``--set``)."""
    extra = _overrides(overrides, "--set")
    return replace(spec, runs=tuple(replace(r, overrides={**r.overrides, **extra}) for r in spec.runs))


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
