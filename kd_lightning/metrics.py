"""Metrics of a (student, teacher) pair, owned by :class:`~kd_lightning.DistillationModule` (which updates them
in its steps) and rendered by :class:`~kd_lightning.callbacks.KLDivergenceLogger` (which computes nothing itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from kd_lightning.losses import entropy, kl_divergence

STEP_TAGS = ("kl_T", "kl_T1", "entropy_teacher", "entropy_student", "agreement")


def step_statistics(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``(5,)``: batch means of KL at ``temperature`` and at T=1 (batchmean, without T^2), the teacher's and the
    student's prediction entropies at T=1 and the top-1 agreement, in the order of ``STEP_TAGS``."""
    return torch.stack([
        kl_divergence(student_logits, teacher_logits, temperature),  # batchmean: sum over classes, mean over rows
        kl_divergence(student_logits, teacher_logits, 1.0),
        entropy(teacher_logits).mean(),
        entropy(student_logits).mean(),
        (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean(),
    ])


def hard_labels(targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(labels, labelled)``, both ``(B,)``: class indices (0 where unlabelled) and a 0/1 float mask.

    ``targets``: class indices ``(B,)`` with -100 for unlabelled rows, or soft labels ``(B, K)`` (MixUp/CutMix:
    the argmax is the label, an all-zero row is unlabelled).
    """
    if targets.ndim == 2:
        return targets.argmax(-1), (targets.sum(-1) > 0).float()
    labelled = (targets >= 0) & (targets < num_classes)
    return targets.clamp(0, num_classes - 1).long(), labelled.float()


class DistillationStats(Metric):
    r"""Validation-set statistics of a (student, teacher) pair, as sums: reduced across DDP ranks by summing.

    ``update(student_logits (B, K), teacher_logits (B, K), targets (B,) or (B, K), temperature)`` touches
    device tensors only (``index_add_`` with 0/1 weights instead of boolean indexing): no host sync.
    """

    full_state_update = False

    def __init__(self, num_classes: int, per_sample: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.per_sample = per_sample
        for name in ("rows", "kl_T", "kl_T1", "entropy_teacher", "entropy_student", "agreement", "labelled",
                     "teacher_right_student_wrong", "student_right_teacher_wrong"):
            self.add_state(name, torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("class_kl", torch.zeros(num_classes), dist_reduce_fx="sum")  # (K,) sum of KL_1 per class
        self.add_state("class_rows", torch.zeros(num_classes), dist_reduce_fx="sum")  # (K,)
        # (K, K): [true class, student prediction], rows where the teacher is right and the student wrong
        self.add_state("error_confusion", torch.zeros(num_classes, num_classes), dist_reduce_fx="sum")
        if per_sample:
            self.add_state("per_sample_kl", [], dist_reduce_fx="cat")  # list of (B,)

    def update(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,  # type: ignore[override]
               temperature: float) -> None:
        k = self.num_classes
        kl_t = kl_divergence(student_logits, teacher_logits, temperature, reduction="none")  # (B,)
        kl_1 = kl_divergence(student_logits, teacher_logits, 1.0, reduction="none")  # (B,)
        student_pred = student_logits.argmax(-1)  # (B,)
        teacher_pred = teacher_logits.argmax(-1)  # (B,)
        labels, labelled = hard_labels(targets.to(student_pred.device), k)  # (B,), (B,)
        student_right = (student_pred == labels).float()  # (B,)
        teacher_right = (teacher_pred == labels).float()  # (B,)
        self.rows += kl_1.numel()
        self.kl_T += kl_t.sum()
        self.kl_T1 += kl_1.sum()
        self.entropy_teacher += entropy(teacher_logits).sum()
        self.entropy_student += entropy(student_logits).sum()
        self.agreement += (student_pred == teacher_pred).float().sum()
        self.labelled += labelled.sum()
        t_not_s = teacher_right * (1.0 - student_right) * labelled  # (B,) 0/1
        self.teacher_right_student_wrong += t_not_s.sum()
        self.student_right_teacher_wrong += (student_right * (1.0 - teacher_right) * labelled).sum()
        self.class_kl.index_add_(0, labels, kl_1 * labelled)
        self.class_rows.index_add_(0, labels, labelled)
        self.error_confusion.view(-1).index_add_(0, labels * k + student_pred, t_not_s)
        if self.per_sample:
            self.per_sample_kl.append(kl_1)

    def compute(self) -> dict[str, Tensor]:
        rows = self.rows.clamp(min=1)
        labelled = self.labelled.clamp(min=1)
        out = {
            "kl_T": self.kl_T / rows, "kl_T1": self.kl_T1 / rows,
            "entropy_teacher": self.entropy_teacher / rows, "entropy_student": self.entropy_student / rows,
            "agreement": self.agreement / rows,
            "teacher_right_student_wrong": self.teacher_right_student_wrong / labelled,
            "student_right_teacher_wrong": self.student_right_teacher_wrong / labelled,
            "class_kl_T1": self.class_kl / self.class_rows.clamp(min=1),  # (K,)
            "class_rows": self.class_rows,  # (K,)
            "error_confusion": self.error_confusion,  # (K, K)
            "rows": self.rows,
        }
        if self.per_sample:  # a list of (B,) tensors, or one (N,) tensor after the DDP gather
            values = self.per_sample_kl
            empty = isinstance(values, list) and not values
            out["per_sample_kl_T1"] = self.rows.new_zeros(0) if empty else dim_zero_cat(values)  # (N,)
        return out
