r"""
OptunaPruning
^^^^^^^^^^^^^

Reports a validation metric to an Optuna trial after every validation and stops the fit when the trial's pruner
says the trial is not worth finishing (``kd-lightning tune`` adds it to every trial; it is not a config setting).

The trial's objective is the best value reported, :math:`\max_v m_v` (or :math:`\min_v m_v` when minimising), over
the validations :math:`v` of the fit: the value ``ModelCheckpoint(monitor=...)`` keeps as ``best.ckpt``. A trial
resumed from a stopped one first reports the stopped trial's values (``previous``), so its pruning and objective
see the whole run. Under DDP, rank 0 asks the pruner and every rank follows its decision.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override


class MetricNotLogged(ValueError):
    """The monitored metric is not among those the validation logged (a misspelt name): no trial can succeed."""


class OptunaPruning(pl.Callback):
    """Args:
        trial: the ``optuna.Trial`` this fit is.
        monitor: the logged validation metric, e.g. ``val/acc``.
        direction: ``maximize`` or ``minimize``: which value is best.
        previous: ``{step: value}`` already reported by the trial this one resumes.
    """

    def __init__(self, trial: Any, monitor: str = "val/acc", direction: str = "maximize",
                 previous: dict[int, float] | None = None) -> None:
        super().__init__()
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}.")
        self.trial, self.monitor, self.direction = trial, monitor, direction
        self.values: dict[int, float] = {}  # step -> the metric at that validation
        self.pruned = False
        for step, value in sorted((previous or {}).items()):
            self._report(int(step), float(value))

    def _report(self, step: int, value: float) -> None:
        self.values[step] = value
        self.trial.report(value, step)

    @property
    def best(self) -> float | None:
        """The objective: the best value reported (None before any validation)."""
        if not self.values:
            return None
        return max(self.values.values()) if self.direction == "maximize" else min(self.values.values())

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            names = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/"))) or "none"
            raise MetricNotLogged(f"the search's metric {self.monitor!r} was not logged by the validation "
                                  f"(validation metrics logged: {names}).")
        prune = False
        if trainer.is_global_zero:
            self._report(trainer.global_step, float(value))
            prune = self.trial.should_prune()
        self.pruned = trainer.strategy.broadcast(prune, src=0)
        if self.pruned:
            trainer.should_stop = True  # a clean stop at this boundary (checkpoints and logs closed); then pruned
