"""When Lightning writes what a training step logs: its logging step axis and whether this step is written.

Lightning writes the values a training step logs every ``trainer.log_every_n_steps`` optimizer steps, on the axis
of ``fit_loop.epoch_loop._batches_that_stepped`` (what ``LearningRateMonitor`` uses too; at a batch's end it
still counts the batches before this one). No public name gives either, so both are read here, in one place,
pinned by ``tests/test_pinned_internals.py``. A value logged on a step that is not written is overwritten unseen:
logging it costs time (each ``self.log`` walks Lightning's result collection: over a millisecond on a CPU, which
a short GPU step feels) and shows nothing.
"""

from __future__ import annotations

from typing import Any


def logging_step(trainer: Any) -> int:
    """The step at which this training batch's logged values appear in the loggers."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def is_logged_step(trainer: Any, every: int | None = None) -> bool:
    """Whether the loggers will write this training batch's values (every ``every`` steps, default the trainer's
    ``log_every_n_steps``); the same on every rank, as it depends on the step counter only."""
    every = every or trainer.log_every_n_steps
    return every >= 1 and (logging_step(trainer) + 1) % every == 0


def is_read_step(trainer: Any) -> bool:
    """Whether anyone reads what this training batch logs: the loggers (:func:`is_logged_step`), and callbacks at
    the end of an epoch or of the run (``trainer.callback_metrics``, e.g. early stopping on ``train/loss``)."""
    last_step = 0 < trainer.max_steps <= trainer.global_step + 1
    return is_logged_step(trainer) or trainer.is_last_batch or last_step
