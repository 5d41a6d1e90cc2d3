r"""The distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

.. math::

    \mathcal{L} = \alpha \cdot T^2 \,\mathrm{KL}\!\left(\sigma(z_t/T) \,\|\, \sigma(z_s/T)\right)
                + (1-\alpha) \cdot \mathrm{CE}(z_s, y)

with student logits :math:`z_s`, teacher logits :math:`z_t`, temperature :math:`T` and softmax
:math:`\sigma`. The :math:`T^2` factor keeps the soft term's gradients at the scale of the hard term's
as :math:`T` changes (Hinton et al., section 2).

The loss sees logits only, never models: teacher logits from a forward pass, from a cache on disk or from
several heads are all the same to it. Both KL arguments are log-probabilities (``log_softmax``, with
``log_target=True``), computed in float32; passing probabilities to ``kl_div`` is the classic KD bug.

Targets are class indices ``(B,)`` -- where ``ignore_index`` (-100) marks an unlabelled row, which then
gets the distillation term only -- or soft labels ``(B, C)`` such as MixUp/CutMix produce, where an
all-zero row is unlabelled.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Logits = Union[Tensor, Sequence[Tensor]]


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> Tensor:
    r""":math:`\mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T))` in float32, without the :math:`T^2` factor.

    ``reduction``: ``"batchmean"`` (sum over classes, mean over rows; a scalar) or ``"none"`` (one value
    per row, shape ``(B,)``).
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    if reduction == "batchmean":
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    if reduction == "none":
        return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    raise ValueError(f"reduction must be 'batchmean' or 'none', got {reduction!r}.")


def soft_kd_loss(student_logits: Tensor, teacher_logits: Logits, temperature: float,
                 teacher_weights: Sequence[float] | None = None) -> Tensor:
    r"""The soft term :math:`T^2\,\mathrm{KL}`; for several teacher heads, :math:`\sum_i w_i T^2 \mathrm{KL}_i`.

    Heads are weighted as given (GoogLeNet's main and auxiliary heads: 1, 0.3, 0.3); pass weights that sum
    to one for a weighted mean. Without weights, a sequence of heads is averaged.
    """
    heads = [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits)
    if not heads:
        raise ValueError("teacher_logits is an empty sequence: pass a tensor or at least one head.")
    if teacher_weights is None:
        teacher_weights = [1.0 / len(heads)] * len(heads)
    if len(teacher_weights) != len(heads):
        raise ValueError(f"{len(heads)} teacher heads but {len(teacher_weights)} teacher_weights.")
    t2 = temperature * temperature
    return sum(w * t2 * kl_divergence(student_logits, t, temperature) for w, t in zip(teacher_weights, heads))


def hard_loss(student_logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy averaged over the labelled rows only; 0 (never NaN) when no row has a label.

    ``targets``: class indices ``(B,)`` with ``ignore_index`` for unlabelled rows, or soft labels ``(B, C)``
    whose all-zero rows are unlabelled.
    """
    logits = student_logits.float()
    if targets.ndim == logits.ndim:  # soft labels (MixUp / CutMix)
        row_loss = -(targets.float() * F.log_softmax(logits, dim=-1)).sum(-1)  # (B,)
        labelled = targets.sum(-1) > 0
        return row_loss.sum() / labelled.sum().clamp(min=1)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)  # stays on device: no host sync


def distillation_loss(student_logits: Tensor, teacher_logits: Logits, targets: Tensor,
                      temperature: float = 4.0, alpha: float = 0.9,
                      teacher_weights: Sequence[float] | None = None,
                      ignore_index: int = -100) -> dict[str, Tensor]:
    r"""Hinton et al. (2015) knowledge-distillation loss, as a dict of named terms.

    .. math::
        \mathrm{kd} = T^2 \,\mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T)) \quad\text{(batchmean, all rows)}

        \mathrm{ce} = \mathrm{CE}(z_s, y) \quad\text{(mean over labelled rows)}

        \mathrm{loss} = \alpha\,\mathrm{kd} + (1 - \alpha)\,\mathrm{ce}

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, or a sequence of heads each ``(B, C)`` (see ``soft_kd_loss``).
        targets: ``(B,)`` class indices (``ignore_index`` = unlabelled) or ``(B, C)`` soft labels.
        temperature: ``T > 0``.
        alpha: weight of the soft term, in ``[0, 1]``.

    Returns:
        ``{"loss", "kd", "ce"}``, float32 scalars; only ``loss`` is meant for ``backward``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    kd = soft_kd_loss(student_logits, teacher_logits, temperature, teacher_weights)
    ce = hard_loss(student_logits, targets, ignore_index)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


class DistillationLoss(nn.Module):
    """Module form of :func:`distillation_loss`; ``temperature`` and ``alpha`` may be changed in place."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9,
                 teacher_weights: Sequence[float] | None = None, ignore_index: int = -100) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_weights = None if teacher_weights is None else list(teacher_weights)
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Logits, targets: Tensor) -> dict[str, Tensor]:
        return distillation_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha,
                                 self.teacher_weights, self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, teacher_weights={self.teacher_weights}"


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Per-row prediction entropy :math:`H(\sigma(z/T)) = -\sum_c p_c \log p_c` in nats, float32, shape ``(B,)``.

    0 for a one-hot prediction, :math:`\log C` for a uniform one over :math:`C` classes.
    """
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, C)
    # clamp: a class masked with -inf logits has p = 0 and log p = -inf; 0 * (finite) keeps the sum finite
    return -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(-1)  # (B,)
