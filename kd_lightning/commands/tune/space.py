"""What a search searches: :class:`TuneSpec`, read from the ``tune:`` block of a tune file or of a study's run,
checked before any trial (a bad space is one line). Imports nothing of kd_lightning: the study's spec reads its
runs' blocks with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

TUNE_KEYS = ("space", "trials", "metric", "direction", "pruner", "timeout", "startup_trials")
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {"float": ("type", "low", "high", "log", "step"), "int": ("type", "low", "high", "log", "step"),
              "categorical": ("type", "choices")}
PRUNERS = ("median", "hyperband", "none")
PRUNER_KEYS = {"median": ("type", "startup_trials", "warmup_steps"),
               "hyperband": ("type", "min_resource", "reduction_factor"), "none": ("type",)}
DIRECTIONS = ("maximize", "minimize")


class TuneError(ValueError):
    """A search that cannot run as written; one line before any trial."""


@dataclass(frozen=True)
class TuneSpec:
    """What to search: ``space`` maps dotted config keys to distributions (``{type: float, low, high, log}``,
    ``{type: int, low, high, step}``, ``{type: categorical, choices: [...]}``), ``trials`` is the budget (complete,
    pruned and failed trials count; stopped ones are retried), ``metric`` the logged validation metric whose best
    value is the objective."""

    space: dict[str, dict[str, Any]]
    trials: int
    metric: str = "val/acc"
    direction: str = "maximize"
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    timeout: float | None = None
    startup_trials: int | None = None  # TPE's random trials first; default: a third of the budget, at most 10

    @property
    def tpe_startup_trials(self) -> int:
        return self.startup_trials if self.startup_trials is not None else min(10, max(1, math.ceil(self.trials / 3)))


def _param(key: str, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TuneError(f"{where}: space['{key}'] must be a mapping such as {{type: float, low: 0.5, high: 8, "
                        f"log: true}} or {{type: categorical, choices: [a, b]}}; got {value!r}.")
    kind = value.get("type")
    if kind not in PARAM_TYPES:
        raise TuneError(f"{where}: space['{key}']: unknown type {kind!r} (known: {', '.join(PARAM_TYPES)}).")
    unknown = [k for k in value if k not in PARAM_KEYS[kind]]
    if unknown:
        raise TuneError(f"{where}: space['{key}']: unknown key {', '.join(map(repr, unknown))} for type {kind} "
                        f"(known: {', '.join(PARAM_KEYS[kind])}).")
    if kind == "categorical":
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{where}: space['{key}']: choices must be a non-empty list, got {choices!r}.")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise TuneError(f"{where}: space['{key}']: choices must be numbers, strings, booleans or null "
                            "(Optuna stores them as they are).")
        return {"type": kind, "choices": list(choices)}
    number = int if kind == "int" else (int, float)
    low, high = value.get("low"), value.get("high")
    for name, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, number):
            raise TuneError(f"{where}: space['{key}']: {name} must be {'an integer' if kind == 'int' else 'a number'}, "
                            f"got {bound!r}.")
    if low > high:
        raise TuneError(f"{where}: space['{key}']: low ({low}) > high ({high}).")
    log, step = bool(value.get("log", False)), value.get("step")
    if log and low <= 0:
        raise TuneError(f"{where}: space['{key}']: a log scale needs low > 0, got low={low}.")
    if step is not None:
        if log:
            raise TuneError(f"{where}: space['{key}']: step and log cannot go together (Optuna's rule).")
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise TuneError(f"{where}: space['{key}']: step must be a positive number, got {step!r}.")
    param = {"type": kind, "low": low if kind == "int" else float(low), "high": high if kind == "int" else float(high),
             "log": log}
    if step is not None:
        param["step"] = step
    return param


def parse_tune(data: Any, where: str, owned: Sequence[str] = ()) -> TuneSpec:
    """A :class:`TuneSpec` from a ``tune:`` mapping, or one clear error; ``owned``: keys the runner sets (the seed,
    output folders, the teacher), which no search may search."""
    if not isinstance(data, dict):
        raise TuneError(f"{where}: tune must be a mapping with keys {', '.join(TUNE_KEYS)}.")
    unknown = [k for k in data if k not in TUNE_KEYS]
    if unknown:
        raise TuneError(f"{where}: unknown key {', '.join(map(repr, unknown))} (known: {', '.join(TUNE_KEYS)}).")
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise TuneError(f"{where}: 'space' is required: dotted config keys to distributions, e.g. "
                        "{model.init_args.terms.kd.init_args.temperature: {type: float, low: 1, high: 16, log: true}}.")
    for key in space:
        if not isinstance(key, str) or not key:
            raise TuneError(f"{where}: space keys must be dotted config keys, got {key!r}.")
        if key in owned:
            raise TuneError(f"{where}: space['{key}'] is set by the runner (seed, output folders, teacher); "
                            "it cannot be searched.")
    trials = data.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise TuneError(f"{where}: 'trials' is required: the number of trials, a positive integer; got {trials!r}.")
    direction = data.get("direction", "maximize")
    if direction not in DIRECTIONS:
        raise TuneError(f"{where}: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}.")
    metric = data.get("metric", "val/acc")
    if not isinstance(metric, str) or not metric.startswith("val/"):
        raise TuneError(f"{where}: metric must be a validation metric the run logs (val/...), got {metric!r}: "
                        "a search never reads the test split.")
    pruner = data.get("pruner", "median")
    pruner = {"type": pruner} if isinstance(pruner, str) or pruner is None else pruner
    if not isinstance(pruner, dict) or str(pruner.get("type")) not in PRUNERS:
        raise TuneError(f"{where}: pruner must be one of {', '.join(PRUNERS)} (or a mapping with 'type'), "
                        f"got {data.get('pruner')!r}.")
    pruner = {**pruner, "type": str(pruner["type"])}
    bad = [k for k in pruner if k not in PRUNER_KEYS[pruner["type"]]]
    if bad:
        raise TuneError(f"{where}: pruner {pruner['type']}: unknown key {', '.join(map(repr, bad))} "
                        f"(known: {', '.join(PRUNER_KEYS[pruner['type']])}).")
    timeout = data.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise TuneError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}.")
    startup = data.get("startup_trials")
    if startup is not None and (isinstance(startup, bool) or not isinstance(startup, int) or startup < 0):
        raise TuneError(f"{where}: startup_trials must be a non-negative integer, got {startup!r}.")
    return TuneSpec(space={k: _param(k, v, where) for k, v in space.items()}, trials=trials, metric=metric,
                    direction=direction, pruner=pruner, timeout=None if timeout is None else float(timeout),
                    startup_trials=startup)


