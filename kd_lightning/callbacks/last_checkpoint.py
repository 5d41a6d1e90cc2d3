r"""
LastCheckpoint
^^^^^^^^^^^^^^

``last.ckpt`` as the latest state of the run, whatever the monitored metric does, and a checkpoint on preemption.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when it also saves a top-k checkpoint,
so with ``monitor="val/acc"`` it lags behind to the last improvement: a killed job loses every epoch since then,
and resuming a finished run from it trains epochs again. This callback owns ``last.ckpt`` instead:

* written at the end of every training epoch, and after every validation that runs inside an epoch (step-based
  runs, ``val_check_interval``), through ``trainer.save_checkpoint`` (written whole, then moved into place);
* written when the run is stopped by ``SIGTERM`` (Lightning stops at the next batch boundary and raises
  ``SIGTERMException``), and ``SIGUSR1`` is handled the same way outside SLURM. The process then exits with
  status 143 (128 + SIGTERM), so that a scheduler sees a preempted job, not a success. A signal that arrives
  while the run validates takes effect when that validation ends: its ``val/*`` points are logged and
  ``best.ckpt`` sees it, so a resumed run has every validation of the uninterrupted one (a validation of the
  student takes seconds; schedulers give a grace period, e.g. SLURM's ``--signal`` lead time). Under SLURM with
  ``SLURMEnvironment(auto_requeue=True)`` (the default), ``SIGUSR1`` is Lightning's requeue signal: Lightning
  requeues the job, this callback notes it, and the job exits with status 0 when SLURM stops it;
* every checkpoint records where the run logs (``log_dir``, logger version) and its SLURM job, so that
  ``kd-lightning fit --ckpt_path`` continues the same TensorBoard run and a requeued job finds its checkpoint.

Exact resume also needs the data order and randomness of the run to be restored: see
:mod:`kd_lightning.seeding` and :mod:`kd_lightning.data.resumable`.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM
RUN_KEY = "kd_lightning_run"  # the checkpoint entry that says where the run logs


def slurm_job_id() -> str | None:
    """The SLURM job of this process (``<array job>_<task>`` for an array task), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt`` the latest state of the run; see the module docstring.

    Args:
        dirpath: the folder of ``last.ckpt``; ``None``: the folder of the trainer's ``ModelCheckpoint``
            (``logs/<name>/version_<n>/checkpoints`` by default), else ``<log_dir>/checkpoints``.
        filename: the file name, ``last.ckpt`` (which ``trainer.fit(ckpt_path="last")`` also finds).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        super().__init__()
        if not filename.endswith(".ckpt") or os.sep in filename:
            raise ValueError(f"filename must be a file name ending in .ckpt, got {filename!r}.")
        self.dirpath = dirpath
        self.filename = filename
        self.requeue_requested = False
        self.last_saved_path: str | None = None
        self._validating = False  # between on_validation_start and on_validation_end of a fit
        self._deferred: tuple[Any, int] | None = None  # (Lightning's SIGTERM handler, signal) held during validation
        self._saved_for_stop = False  # last.ckpt already holds the state the stop will leave

    def checkpoint_path(self, trainer: "pl.Trainer") -> str:
        dirpath = self.dirpath
        if dirpath is None:
            best = trainer.checkpoint_callback
            if isinstance(best, ModelCheckpoint) and best.dirpath is not None:
                dirpath = best.dirpath
            else:
                dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, self.filename)

    def _save(self, trainer: "pl.Trainer") -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self.last_saved_path = path

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._save(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if not self._saved_for_stop:
            self._save(trainer)
        # SIGTERMException is a SystemExit: its code is the process's exit status.
        exception.code = 0 if self.requeue_requested else PREEMPTED_EXIT_CODE
        rank_zero_info(f"Stopped by a signal at step {trainer.global_step}; saved {self.last_saved_path}. "
                       + ("The job was requeued." if self.requeue_requested else
                          f"Exiting with status {PREEMPTED_EXIT_CODE}; resume with --ckpt_path {self.last_saved_path}"))

    # -- signals: SIGTERM waits for a running validation; SIGUSR1 ---------------------------------------------
    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._validating = trainer.state.fn == "fit"

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._validating = False
        if not trainer.is_last_batch:  # at an epoch's end, on_train_epoch_end saves right after
            self._save(trainer)
        if self._deferred is not None:  # the stop asked for during the validation: now, at a batch boundary
            handler, signum = self._deferred
            self._deferred = None
            # inside an epoch, the save just above is the state to resume from (Lightning moves its step
            # counter after this hook); at an epoch's end, on_exception saves it
            self._saved_for_stop = not trainer.is_last_batch
            handler(signum, None)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning has registered its handlers by now (and restores the previous ones when the fit ends).
        if os.name == "nt":
            return
        lightning_sigterm = signal.getsignal(signal.SIGTERM)
        if callable(lightning_sigterm):
            def sigterm_after_validation(signum: int, frame: FrameType | None) -> None:
                if self._validating:  # Lightning would stop mid-validation: hold the signal until it ends
                    self._deferred = (lightning_sigterm, signum)
                else:
                    lightning_sigterm(signum, frame)

            signal.signal(signal.SIGTERM, sigterm_after_validation)
        registered = signal.getsignal(signal.SIGUSR1)
        if callable(registered):  # Lightning's SLURM auto-requeue handler (or the user's own): keep it, note it
            def note_requeue(signum: int, frame: FrameType | None) -> None:
                self.requeue_requested = SLURMEnvironment.detect()
                registered(signum, frame)

            signal.signal(signal.SIGUSR1, note_requeue)
        else:  # SIGUSR1 means "stop soon" (e.g. `sbatch --signal=USR1@90` without auto-requeue): as SIGTERM
            signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))

    # -- where the run logs -----------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        logger = trainer.logger
        checkpoint[RUN_KEY] = {
            "log_dir": trainer.log_dir,
            "logger_version": None if logger is None else logger.version,
            "slurm_job_id": slurm_job_id(),
        }
