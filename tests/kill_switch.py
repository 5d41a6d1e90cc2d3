"""A callback for tests that stops the training process as a scheduler or a crash would: a signal sent to itself
at the start of a given batch (``epoch``, ``batch``). Named in a subprocess's config as
``kill_switch.KillAt`` with ``tests/`` on ``PYTHONPATH``."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    def __init__(self, epoch: int, batch: int = 0, signal_name: str = "SIGKILL", rank: int = 0) -> None:
        self.at, self.signum, self.rank = (epoch, batch), getattr(signal, signal_name), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.at and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
