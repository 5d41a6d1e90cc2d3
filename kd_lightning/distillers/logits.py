"""Terms on the logits: cross-entropy on the labels, Hinton KD and decoupled KD."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from kd_lightning.distillers.base import DistillationTerm, StepOutputs
from kd_lightning.losses import dkd_loss, hard_loss, soft_kd_loss


class CrossEntropy(DistillationTerm):
    """The hard-label term: cross-entropy over the labelled rows (:func:`kd_lightning.losses.hard_loss`), on the
    student's main head, or ``sum_i head_weights[i] * CE(head_i)`` over its heads (GoogLeNet trained with its
    auxiliary heads: ``[1, 0.3, 0.3]``). ``label_smoothing`` applies to class-index targets. Returns ``{"ce"}``."""

    default_name = "ce"

    def __init__(self, weight: float = 1.0, name: str | None = None, head_weights: Sequence[float] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(weight, name)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"CrossEntropy: label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.head_weights = None if head_weights is None else [float(w) for w in head_weights]
        self.label_smoothing = float(label_smoothing)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if self.head_weights is None:
            return {self.name: hard_loss(out.student_logits, out.targets, self.label_smoothing)}
        heads = out.student_heads or [out.student_logits]
        return {self.name: sum(w * hard_loss(h, out.targets, self.label_smoothing)
                               for w, h in zip(self.head_weights, heads))}


class HintonKD(DistillationTerm):
    """Hinton et al. (2015): ``T^2 KL(softmax(t/T) || softmax(s/T))`` (:func:`kd_lightning.losses.soft_kd_loss`),
    over every teacher head (``teacher_weights``, e.g. GoogLeNet's 1, 0.3, 0.3). Returns ``{"kd"}``."""

    default_name = "kd"

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, name: str | None = None,
                 teacher_weights: Sequence[float] | None = None) -> None:
        super().__init__(weight, name)
        if temperature <= 0:
            raise ValueError(f"HintonKD: temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.teacher_weights = None if teacher_weights is None else list(teacher_weights)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: soft_kd_loss(out.student_logits, out.teacher_logits, self.temperature,
                                        self.teacher_weights)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class DKD(DistillationTerm):
    """Decoupled KD (Zhao et al., 2022; :func:`kd_lightning.losses.dkd_loss`): ``alpha * TCKD + beta * NCKD``,
    times the paper's linear warm-up ``min((epoch + 1) / warmup, 1)`` (epochs counted from 1 as in the authors'
    code; ``warmup: 0`` turns it off). Returns ``{"dkd"}``; TCKD and NCKD are not separate log keys."""

    default_name = "dkd"

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20, name: str | None = None) -> None:
        super().__init__(weight, name)
        if temperature <= 0:
            raise ValueError(f"DKD: temperature must be > 0, got {temperature}.")
        if alpha < 0 or beta < 0:
            raise ValueError(f"DKD: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}.")
        if warmup < 0:
            raise ValueError(f"DKD: warmup must be >= 0 epochs, got {warmup}.")
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), warmup

    def warmup_factor(self, epoch: int) -> float:
        return 1.0 if self.warmup == 0 else min((epoch + 1) / self.warmup, 1.0)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        losses = dkd_loss(out.student_logits, out.teacher_logits[0], out.targets, self.alpha, self.beta,
                          self.temperature)
        return {self.name: self.warmup_factor(out.epoch) * losses["dkd"]}


def shorthand_terms(temperature: float = 4.0, alpha: float = 0.9,
                    teacher_weights: Sequence[float] | None = None) -> dict[str, DistillationTerm]:
    """The ``temperature``/``alpha`` shorthand of Hinton et al. (2015) as terms: ``{"kd": HintonKD(alpha, T),
    "ce": CrossEntropy(1 - alpha)}``, i.e. ``loss = alpha * T^2 KL + (1 - alpha) * CE`` exactly as
    :func:`kd_lightning.losses.distillation_loss`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    return {"kd": HintonKD(weight=alpha, temperature=temperature, teacher_weights=teacher_weights),
            "ce": CrossEntropy(weight=1.0 - alpha)}


__all__ = ["CrossEntropy", "DKD", "HintonKD", "shorthand_terms"]
