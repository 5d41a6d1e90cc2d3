"""Terms on the relations between samples: similarity-preserving KD, RKD, PKT and NST.

Each compares how the student relates the samples of a batch (or, for NST, the channels of a sample) with how the
teacher does, so neither widths nor spatial sizes need to match and no adapter is learnt. The CRD benchmark's
CIFAR settings (RepDistiller's ``train_student.py`` and ``scripts/run_cifar_distill.sh``; cross-entropy weight
1, no Hinton KD): SP on the last stage's output (``stages.2``), weight 3000; RKD on the pooled embedding
(``pool``), weight 1 with distance 25 and angle 50 inside; PKT on ``pool``, weight 30000; NST on the three
stages' outputs, weight 50.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from kd_lightning.distillers.base import DistillationTerm, StepOutputs, check_layer_pairs
from kd_lightning.losses import nst_loss, pkt_loss, rkd_loss, similarity_preserving_loss


def _check_single(term: str, layer: object, role: str) -> None:
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"{term}: {role}_layer must be one layer name (a string such as 'pool'), got {layer!r}; "
                         f"this term compares one embedding of each network.")


class SimilarityPreserving(DistillationTerm):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019; :func:`kd_lightning.losses.similarity_preserving_loss`):
    ``||rownorm(S S^T) - rownorm(T T^T)||_F^2 / B^2`` with each sample's features flattened, summed over the
    layer pairs ``zip(student_layers, teacher_layers)``. The CRD benchmark: the last stage's output, weight
    3000. Returns ``{"sp"}``."""

    default_name = "sp"

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], weight: float = 3000.0,
                 name: str | None = None) -> None:
        super().__init__(weight, name, student_layers, teacher_layers)
        check_layer_pairs("SimilarityPreserving", self.student_layers, self.teacher_layers)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        total = None
        for s_name, t_name in zip(self.student_layers, self.teacher_layers):
            value = similarity_preserving_loss(out.student_features[s_name], out.teacher_features[t_name])
            total = value if total is None else total + value
        return {self.name: total}


class RKD(DistillationTerm):
    """Relational KD (Park et al., CVPR 2019; :func:`kd_lightning.losses.rkd_loss`) on one embedding of each
    network (flattened per row; default the pooled features ``pool``): ``distance_weight * distance +
    angle_weight * angle``, the paper's 25 and 50; the CRD benchmark's outer weight is 1. Returns ``{"rkd"}``
    (the two parts are not separate log keys)."""

    default_name = "rkd"

    def __init__(self, student_layer: str = "pool", teacher_layer: str = "pool", weight: float = 1.0,
                 distance_weight: float = 25.0, angle_weight: float = 50.0, name: str | None = None) -> None:
        _check_single("RKD", student_layer, "student")
        _check_single("RKD", teacher_layer, "teacher")
        super().__init__(weight, name, [student_layer], [teacher_layer])
        for what, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"RKD: {what} must be a number >= 0 (the paper: distance 25, angle 50), "
                                 f"got {value!r}.")
        if distance_weight == 0 and angle_weight == 0:
            raise ValueError("RKD: distance_weight and angle_weight are both 0, so the term is always 0; give at "
                             "least one a positive weight (the paper: distance 25, angle 50).")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        losses = rkd_loss(out.student_features[self.student_layers[0]], out.teacher_features[self.teacher_layers[0]],
                          self.distance_weight, self.angle_weight)
        return {self.name: losses["rkd"]}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


class PKT(DistillationTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018; :func:`kd_lightning.losses.pkt_loss`):
    the KL divergence between the teacher's and the student's cosine-similarity distributions over the batch, on
    one embedding of each network (flattened per row; default ``pool``). The CRD benchmark's weight is 30000.
    ``eps``: the authors' 1e-7. Returns ``{"pkt"}``."""

    default_name = "pkt"

    def __init__(self, student_layer: str = "pool", teacher_layer: str = "pool", weight: float = 30000.0,
                 eps: float = 1e-7, name: str | None = None) -> None:
        _check_single("PKT", student_layer, "student")
        _check_single("PKT", teacher_layer, "teacher")
        super().__init__(weight, name, [student_layer], [teacher_layer])
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"PKT: eps must be a small number in (0, 1) (the authors': 1e-7), got {eps!r}.")
        self.eps = float(eps)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        return {self.name: pkt_loss(out.student_features[self.student_layers[0]],
                                    out.teacher_features[self.teacher_layers[0]], self.eps)}


class NST(DistillationTerm):
    """Neuron selectivity transfer (Huang & Wang, 2017; :func:`kd_lightning.losses.nst_loss`): the MMD with the
    polynomial kernel (d = 2, c = 0) between the L2-normalised channel maps of student and teacher, summed over
    the layer pairs ``zip(student_layers, teacher_layers)`` of ``(B, C, H, W)`` maps. The CRD benchmark: the
    three stages' outputs, weight 50. Returns ``{"nst"}``."""

    default_name = "nst"

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], weight: float = 50.0,
                 name: str | None = None) -> None:
        super().__init__(weight, name, student_layers, teacher_layers)
        check_layer_pairs("NST", self.student_layers, self.teacher_layers)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        total = None
        for s_name, t_name in zip(self.student_layers, self.teacher_layers):
            s, t = out.student_features[s_name], out.teacher_features[t_name]
            if s.ndim != 4 or t.ndim != 4:
                raise ValueError(f"NST {self.name!r}: the student's {s_name!r} gives {tuple(s.shape)} and the "
                                 f"teacher's {t_name!r} {tuple(t.shape)}, but NST compares channel maps "
                                 "(B, C, H, W): tap convolutional layers such as stages.0 .. stages.2.")
            value = nst_loss(s, t)
            total = value if total is None else total + value
        return {self.name: total}


__all__ = ["NST", "PKT", "RKD", "SimilarityPreserving"]
