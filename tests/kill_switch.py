"""A callback for tests that stops the training process as a scheduler or a crash would: a signal sent to itself
at the start of a given training batch (``epoch``, ``batch``), at the end of a given validation batch of that
epoch (``stage="validation"``), or while a checkpoint is being written (``stage="checkpoint"``: the n-th save,
``batch`` = n). ``signal_name: RAISE`` raises an error instead (a run that fails); ``once_marker``: only while that
file does not exist (it is created first), so that the run's second attempt goes through. Named in a config as
``kill_switch.KillAt`` with ``tests/`` on ``PYTHONPATH``."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    def __init__(self, epoch: int, batch: int = 0, signal_name: str = "SIGKILL", rank: int = 0,
                 stage: str = "train", once_marker: str | None = None) -> None:
        self.at, self.rank, self.stage, self.once_marker = (epoch, batch), rank, stage, once_marker
        self.signum = None if signal_name == "RAISE" else getattr(signal, signal_name)
        self.saves = 0

    def _kill(self, trainer, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == self.at and trainer.global_rank == self.rank:
            self._fire()

    def _fire(self) -> None:
        if self.once_marker is not None:
            if os.path.exists(self.once_marker):
                return
            open(self.once_marker, "w").close()
        if self.signum is None:
            raise RuntimeError("a failure the test asked for")
        os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stage == "train":
            self._kill(trainer, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "validation" and not trainer.sanity_checking:
            self._kill(trainer, batch_idx)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # called while the checkpoint is being assembled, before its file is written: the process dies mid-write
        if self.stage == "checkpoint" and trainer.global_rank == self.rank:
            if self.saves == self.at[1]:
                self._fire()
            self.saves += 1
