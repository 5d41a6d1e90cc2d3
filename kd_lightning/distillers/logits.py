"""Terms on the logits: cross-entropy on the labels, Hinton KD and decoupled KD (each optionally on standardised
logits), DIST and CTKD's learned temperature."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from kd_lightning.distillers.base import DistillationTerm, StepOutputs, linear_warmup
from kd_lightning.losses import (
    cosine_curriculum,
    ctkd_temperature,
    dist_loss,
    dkd_loss,
    hard_loss,
    soft_kd_loss,
    standardize_logits,
)


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


def _check_standardize(term: str, standardize: object) -> bool:
    if not isinstance(standardize, bool):
        raise ValueError(f"{term}: standardize must be true or false (z-score the logits first, Sun et al. 2024), "
                         f"got {standardize!r}.")
    return standardize


class HintonKD(DistillationTerm):
    """Hinton et al. (2015): ``T^2 KL(softmax(t/T) || softmax(s/T))`` (:func:`kd_lightning.losses.soft_kd_loss`),
    over every teacher head (``teacher_weights``, e.g. GoogLeNet's 1, 0.3, 0.3). Returns ``{"kd"}``.

    ``standardize: true`` z-scores every row of student and teacher logits first
    (:func:`kd_lightning.losses.standardize_logits`; Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024), ``temperature`` then being their base temperature (2 in their CIFAR-100 setting)."""

    default_name = "kd"

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, name: str | None = None,
                 teacher_weights: Sequence[float] | None = None, standardize: bool = False) -> None:
        super().__init__(weight, name)
        if temperature <= 0:
            raise ValueError(f"HintonKD: temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.teacher_weights = None if teacher_weights is None else list(teacher_weights)
        self.standardize = _check_standardize("HintonKD", standardize)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student, teachers = out.student_logits, out.teacher_logits
        if self.standardize:
            student, teachers = standardize_logits(student), [standardize_logits(t) for t in teachers]
        return {self.name: soft_kd_loss(student, teachers, self.temperature, self.teacher_weights)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, standardize={self.standardize}"


class DKD(DistillationTerm):
    """Decoupled KD (Zhao et al., 2022; :func:`kd_lightning.losses.dkd_loss`): ``alpha * TCKD + beta * NCKD``,
    times the paper's linear warm-up ``min((epoch + 1) / warmup, 1)`` (epochs counted from 1 as in the authors'
    code; ``warmup: 0`` turns it off). Returns ``{"dkd"}``; TCKD and NCKD are not separate log keys.

    ``standardize: true`` z-scores student and teacher logits first (:func:`kd_lightning.losses.standardize_logits`;
    Sun et al., CVPR 2024: their DKD+LS runs ``alpha = 9``, ``beta = 72``, ``temperature = 2``)."""

    default_name = "dkd"

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: int = 20, name: str | None = None, standardize: bool = False) -> None:
        super().__init__(weight, name)
        if temperature <= 0:
            raise ValueError(f"DKD: temperature must be > 0, got {temperature}.")
        if alpha < 0 or beta < 0:
            raise ValueError(f"DKD: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}.")
        if warmup < 0:
            raise ValueError(f"DKD: warmup must be >= 0 epochs, got {warmup}.")
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), warmup
        self.standardize = _check_standardize("DKD", standardize)

    def warmup_factor(self, epoch: int) -> float:
        return linear_warmup(epoch, self.warmup)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        student, teacher = out.student_logits, out.teacher_logits[0]
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        losses = dkd_loss(student, teacher, out.targets, self.alpha, self.beta, self.temperature)
        return {self.name: self.warmup_factor(out.epoch) * losses["dkd"]}


def _check_number(term: str, what: str, value: object, low: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{term}: {what} must be a number {'>' if strict else '>='} {low:g}, got {value!r}.")
    return float(value)


class DIST(DistillationTerm):
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022;
    :func:`kd_lightning.losses.dist_loss`): ``T^2 (beta * inter + gamma * intra)``, one minus the Pearson
    correlation of the student's and the teacher's softened predictions, per row (inter-class relations) and per
    column (intra-class relations), on the teacher's main head. Defaults are the authors' loss defaults
    (``beta = gamma = 1``, ``temperature = 1``, their ImageNet setting); their CIFAR-100 setting is
    ``temperature: 4`` with the term weighted 2 against CE 1 (experiments/cifar100/dist.yaml). Returns
    ``{"dist"}``; the two parts are not separate log keys."""

    default_name = "dist"

    def __init__(self, weight: float = 1.0, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
                 name: str | None = None) -> None:
        super().__init__(weight, name)
        self.beta = _check_number("DIST", "beta (weight of the inter-class relation)", beta, 0.0, strict=False)
        self.gamma = _check_number("DIST", "gamma (weight of the intra-class relation)", gamma, 0.0, strict=False)
        self.temperature = _check_number("DIST", "temperature", temperature, 0.0, strict=True)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        losses = dist_loss(out.student_logits, out.teacher_logits[0], self.beta, self.gamma, self.temperature)
        return {self.name: losses["dist"]}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"


