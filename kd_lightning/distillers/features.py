"""Terms on intermediate features: FitNets hints and attention transfer."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from kd_lightning.distillers.base import DistillationTerm, StepOutputs
from kd_lightning.losses import attention_transfer_loss, channel_normalize, hint_loss, match_spatial


def _adapter(student: Tensor, teacher: Tensor, batchnorm: bool = True) -> nn.Module:
    """FitNets' regressor: 1x1 conv + BatchNorm (maps) or linear + BatchNorm (vectors) to the teacher's width
    (``batchnorm=False``: the conv or linear alone, with a bias)."""
    cs, ct = student.shape[1], teacher.shape[1]
    if student.ndim == 4:
        if not batchnorm:
            return nn.Sequential(nn.Conv2d(cs, ct, 1))
        return nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
    if student.ndim == 2:
        if not batchnorm:
            return nn.Sequential(nn.Linear(cs, ct))
        return nn.Sequential(nn.Linear(cs, ct, bias=False), nn.BatchNorm1d(ct))
    raise ValueError(f"A hint adapter needs (B, C, H, W) or (B, C) features, got shape {tuple(student.shape)}.")


class Hint(DistillationTerm):
    """FitNets hint (Romero et al., 2015; :func:`kd_lightning.losses.hint_loss`): MSE between the teacher's
    ``teacher_layer`` output and the student's ``student_layer`` output through an adapter (1x1 conv + BN to the
    teacher's channels), resized to the teacher's spatial size (:func:`kd_lightning.losses.match_spatial`).
    ``normalize``: compare per-channel standardised features (:func:`kd_lightning.losses.channel_normalize`).
    ``batchnorm``: the adapter's BatchNorm (``False``: a biased 1x1 conv alone, e.g. for CPU DDP, which has no
    SyncBatchNorm). Returns ``{"hint"}``."""

    default_name = "hint"

    def __init__(self, student_layer: str, teacher_layer: str, weight: float = 100.0, normalize: bool = False,
                 batchnorm: bool = True, name: str | None = None) -> None:
        super().__init__(weight, name, [student_layer], [teacher_layer])
        self.normalize, self.batchnorm = normalize, batchnorm
        self.adapter: nn.Module | None = None
        self.built = False

    def build(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        s, t = student_features[self.student_layers[0]], teacher_features[self.teacher_layers[0]]
        if s.ndim != t.ndim:
            raise ValueError(f"Hint {self.name!r}: the student's {self.student_layers[0]!r} gives {s.ndim}-d features "
                             f"{tuple(s.shape)} but the teacher's {self.teacher_layers[0]!r} gives {t.ndim}-d "
                             f"{tuple(t.shape)}; tap layers of the same kind (both maps or both vectors).")
        self.adapter = _adapter(s, t, self.batchnorm)
        self.built = True

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if self.adapter is None:
            raise RuntimeError(f"Hint {self.name!r}: its adapter is not built; DistillationModule.build_terms("
                               "input_shape) runs a dry run to build it (done at setup from the DataModule).")
        s = self.adapter(out.student_features[self.student_layers[0]])
        t = out.teacher_features[self.teacher_layers[0]]
        s = match_spatial(s, t.shape[-2:]) if t.ndim == 4 else s
        if self.normalize:
            s, t = channel_normalize(s), channel_normalize(t)
        return {self.name: hint_loss(s, t)}


class AttentionTransfer(DistillationTerm):
    """Attention transfer (Zagoruyko & Komodakis, 2017; :func:`kd_lightning.losses.attention_transfer_loss`),
    p = 2, summed over the layer pairs ``zip(student_layers, teacher_layers)``. ``normalize``: per-channel
    standardise the features first. Returns ``{"at"}``."""

    default_name = "at"

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], weight: float = 1000.0,
                 p: float = 2.0, normalize: bool = False, name: str | None = None) -> None:
        super().__init__(weight, name, student_layers, teacher_layers)
        if len(self.student_layers) != len(self.teacher_layers) or not self.student_layers:
            raise ValueError(f"AttentionTransfer: student_layers {list(self.student_layers)} and teacher_layers "
                             f"{list(self.teacher_layers)} must be non-empty lists of the same length (pairs).")
        if p <= 0:
            raise ValueError(f"AttentionTransfer: p must be > 0, got {p}.")
        self.p, self.normalize = float(p), normalize

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        total = None
        for s_name, t_name in zip(self.student_layers, self.teacher_layers):
            s, t = out.student_features[s_name], out.teacher_features[t_name]
            if self.normalize:
                s, t = channel_normalize(s), channel_normalize(t)
            value = attention_transfer_loss(s, t, self.p)
            total = value if total is None else total + value
        return {self.name: total}


__all__ = ["AttentionTransfer", "Hint"]
