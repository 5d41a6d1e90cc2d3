r"""Metrics of a (student, teacher) pair: functional forms, and :class:`DistillationStats` around them.

Owned by :class:`~kd_lightning.DistillationModule`, which updates them in its steps and logs ``val/agreement`` and
``val/kl`` from them; :class:`~kd_lightning.callbacks.KLDivergenceLogger` asks for the detailed figures and renders
them, computing nothing itself. With student logits :math:`z_s`, teacher logits :math:`z_t` and softmax
:math:`\sigma`:

.. math::

    \mathrm{KL}_T = \mathrm{KL}\big(\sigma(z_t/T) \,\|\, \sigma(z_s/T)\big), \qquad
    H(z) = -\sum_c \sigma(z)_c \log \sigma(z)_c, \qquad
    \mathrm{agreement} = [\arg\max z_s = \arg\max z_t]

in nats, :math:`\mathrm{KL}_T` without the :math:`T^2` factor of the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from kd_lightning.labels import labelled_rows
from kd_lightning.losses import kl_divergence

STEP_TAGS = ("kl_T", "kl_T1", "entropy_teacher", "entropy_student", "agreement")


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Per-row prediction entropy :math:`H(\sigma(z/T))` in nats, float32, shape ``(B,)``: 0 for a one-hot
    prediction, :math:`\log C` for a uniform one over :math:`C` classes."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, C)
    # clamp: a class masked with -inf logits has p = 0 and log p = -inf; 0 * (finite) keeps the sum finite
    return -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(-1)  # (B,)


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


class DistillationStats(Metric):
    r"""Student-vs-teacher statistics over an evaluation epoch, kept as sums (reduced across DDP ranks by summing).

    Always: ``kl_T1`` (mean :math:`\mathrm{KL}_1` per row) and ``agreement`` (share of rows with the same top-1).
    With ``detailed``: ``kl_T`` at the temperature given to :meth:`update` (when there is one), the entropies,
    ``teacher_right_student_wrong`` / ``student_right_teacher_wrong`` (shares of the labelled rows),
    ``class_kl_T1`` and ``class_rows`` per true class, and ``error_confusion`` ``(K, K)`` [true class, student's
    prediction] over the rows where the teacher is right and the student wrong; with ``per_sample``, every row's
    :math:`\mathrm{KL}_1`. Updates touch device tensors only (``index_add_`` with 0/1 weights): no host sync.
    """

    full_state_update = False

    def __init__(self, num_classes: int, detailed: bool = False, per_sample: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.detailed, self.per_sample = num_classes, detailed, per_sample and detailed
        names = ["rows", "kl_T1", "agreement"]
        if detailed:
            names += ["kl_T", "entropy_teacher", "entropy_student", "labelled", "teacher_right_student_wrong",
                      "student_right_teacher_wrong"]
            self.add_state("class_kl", torch.zeros(num_classes), dist_reduce_fx="sum")  # (K,) sum of KL_1 per class
            self.add_state("class_rows", torch.zeros(num_classes), dist_reduce_fx="sum")  # (K,)
            self.add_state("error_confusion", torch.zeros(num_classes, num_classes), dist_reduce_fx="sum")  # (K, K)
        for name in names:
            self.add_state(name, torch.tensor(0.0), dist_reduce_fx="sum")
        if self.per_sample:
            self.add_state("per_sample_kl", [], dist_reduce_fx="cat")  # list of (B,)

    def update(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,  # type: ignore[override]
               temperature: float | None = None) -> None:
        kl_1 = kl_divergence(student_logits, teacher_logits, 1.0, reduction="none")  # (B,)
        student_pred = student_logits.argmax(-1)  # (B,)
        teacher_pred = teacher_logits.argmax(-1)  # (B,)
        self.rows += kl_1.numel()
        self.kl_T1 += kl_1.sum()
        self.agreement += (student_pred == teacher_pred).float().sum()
        if not self.detailed:
            return
        k = self.num_classes
        if temperature is not None:
            self.kl_T += kl_divergence(student_logits, teacher_logits, temperature, reduction="none").sum()
        labels, labelled = labelled_rows(targets.to(student_pred.device))  # (B,), (B,)
        labelled = labelled.float()
        student_right = (student_pred == labels).float()  # (B,)
        teacher_right = (teacher_pred == labels).float()  # (B,)
        self.entropy_teacher += entropy(teacher_logits).sum()
        self.entropy_student += entropy(student_logits).sum()
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
        out = {"kl_T1": self.kl_T1 / rows, "agreement": self.agreement / rows, "rows": self.rows}
        if not self.detailed:
            return out
        labelled = self.labelled.clamp(min=1)
        out.update({
            "kl_T": self.kl_T / rows,
            "entropy_teacher": self.entropy_teacher / rows, "entropy_student": self.entropy_student / rows,
            "teacher_right_student_wrong": self.teacher_right_student_wrong / labelled,
            "student_right_teacher_wrong": self.student_right_teacher_wrong / labelled,
            "class_kl_T1": self.class_kl / self.class_rows.clamp(min=1),  # (K,)
            "class_rows": self.class_rows,  # (K,)
            "error_confusion": self.error_confusion,  # (K, K)
        })
        if self.per_sample:  # a list of (B,) tensors, or one (N,) tensor after the DDP gather
            values = self.per_sample_kl
            empty = isinstance(values, list) and not values
            out["per_sample_kl_T1"] = self.rows.new_zeros(0) if empty else dim_zero_cat(values)  # (N,)
        return out