class CTKD(DistillationTerm):
    """Curriculum temperature KD (Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023), its
    global variant: Hinton KD (:func:`kd_lightning.losses.soft_kd_loss`, teacher's main head) at a temperature
    learned adversarially. The temperature is ``min_temperature + temperature_range * sigmoid(raw)``
    (:func:`kd_lightning.losses.ctkd_temperature`), ``raw`` one scalar parameter of this term (initialised to 1 as
    in the authors' code, so it starts near 15.6 with their range 1 + 20). The student minimises the KD loss; the
    temperature gets the gradient through a reversal layer, ``-lambda`` times the loss's gradient, so it maximises
    the loss, ever harder as ``lambda`` grows from ``lambda_start`` to ``lambda_end`` along a cosine over the first
    ``curriculum_epochs`` epochs (:func:`kd_lightning.losses.cosine_curriculum`, epochs counted from 1 as in the
    authors' loop). ``raw`` is optimised in the run's adapter parameter group and saved with the run.

    The learned value is :attr:`learned_temperature` (a float; it is deliberately not an attribute named
    ``temperature``, which temperature schedulers would move). ``standardize: true`` z-scores the logits first
    (CTKD+LS of Sun et al., CVPR 2024). Returns ``{"ctkd"}``."""

    default_name = "ctkd"

    def __init__(self, weight: float = 1.0, min_temperature: float = 1.0, temperature_range: float = 20.0,
                 lambda_start: float = 0.0, lambda_end: float = 1.0, curriculum_epochs: int = 10,
                 standardize: bool = False, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.min_temperature = _check_number("CTKD", "min_temperature", min_temperature, 0.0, strict=True)
        self.temperature_range = _check_number("CTKD", "temperature_range (the learned temperature lies in "
                                               "(min_temperature, min_temperature + temperature_range))",
                                               temperature_range, 0.0, strict=False)
        self.lambda_start = _check_number("CTKD", "lambda_start (gradient reversal strength)", lambda_start, 0.0,
                                          strict=False)
        self.lambda_end = _check_number("CTKD", "lambda_end (gradient reversal strength)", lambda_end, 0.0,
                                        strict=False)
        if isinstance(curriculum_epochs, bool) or not isinstance(curriculum_epochs, int) or curriculum_epochs < 0:
            raise ValueError(f"CTKD: curriculum_epochs must be a whole number of epochs >= 0 (0: lambda_end from the "
                             f"start), got {curriculum_epochs!r}.")
        self.curriculum_epochs = curriculum_epochs
        self.standardize = _check_standardize("CTKD", standardize)
        self.raw_temperature = nn.Parameter(torch.ones(()))

    def strength(self, epoch: int) -> float:
        """The gradient reversal strength ``lambda`` at ``epoch`` (counted from 0, as ``StepOutputs.epoch``)."""
        return cosine_curriculum(epoch + 1, self.lambda_start, self.lambda_end, self.curriculum_epochs)

    @property
    def learned_temperature(self) -> float:
        """The temperature the term distils at now."""
        with torch.no_grad():
            return float(ctkd_temperature(self.raw_temperature, 0.0, self.min_temperature, self.temperature_range))

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        temperature = ctkd_temperature(self.raw_temperature, self.strength(out.epoch), self.min_temperature,
                                       self.temperature_range)  # 0-dim, carries the reversed gradient
        student, teacher = out.student_logits, out.teacher_logits[0]
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        return {self.name: soft_kd_loss(student, teacher, temperature)}  # type: ignore[arg-type]  # a tensor T

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, min_temperature={self.min_temperature}, "
                f"temperature_range={self.temperature_range}, curriculum_epochs={self.curriculum_epochs}, "
                f"standardize={self.standardize}")


def shorthand_terms(temperature: float = 4.0, alpha: float = 0.9,
                    teacher_weights: Sequence[float] | None = None) -> dict[str, DistillationTerm]:
    """The ``temperature``/``alpha`` shorthand of Hinton et al. (2015) as terms: ``{"kd": HintonKD(alpha, T),
    "ce": CrossEntropy(1 - alpha)}``, i.e. ``loss = alpha * T^2 KL + (1 - alpha) * CE`` exactly as
    :func:`kd_lightning.losses.distillation_loss`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    return {"kd": HintonKD(weight=alpha, temperature=temperature, teacher_weights=teacher_weights),
            "ce": CrossEntropy(weight=1.0 - alpha)}


__all__ = ["CTKD", "CrossEntropy", "DIST", "DKD", "HintonKD", "shorthand_terms"]
