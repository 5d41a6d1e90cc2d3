r"""
PredictionWriter
^^^^^^^^^^^^^^^^

``kd-lightning predict`` writes what the network predicts, one row per image, to ``predictions.csv`` in the run's
log folder (``logs/<name>/version_<n>/``)::

    kd-lightning predict --config experiments/digits/base.yaml --config experiments/digits/kd.yaml \
        --ckpt_path logs/digits/kd/version_0/checkpoints/best.ckpt              # --prediction.teacher true: and the teacher's

Columns: ``row`` (the image's position in the split, ``data.init_args.predict_split``, default the test split),
``target`` (its class, empty when unlabelled), ``prediction`` and ``probability`` (the predicted class and the
softmax probability the network gives it), and with ``teacher: true`` (for a KD checkpoint) ``teacher_prediction``,
``teacher_probability`` and ``agreement``. Under DDP each rank writes the rows it predicted to
``predictions_rank<r>.csv``.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from kd_lightning.labels import UNLABELLED


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions of ``trainer.predict`` to a CSV file; see the module docstring.

    Args:
        dirpath: the folder of the file; ``None``: the run's log folder (``trainer.log_dir``).
        filename: the file's name.
        teacher: also write the teacher's prediction (a DistillationModule with a teacher).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions.csv", teacher: bool = False) -> None:
        super().__init__(write_interval="epoch")
        if not filename.endswith(".csv") or os.sep in filename:
            raise ValueError(f"PredictionWriter: filename must be a file name ending in .csv, got {filename!r}.")
        self.dirpath, self.filename, self.teacher = dirpath, filename, teacher
        self.written: str | None = None

    def check_settings(self, pl_module: pl.LightningModule, datamodule: Any = None, stage: str = "predict") -> None:
        """A clear error, before anything is written, for teacher predictions of a run without a teacher."""
        if stage == "predict" and self.teacher and getattr(pl_module, "teacher", None) is None:
            raise ValueError("PredictionWriter: teacher: true asks for the teacher's predictions, but this run has no "
                             "teacher (a ClassifierModule or a scratch student). Leave prediction.teacher false.")

    def path(self, trainer: pl.Trainer) -> str:
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir
        name = self.filename if trainer.world_size == 1 else \
            self.filename.replace(".csv", f"_rank{trainer.global_rank}.csv")
        return os.path.join(folder, name)

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        self.check_settings(pl_module, trainer.datamodule)
        names = list(getattr(trainer.datamodule, "class_names", None) or [])
        rows = []
        for outputs, indices in zip(_flat(predictions), _flat(batch_indices)):
            probs = outputs["logits"].float().softmax(-1)  # (B, K)
            prob, pred = probs.max(-1)
            targets = outputs.get("targets")
            teacher = outputs.get("teacher_logits") if self.teacher else None
            t_prob, t_pred = teacher.float().softmax(-1).max(-1) if teacher is not None else (None, None)
            for j, row in enumerate(indices):
                target = int(targets[j]) if targets is not None and targets.ndim == 1 else UNLABELLED
                record = {"row": int(row), "target": _name(names, target) if target != UNLABELLED else "",
                          "prediction": _name(names, int(pred[j])), "probability": f"{float(prob[j]):.6f}"}
                if t_pred is not None:
                    record.update(teacher_prediction=_name(names, int(t_pred[j])),
                                  teacher_probability=f"{float(t_prob[j]):.6f}",
                                  agreement=int(t_pred[j] == pred[j]))
                rows.append(record)
        path = self.path(trainer)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["row", "target", "prediction",
                                                                               "probability"])
            writer.writeheader()
            writer.writerows(rows)
        self.written = path


def _flat(values: Sequence[Any]) -> list[Any]:
    """One dataloader's list, or several dataloaders' lists, as one list."""
    if values and isinstance(values[0], list):
        return [v for sub in values for v in sub]
    return list(values)


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)

