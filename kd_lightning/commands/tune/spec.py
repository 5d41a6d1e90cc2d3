"""The :class:`TuneJob` every worker of a search runs: the run's kd-lightning arguments, the space
(:class:`kd_lightning.commands.tune.space.TuneSpec`), the budget and where the trials are stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd_lightning.commands.study.plan import _cli_value, fit_args, output_args
from kd_lightning.commands.tune.space import TuneError, TuneSpec

def lookup(config: Any, key: str) -> Any:
    """The value at dotted ``key`` in a nested mapping (a resolved config), or None."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested mappings (a config overlay): ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TuneError(f"'{key}' goes inside '{part}', which another key sets to a value.")
        node[last] = value
    return out


@dataclass
class TuneJob:
    """One search, as every worker runs it (written to ``<out>/tune.json``): the run's arguments without the
    trial's output folders and parameters, the space and budget, and where the trials are stored."""

    title: str
    out: str
    args: list[str]  # configs, quiet defaults, seed, overrides, teacher: what every trial shares
    seed: int
    spec: dict[str, Any]  # TuneSpec as a mapping
    storage: str  # sqlite:///..., journal:PATH or a database URL
    study_name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # for best.yaml (with the teacher, below)
    teacher: str | None = None
    configs: list[str] = field(default_factory=list)

    @property
    def tune(self) -> TuneSpec:
        return TuneSpec(**self.spec)

    @property
    def folder(self) -> Path:
        return Path(self.out)

    def trial_folder(self, number: int) -> Path:
        return self.folder / "trials" / f"trial_{number:04d}"

    def trial_args(self, folder: Path, params: dict[str, Any]) -> list[str]:
        """kd-lightning ``fit`` arguments of the trial that writes to ``folder`` (``<out>/trials/trial_<n>``, the
        run ``trials``, log version ``trial_<n>``) with ``params``."""
        return [*self.args, *(f"--{k}={_cli_value(v)}" for k, v in params.items()), *output_args(folder)]

    def settings_hash(self) -> str:
        """What the search is (run settings, space, budget's metric): a folder holding another search is refused."""
        spec = {k: v for k, v in self.spec.items() if k not in ("trials", "timeout")}
        args = [a for a in self.args if not a.startswith("--threads=")]  # speed, not what a trial trains
        return hashlib.sha256(json.dumps({"args": args, "spec": spec}, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_args(configs: list[str], overrides: dict[str, Any], seed: int, teacher: str | None) -> list[str]:
    """What every trial of a search shares: the run's :func:`~kd_lightning.commands.study.plan.fit_args` and its
    teacher."""
    return [*fit_args(configs, overrides, seed), *(teacher_args(teacher) if teacher else [])]


def teacher_args(teacher: str) -> list[str]:
    """The teacher every trial distils from, pinned (a config's ``teacher_run`` is resolved once, not per trial)."""
    return ["--teacher_run=null", f"--model.init_args.teacher_checkpoint={teacher}"]
