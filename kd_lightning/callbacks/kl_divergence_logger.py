r"""
KLDivergenceLogger
^^^^^^^^^^^^^^^^^^

How far the student is from its teacher, in TensorBoard. With student logits :math:`z_s`, teacher logits
:math:`z_t`, softmax :math:`\sigma` and the module's current temperature :math:`T`:

.. math::

    \mathrm{KL}_T = \mathrm{KL}\big(\sigma(z_t/T) \,\|\, \sigma(z_s/T)\big), \qquad
    H(z) = -\sum_c \sigma(z)_c \log \sigma(z)_c, \qquad
    \mathrm{agreement} = [\arg\max z_s = \arg\max z_t]

(natural logarithms: nats; :math:`\mathrm{KL}_T` without the :math:`T^2` factor of the loss).

Every ``log_every_n_steps`` training steps (mean over the batch, averaged over DDP ranks):

- ``kl_train/kl_T`` and ``kl_train/kl_T1``: :math:`\mathrm{KL}_T` at the current temperature and at T=1,
- ``kl_train/entropy_teacher``, ``kl_train/entropy_student``: prediction entropies at T=1,
- ``kl_train/agreement``: top-1 agreement of student and teacher.

Every validation epoch, over the whole validation set (torchmetrics states, summed across DDP ranks):

- ``kl_val/kl_T``, ``kl_val/kl_T1``, ``kl_val/entropy_teacher``, ``kl_val/entropy_student``, ``kl_val/agreement``,
- ``kl_val/teacher_right_student_wrong`` and ``kl_val/student_right_teacher_wrong``: fractions of the
  labelled rows,
- ``kl_val/class_kl_T1/<class>``: mean :math:`\mathrm{KL}_1` of the rows of each true class (as scalars for
  up to ``max_class_scalars`` classes; beyond that a text table of the worst classes, ``kl_val/class_kl_T1``),
- TensorBoard only: the histogram ``kl_val/per_sample_kl_T1`` of :math:`\mathrm{KL}_1` per row; the image and
  text ``kl_val/error_confusion``: counts of (true class, student's prediction) over the rows where the teacher
  is right and the student wrong -- which classes the student has not learned from its teacher (image up to
  100 classes; rows: true class, columns: the student's prediction, white 0 to red max).

One owner: :class:`~kd_lightning.module.DistillationModule` computes every statistic (from the logits of its own
forward passes: no extra pass) and owns the validation metric (:class:`~kd_lightning.metrics.DistillationStats`,
which also gives its ``val/agreement`` and ``val/kl``); this callback only decides when to log and renders. With
terms of different temperatures there is no single :math:`T`: ``kl_T`` is then not logged. On a training step that logs nothing, nothing is computed
(the callback asks the module for the step's statistics only on the steps it logs); validation batches update
on-device sums (no boolean indexing, no ``.item()``); the single reduction and transfer happen at the end of
the epoch.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from kd_lightning.log_steps import is_logged_step, logging_step
from kd_lightning.metrics import STEP_TAGS

_MAX_IMAGE_CLASSES = 100


def _tag_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


class KLDivergenceLogger(Callback):
    r"""Logs student-vs-teacher divergence, entropies and agreement (see the module docstring for the tags).

    Needs a module that computes the statistics (``track_distillation_stats``, ``request_step_statistics``,
    ``temperature``: :class:`~kd_lightning.module.DistillationModule`).

    Args:
        log_every_n_steps: training-step statistics every this many optimizer steps, on the same step axis
            as the module's ``train/*`` curves; ``None``: the trainer's ``log_every_n_steps``.
        log_train: log the per-step training statistics.
        log_val: log the per-epoch validation statistics.
        max_class_scalars: log per-class mean KL as one scalar per class up to this many classes, and as a
            text table of the ``max_class_scalars`` worst classes above (0: text table only).
        histogram: log the per-sample KL histogram (keeps one float per validation row until epoch end).
        top_confusions: rows of the text table of the most frequent teacher-right/student-wrong pairs.
    """

    def __init__(self, log_every_n_steps: int | None = None, log_train: bool = True, log_val: bool = True,
                 max_class_scalars: int = 20, histogram: bool = True, top_confusions: int = 10) -> None:
        super().__init__()
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool)
                                              or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}.")
        for name, value in (("max_class_scalars", max_class_scalars), ("top_confusions", top_confusions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.log_train = log_train
        self.log_val = log_val
        self.max_class_scalars = max_class_scalars
        self.histogram = histogram
        self.top_confusions = top_confusions
        self._last_logged_step = -1
        self._class_names: list[str] = []
        self.last_val_stats: dict[str, Tensor] = {}  # the latest validation epoch's results (reduced), on CPU

    # -- state --------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self._last_logged_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged_step = state_dict["last_logged_step"]

    # -- setup ----------------------------------------------------------------------------------------------------
    def check_settings(self, pl_module: "pl.LightningModule", datamodule: Any = None, stage: str = "fit") -> None:
        """A clear error, before anything is written, for a module without a teacher to compare with."""
        if stage not in ("fit", "validate"):
            return
        if not hasattr(pl_module, "track_distillation_stats") or getattr(pl_module, "teacher", None) is None:
            raise ValueError(f"KLDivergenceLogger compares a student with its teacher: it needs a "
                             f"kd_lightning.DistillationModule with a teacher; got {type(pl_module).__name__}"
                             + (" without a teacher." if hasattr(pl_module, "teacher") else "."))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        self.check_settings(pl_module, trainer.datamodule, stage)
        num_classes = pl_module.num_classes
        names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        names = [str(n) for n in names] if names is not None and len(names) == num_classes else []
        self._class_names = names or [str(i) for i in range(num_classes)]
        if self.log_val:
            pl_module.track_distillation_stats(per_sample=self.histogram)

    @staticmethod
    def _step(trainer: "pl.Trainer") -> int:
        return logging_step(trainer)  # the step axis of Lightning's own logged metrics

    def _due(self, trainer: "pl.Trainer") -> bool:
        # Python ints only: a step that logs nothing costs no tensor op and no host sync. The decision depends on
        # the step counter only, so it is the same on every rank (the reduce in on_train_batch_end is safe).
        if not self.log_train or not trainer.loggers:
            return False
        step = self._step(trainer)  # the same value at batch start and end (it moves after on_train_batch_end)
        return is_logged_step(trainer, self.log_every_n_steps) and step > self._last_logged_step

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self._due(trainer):
            pl_module.request_step_statistics()  # the module computes them in this step's training_step

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self._due(trainer):
            return
        step = self._step(trainer)
        self._last_logged_step = step
        stats = pl_module.last_step_stats  # (5,), in the order of STEP_TAGS
        if stats is None:
            return
        pl_module.last_step_stats = None
        stats = trainer.strategy.reduce(stats, reduce_op="mean")  # average over DDP ranks
        if trainer.is_global_zero:
            metrics = {f"kl_train/{name}": value for name, value in zip(STEP_TAGS, stats.tolist())
                       if name != "kl_T" or pl_module.common_temperature() is not None}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- validation ---------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        results = pl_module.distillation_results("val") if self.log_val else None  # computed once, by the module
        if results is None:
            return
        names = self._class_names
        tags = [t for t in STEP_TAGS if t != "kl_T" or pl_module.common_temperature() is not None]
        scalars = {f"kl_val/{name}": results[name] for name in tags + [
            "teacher_right_student_wrong", "student_right_teacher_wrong"]}
        if len(names) <= self.max_class_scalars:
            scalars.update({f"kl_val/class_kl_T1/{_tag_safe(n)}": v for n, v in zip(names, results["class_kl_T1"])})
        # The values are already reduced across ranks; sync_dist=True re-averages identical values (a no-op)
        # and keeps Lightning's "use sync_dist=True on epoch level" DDP warning quiet.
        pl_module.log_dict(scalars, sync_dist=True)
        self.last_val_stats = {name: value.detach().cpu() for name, value in results.items()}
        if trainer.is_global_zero:
            self._write_tensorboard(trainer, self.last_val_stats)

    def _write_tensorboard(self, trainer: "pl.Trainer", results: dict[str, Tensor]) -> None:
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not writers:
            return
        step = self._step(trainer)
        names = self._class_names
        texts = {"kl_val/error_confusion": self._confusion_table(results["error_confusion"])}
        if len(names) > self.max_class_scalars:
            texts["kl_val/class_kl_T1"] = self._class_table(results["class_kl_T1"], results["class_rows"])
        image = self._confusion_image(results["error_confusion"])
        for writer in writers:
            if self.histogram and results["per_sample_kl_T1"].numel():
                writer.add_histogram("kl_val/per_sample_kl_T1", results["per_sample_kl_T1"], global_step=step)
            if image is not None:
                writer.add_image("kl_val/error_confusion", image, global_step=step, dataformats="CHW")
            for tag, text in texts.items():
                writer.add_text(tag, text, global_step=step)

    def _confusion_table(self, confusion: Tensor) -> str:
        """Markdown: the most frequent (true class, student prediction) pairs where the teacher is right."""
        names, k = self._class_names, confusion.shape[0]
        counts, flat = confusion.flatten().sort(descending=True)
        rows = [f"| {names[i // k]} | {names[i % k]} | {int(c)} |"
                for c, i in zip(counts[:self.top_confusions].tolist(), flat[:self.top_confusions].tolist()) if c > 0]
        header = "| true class | student predicts | rows (teacher right) |\n|---|---|---|\n"
        return header + ("\n".join(rows) if rows else "| - | - | 0 |")

    def _class_table(self, class_kl: Tensor, class_rows: Tensor) -> str:
        order = class_kl.argsort(descending=True)[:max(self.max_class_scalars, 10)].tolist()
        rows = [f"| {self._class_names[i]} | {class_kl[i].item():.4f} | {int(class_rows[i])} |" for i in order]
        return "| class | mean KL (T=1) | rows |\n|---|---|---|\n" + "\n".join(rows)

    @staticmethod
    def _confusion_image(confusion: Tensor) -> Tensor | None:
        """(3, H, W) float image in [0, 1]: white for 0, red for the largest count; rows true class."""
        k = confusion.shape[0]
        if k > _MAX_IMAGE_CLASSES:
            return None
        v = confusion.float() / confusion.max().clamp(min=1)  # (K, K) in [0, 1]
        cell = max(1, 256 // k)
        v = v.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # (K*cell, K*cell)
        return torch.stack([torch.ones_like(v), 1.0 - v, 1.0 - v])  # (3, H, W)
