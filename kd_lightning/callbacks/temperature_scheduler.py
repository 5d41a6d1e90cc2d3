r"""
ScalarScheduler (alias TemperatureScheduler)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Schedules any float attribute of the LightningModule during training, named by a dotted path: the distillation
temperature (``TemperatureScheduler``'s default: every term's temperature), or any term's float such as
``terms.kd.temperature``, ``terms.hint.weight`` or ``terms.dkd.beta`` (see :mod:`kd_lightning.distillers`).
``TemperatureScheduler`` is the same callback with ``attribute="temperature"`` as its default (and the name
older configs and checkpoints use).

With :math:`t` the epoch (``interval="epoch"``, from 0) or the optimizer step (``interval="step"``), the
start value :math:`v_0`, the end value :math:`v_1` and the duration :math:`D` (in units of :math:`t`):

- ``constant``: :math:`v(t) = v_0`.
- ``step`` (period ``every`` = :math:`k`): :math:`v_0 + \delta \lfloor t/k \rfloor` (``delta``) or
  :math:`v_0 \gamma^{\lfloor t/k \rfloor}` (``gamma``).
- ``linear``: :math:`v_0 + \delta t` (``delta``) or :math:`v_0 + (v_1 - v_0)\,p` (``end``).
- ``exponential``: :math:`v_0 \gamma^t` (``gamma``) or :math:`v_0 (v_1 / v_0)^p` (``end``).
- ``cosine``: :math:`v_1 + (v_0 - v_1)(1 + \cos \pi p) / 2` (``end``).

where :math:`p = \min(t / D, 1)` is the progress; by default :math:`D` is the whole run (``max_epochs - 1``
epochs or ``estimated_stepping_batches - 1`` steps), so that the last epoch (step) trains at exactly
:math:`v_1`. The result is then clipped to ``[min_value, max_value]`` (the floor and ceiling).

Recipes::

    # "start at T=4, lower by 0.2 every 10 epochs", never below 1
    TemperatureScheduler(schedule="step", start=4.0, delta=-0.2, every=10, min_value=1.0)
    # T = max(2, 4 - 0.02 * epoch)
    TemperatureScheduler(schedule="linear", start=4.0, delta=-0.02, min_value=2.0)
    # T from 8 down to 2 over the run, on a cosine, updated every optimizer step
    TemperatureScheduler(schedule="cosine", start=8.0, end=2.0, interval="step")
    # a distillation weight ramping linearly from 0 to 0.9 over 20 epochs, then staying
    ScalarScheduler(attribute="terms.kd.weight", schedule="linear", start=0.0, end=0.9, duration=20)
    # the hint term's weight from 100 down to 10 over the run
    ScalarScheduler(attribute="terms.hint.weight", schedule="cosine", start=100.0, end=10.0)

The value is a pure function of the epoch or step, so it is the same on every DDP rank without
communication, and a resumed run (which restores the epoch and step) continues on the same curve; the
resolved ``start`` and ``duration`` are saved in the checkpoint so that a resume with a different
``max_epochs`` still follows the original curve.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from kd_lightning.log_steps import is_read_step

SCHEDULES = ("constant", "step", "linear", "exponential", "cosine")

# Which of delta / gamma / end each schedule accepts: exactly one of the listed options must be given.
_RATE_ARGS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "step": ("delta", "gamma"),
    "linear": ("delta", "end"),
    "exponential": ("gamma", "end"),
    "cosine": ("end",),
}


def _get_attr(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _set_attr(obj: Any, path: str, value: float) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        obj = getattr(obj, parent)
    setattr(obj, name, value)


class ScalarScheduler(Callback):
    r"""Schedules the float ``pl_module.<attribute>`` (a dotted path) per epoch or per optimizer step.

    See the module docstring for the formulas. The value is applied before every training epoch
    (``interval="epoch"``) or batch (``interval="step"``) and before the sanity-check validation, so
    validation uses the value of the epoch it ends.

    Logging: :class:`~kd_lightning.module.DistillationModule` already logs ``train/temperature`` in each
    training step (it sees the scheduled value), so for ``attribute="temperature"`` on that module nothing
    more is logged; any other attribute is logged as ``train/<attribute>`` every step (written at the
    trainer's ``log_every_n_steps``).

    Args:
        schedule: ``"constant"``, ``"step"``, ``"linear"``, ``"exponential"`` or ``"cosine"``.
        start: the value at ``t = 0``; ``None``: the module's own value when training first starts.
        end: the value reached after ``duration`` (linear, exponential, cosine).
        delta: additive change per ``every`` epochs/steps (step) or per epoch/step (linear).
        gamma: multiplicative factor per ``every`` epochs/steps (step) or per epoch/step (exponential); > 0.
        every: the period ``k`` of the step schedule (e.g. 10: change every 10 epochs).
        duration: :math:`D`, the epoch (step) from which the value is ``end``; ``None``: the last epoch
            (``max_epochs - 1``) or the last step of the run.
        interval: ``"epoch"`` or ``"step"`` (optimizer steps, i.e. ``trainer.global_step``).
        min_value: floor of the value (``None``: none). A temperature must stay > 0 and a weight >= 0.
        max_value: ceiling of the value (``None``: none).
        attribute: the module attribute to schedule: ``"temperature"`` (every term's; with terms of different
            temperatures give ``start``) or a dotted path such as ``"terms.kd.temperature"`` or
            ``"terms.hint.weight"``. Checked before anything is written.
    """

    def __init__(self, schedule: Literal["constant", "step", "linear", "exponential", "cosine"] = "constant",
                 start: float | None = None, end: float | None = None, delta: float | None = None,
                 gamma: float | None = None, every: int = 1, duration: int | None = None,
                 interval: Literal["epoch", "step"] = "epoch", min_value: float | None = None,
                 max_value: float | None = None, attribute: str = "temperature") -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(map(repr, SCHEDULES))}.")
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}.")
        given = {name: value for name, value in (("delta", delta), ("gamma", gamma), ("end", end))
                 if value is not None}
        allowed = _RATE_ARGS[schedule]
        unused = sorted(set(given) - set(allowed))
        if unused:
            raise ValueError(f"The {schedule!r} schedule does not use {', '.join(unused)}"
                             + (f"; it takes exactly one of {', '.join(allowed)}." if allowed else "."))
        if allowed and len(given) != 1:
            raise ValueError(f"The {schedule!r} schedule needs exactly one of {', '.join(allowed)}; "
                             f"got {', '.join(given) or 'none'}.")
        if gamma is not None and gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}.")
        if every != 1 and schedule != "step":
            raise ValueError(f"every is used by the 'step' schedule only, not by {schedule!r}.")
        if duration is not None:
            if isinstance(duration, bool) or not isinstance(duration, int) or duration < 1:
                raise ValueError(f"duration must be a positive int (epochs or steps), got {duration!r}.")
            if end is None:
                raise ValueError("duration applies to a schedule going from start to end; give `end` too.")
        if min_value is not None and max_value is not None and min_value > max_value:
            raise ValueError(f"min_value ({min_value}) is above max_value ({max_value}).")
        if schedule == "exponential" and end is not None:
            if (start is not None and start <= 0) or end <= 0:
                raise ValueError(f"An exponential schedule from start to end needs both > 0, got start={start}, "
                                 f"end={end}.")
        if not isinstance(attribute, str) or not attribute or not all(attribute.split(".")):
            raise ValueError(f"attribute must be an attribute name or dotted path, got {attribute!r}.")
        self.schedule = schedule
        self.start = None if start is None else float(start)
        self.end = None if end is None else float(end)
        self.delta = None if delta is None else float(delta)
        self.gamma = None if gamma is None else float(gamma)
        self.every = every
        self.duration = duration
        self.interval = interval
        self.min_value = min_value
        self.max_value = max_value
        self.attribute = attribute
        self._check_value_range(min_value, "min_value")
        self._check_value_range(max_value, "max_value")
        # resolved at the first application (or restored from a checkpoint)
        self._start: float | None = self.start
        self._duration: int | None = duration
        self._log_key: str | None = None
        self.value: float | None = None  # the last value applied

    @property
    def state_key(self) -> str:
        # one scheduler per attribute may live in the same trainer (a temperature and a weight)
        return self._generate_state_key(attribute=self.attribute)

    # -- the schedule -----------------------------------------------------------------------------------------
    def value_at(self, t: int) -> float:
        """The scheduled value at epoch or step ``t`` (needs ``start``, and ``duration`` where it is used)."""
        if self._start is None:
            raise RuntimeError("start is not known yet: pass start=... or call this after training has started.")
        v0, kind = self._start, self.schedule
        if kind == "constant":
            value = v0
        elif kind == "step":
            n = t // self.every
            value = v0 + self.delta * n if self.delta is not None else v0 * self.gamma ** n
        elif self.end is None:  # a rate: linear with delta, exponential with gamma
            value = v0 + self.delta * t if kind == "linear" else v0 * self.gamma ** t
        else:
            if self._duration is None:
                raise RuntimeError("duration is not known yet: pass duration=... or call this after training "
                                   "has started.")
            p = min(t / self._duration, 1.0) if self._duration > 0 else 1.0  # progress in [0, 1]
            v1 = self.end
            if kind == "linear":
                value = v0 + (v1 - v0) * p
            elif kind == "exponential":
                value = v0 * (v1 / v0) ** p
            else:  # cosine
                value = v1 + (v0 - v1) * (1.0 + math.cos(math.pi * p)) / 2.0
        if self.min_value is not None:
            value = max(value, self.min_value)
        if self.max_value is not None:
            value = min(value, self.max_value)
        return float(value)

    def _check_value_range(self, value: float | None, what: str) -> None:
        if value is None:
            return
        last = self.attribute.rsplit(".", 1)[-1]
        if last == "temperature" and value <= 0:
            raise ValueError(f"The temperature must stay > 0, but {what} is {value}. Set min_value > 0.")
        if last == "weight" and value < 0:
            raise ValueError(f"A term's weight must stay >= 0, but {what} is {value}. Set min_value >= 0.")

    # -- hooks ------------------------------------------------------------------------------------------------
    def check_settings(self, pl_module: "pl.LightningModule", datamodule: Any = None, stage: str = "fit") -> None:
        """A clear error, before anything is written, when ``pl_module`` has no such float to schedule, or when
        ``temperature`` names several terms of different temperatures and no ``start`` says where to begin."""
        if stage != "fit":
            return
        if self.attribute == "temperature" and hasattr(pl_module, "common_temperature"):
            if not pl_module.temperatures():
                raise ValueError(f"{type(self).__name__}: {type(pl_module).__name__} has no attribute 'temperature' to "
                                 "schedule: none of its terms has one. Its float attributes are: "
                                 f"{', '.join(pl_module.schedulable_floats()) or 'none'}.")
            if self.start is None and pl_module.common_temperature() is None:
                raise ValueError(f"{type(self).__name__}: 'temperature' moves every term's temperature, but the terms "
                                 f"start from different ones {pl_module.temperatures()}: give `start`, or schedule one "
                                 f"term, e.g. attribute: terms.{next(iter(pl_module.temperatures()))}.temperature.")
            return
        try:
            current = _get_attr(pl_module, self.attribute)
        except AttributeError:
            names = sorted(k for k, v in vars(pl_module).items()
                           if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool))
            if hasattr(pl_module, "schedulable_floats"):
                names = sorted(set(names) | set(pl_module.schedulable_floats()))
            hint = (" 'alpha' was the shorthand's soft weight: schedule terms.kd.weight, and terms.ce.weight (1 - alpha)"
                    " with a second scheduler." if self.attribute == "alpha" else "")
            raise ValueError(f"{type(self).__name__}: {type(pl_module).__name__} has no attribute "
                             f"{self.attribute!r} to schedule. Its float attributes are: "
                             f"{', '.join(names) or 'none'}.{hint}") from None
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ValueError(f"{type(self).__name__}: {type(pl_module).__name__}.{self.attribute} is "
                             f"{type(current).__name__}, not a float; only float attributes can be scheduled.")

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self.check_settings(pl_module, trainer.datamodule)
        # the distillation module logs train/temperature itself
        logs_itself = self.attribute == "temperature" and hasattr(pl_module, "temperatures")
        self._log_key = None if logs_itself else f"train/{self.attribute}"

    def describe_for_hparams(self) -> dict[str, Any]:
        """This schedule as one HPARAMS entry, e.g. ``schedule/temperature: cosine 8.0 -> 2.0 per epoch``."""
        rate = "".join(f" {name} {value}" for name, value in (("delta", self.delta), ("gamma", self.gamma))
                       if value is not None)
        return {f"schedule/{self.attribute}": f"{self.schedule} {self.start} -> {self.end}{rate} per {self.interval}"}

    def _resolve(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._start is None:
            self._start = float(_get_attr(pl_module, self.attribute))
            if self.schedule == "exponential" and self.end is not None and self._start <= 0:
                raise ValueError(f"An exponential schedule to end={self.end} needs a start > 0; the module's "
                                 f"{self.attribute} is {self._start}.")
        if self._duration is None and self.end is not None:
            if self.interval == "epoch":
                if trainer.max_epochs is None or trainer.max_epochs < 1:
                    raise ValueError(f"The {self.schedule!r} schedule runs over the whole training, but max_epochs "
                                     "is not set: set trainer.max_epochs or the scheduler's duration (epochs).")
                total = trainer.max_epochs
            else:
                total = trainer.estimated_stepping_batches
                if not math.isfinite(total):
                    raise ValueError(f"The {self.schedule!r} schedule runs over the whole training, whose length in "
                                     "steps is unknown: set max_steps or the scheduler's duration (steps).")
            self._duration = max(int(total) - 1, 0)  # the last epoch/step uses `end`

    def _apply(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._resolve(trainer, pl_module)
        t = trainer.current_epoch if self.interval == "epoch" else trainer.global_step
        value = self.value_at(t)
        try:
            self._check_value_range(value, f"the scheduled value at {self.interval} {t}")
        except ValueError as err:
            raise ValueError(f"TemperatureScheduler: {err}") from None
        _set_attr(pl_module, self.attribute, value)
        self.value = value

    @override
    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._apply(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.interval == "epoch":
            self._apply(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.interval == "step":
            self._apply(trainer, pl_module)
        if self._log_key is not None and is_read_step(trainer):  # only what the loggers write: no per-step cost
            pl_module.log(self._log_key, float(_get_attr(pl_module, self.attribute)), on_step=True,
                          on_epoch=False, batch_size=1)

    # -- checkpointing ------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": self._start, "duration": self._duration, "value": self.value}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start = state_dict["start"]
        self._duration = state_dict["duration"]
        self.value = state_dict.get("value")


class TemperatureScheduler(ScalarScheduler):
    """:class:`ScalarScheduler` with ``attribute="temperature"`` by default: the distillation temperature (every
    term that has one). Any float can still be scheduled through ``attribute``."""

    def __init__(self, schedule: Literal["constant", "step", "linear", "exponential", "cosine"] = "constant",
                 start: float | None = None, end: float | None = None, delta: float | None = None,
                 gamma: float | None = None, every: int = 1, duration: int | None = None,
                 interval: Literal["epoch", "step"] = "epoch", min_value: float | None = None,
                 max_value: float | None = None, attribute: str = "temperature") -> None:
        super().__init__(schedule, start, end, delta, gamma, every, duration, interval, min_value, max_value,
                         attribute)
