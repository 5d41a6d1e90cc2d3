"""Terms on intermediate features: FitNets hints, attention transfer, and the methods that learn modules on the
student's features: variational information distillation (VID) and ReviewKD."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.distillers.base import DistillationTerm, StepOutputs, check_layer_pairs, linear_warmup
from kd_lightning.losses import (
    attention_transfer_loss,
    channel_normalize,
    hcl_loss,
    hint_loss,
    match_spatial,
    vid_loss,
)


def _adapter(student: Tensor, teacher: Tensor, batchnorm: bool = True, relu: bool = False) -> nn.Module:
    """FitNets' regressor: 1x1 conv + BatchNorm (maps) or linear + BatchNorm (vectors) to the teacher's width
    (``batchnorm=False``: the conv or linear alone, with a bias). ``relu``: the authors' regressor (RepDistiller's
    ``ConvReg``): the conv or linear with a bias, BatchNorm (unless ``batchnorm=False``), then a ReLU."""
    cs, ct = student.shape[1], teacher.shape[1]
    if relu and student.ndim in (2, 4):
        maps = student.ndim == 4
        layers: list[nn.Module] = [nn.Conv2d(cs, ct, 1) if maps else nn.Linear(cs, ct)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(ct) if maps else nn.BatchNorm1d(ct))
        return nn.Sequential(*layers, nn.ReLU())
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
    SyncBatchNorm). ``relu``: the authors' regressor instead (RepDistiller's ``ConvReg``, used for the CRD table's
    FitNet row): 1x1 conv with a bias + BN + ReLU; the default keeps the plain adapter. Returns ``{"hint"}``."""

    default_name = "hint"

    def __init__(self, student_layer: str, teacher_layer: str, weight: float = 100.0, normalize: bool = False,
                 batchnorm: bool = True, name: str | None = None, relu: bool = False) -> None:
        super().__init__(weight, name, [student_layer], [teacher_layer])
        if not isinstance(relu, bool):
            raise ValueError(f"Hint: relu must be true or false (true: the authors' conv + BN + ReLU regressor), "
                             f"got {relu!r}.")
        self.normalize, self.batchnorm, self.relu = normalize, batchnorm, relu
        self.adapter: nn.Module | None = None
        self.built = False

    def build(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        s, t = student_features[self.student_layers[0]], teacher_features[self.teacher_layers[0]]
        if s.ndim != t.ndim:
            raise ValueError(f"Hint {self.name!r}: the student's {self.student_layers[0]!r} gives {s.ndim}-d features "
                             f"{tuple(s.shape)} but the teacher's {self.teacher_layers[0]!r} gives {t.ndim}-d "
                             f"{tuple(t.shape)}; tap layers of the same kind (both maps or both vectors).")
        self.adapter = _adapter(s, t, self.batchnorm, self.relu)
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
        check_layer_pairs("AttentionTransfer", self.student_layers, self.teacher_layers)
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



def _as_map(features: Tensor, term: str, layer: str) -> Tensor:
    """``(B, C, H, W)`` features as they are, ``(B, C)`` (an embedding) as ``(B, C, 1, 1)``."""
    if features.ndim == 2:
        return features[:, :, None, None]
    if features.ndim != 4:
        raise ValueError(f"{term}: the layer {layer!r} gives features of shape {tuple(features.shape)}; this term "
                         "needs (B, C, H, W) maps or (B, C) embeddings.")
    return features


class VID(DistillationTerm):
    """Variational information distillation (Ahn et al., CVPR 2019; :func:`kd_lightning.losses.vid_loss`), summed
    over the layer pairs ``zip(student_layers, teacher_layers)``. For each pair a regressor conv1x1-ReLU-conv1x1-
    ReLU-conv1x1 (no biases; student channels -> ``mid_channels`` -> teacher channels; ``mid_channels`` default
    the teacher's channels, as in RepDistiller) predicts the mean of the teacher's map, and a learned per-channel
    variance ``softplus(log_scale) + eps`` starts at ``init_pred_var`` (5, the authors'). When the spatial sizes
    differ the larger map is average-pooled to the smaller (the student's before its regressor). The CRD
    benchmark: the three stages' outputs, weight 1. Built from the feature shapes (:meth:`build`); regressors and
    log-scales are trained with the adapters. Returns ``{"vid"}``."""

    default_name = "vid"

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], weight: float = 1.0,
                 init_pred_var: float = 5.0, eps: float = 1e-5, mid_channels: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(weight, name, student_layers, teacher_layers)
        check_layer_pairs("VID", self.student_layers, self.teacher_layers)
        if not eps > 0:
            raise ValueError(f"VID: eps must be > 0 (the variance's floor; the authors' 1e-5), got {eps!r}.")
        if not init_pred_var > eps:
            raise ValueError(f"VID: init_pred_var must be > eps = {eps} (the variance at the start; the authors' "
                             f"5.0), got {init_pred_var!r}.")
        if mid_channels is not None and (isinstance(mid_channels, bool) or not isinstance(mid_channels, int)
                                         or mid_channels < 1):
            raise ValueError(f"VID: mid_channels must be a positive integer or null (the teacher's channels), got "
                             f"{mid_channels!r}.")
        self.init_pred_var, self.eps, self.mid_channels = float(init_pred_var), float(eps), mid_channels
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        self.built = False

    def build(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        # softplus(a) + eps = init_pred_var at the start: a = log(exp(init_pred_var - eps) - 1)
        start = math.log(math.expm1(self.init_pred_var - self.eps))
        regressors, log_scales = [], []
        for s_name, t_name in zip(self.student_layers, self.teacher_layers):
            cs = _as_map(student_features[s_name], "VID", s_name).shape[1]
            ct = _as_map(teacher_features[t_name], "VID", t_name).shape[1]
            mid = self.mid_channels or ct
            regressors.append(nn.Sequential(
                nn.Conv2d(cs, mid, 1, bias=False), nn.ReLU(),
                nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                nn.Conv2d(mid, ct, 1, bias=False)))
            log_scales.append(nn.Parameter(torch.full((ct,), start)))
        self.regressors, self.log_scales = nn.ModuleList(regressors), nn.ParameterList(log_scales)
        self.built = True

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if not self.built:
            raise RuntimeError(f"VID {self.name!r}: its regressors are not built; DistillationModule.build_terms("
                               "input_shape) runs a dry run to build them (done at setup from the DataModule).")
        total = None
        for i, (s_name, t_name) in enumerate(zip(self.student_layers, self.teacher_layers)):
            s = _as_map(out.student_features[s_name], "VID", s_name)  # (B, Cs, Hs, Ws)
            t = _as_map(out.teacher_features[t_name], "VID", t_name)  # (B, Ct, Ht, Wt)
            size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
            s, t = match_spatial(s, size), match_spatial(t, size)
            value = vid_loss(self.regressors[i](s), t, self.log_scales[i], self.eps)
            total = value if total is None else total + value
        return {self.name: total}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init_pred_var={self.init_pred_var}, eps={self.eps}"


class AttentionBasedFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF) of one level: the student's map through a 1x1 conv + BN to
    ``mid_channels``; with ``fuse``, mixed with the deeper level's fused map (nearest-upsampled to this size) by
    two spatial attention maps (1x1 conv over both, sigmoid); resized (nearest) to the teacher's size; a 3x3
    conv + BN to the teacher's channels. ``forward(x, residual, size) -> (output, fused map for the next
    level)``. Conv weights initialised as the authors' (Kaiming-uniform, a = 1)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, size: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)  # (B, mid, H, W)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("AttentionBasedFusion: a fusing level needs the deeper level's map.")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")  # (B, mid, H, W)
            attention = self.att_conv(torch.cat([x, residual], dim=1))  # (B, 2, H, W)
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, mid, Ht, Wt)
        return self.conv2(x), x  # (B, Ct, Ht, Wt), (B, mid, Ht, Wt)


class ReviewKD(DistillationTerm):
    """Knowledge review (Chen et al., CVPR 2021; :func:`kd_lightning.losses.hcl_loss`): the student's features at
    ``student_layers`` (shallow to deep) are fused from the deepest to the shallowest by attention-based fusion
    modules (:class:`AttentionBasedFusion`, one per level, ``min(max_mid_channels, C)`` middle channels with
    ``C`` the deepest student layer's), each giving a map with the teacher's channels and size at that level;
    the hierarchical context loss compares them with the teacher's ``teacher_layers``, summed over levels, times
    the linear warm-up ``min((epoch + 1) / warmup, 1)`` (mdistiller's, epochs counted from 1; ``warmup: 0`` turns
    it off). ``(B, C)`` embeddings count as 1x1 maps.

    A teacher layer may be a sum of layers, ``"a+b"``: ``stages.2.4.bn2+stages.2.4.shortcut`` is the
    pre-activation of the last block of a CIFAR ResNet's stage (its output before the final ReLU), the teacher
    features of the authors' code (``preact=True``; the student's are after the ReLU). The authors' CIFAR setting
    for ResNet-32x4 -> ResNet-8x4: the three stages and the pooled embedding ``pool``, weight 5, warm-up 20
    epochs. Returns ``{"reviewkd"}``."""

    default_name = "reviewkd"

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], weight: float = 1.0,
                 warmup: int = 20, max_mid_channels: int = 512, name: str | None = None) -> None:
        groups = _layer_sums(teacher_layers)
        super().__init__(weight, name, student_layers, list(dict.fromkeys(n for g in groups for n in g)))
        check_layer_pairs("ReviewKD", self.student_layers, groups)
        for what, value in (("warmup", warmup), ("max_mid_channels", max_mid_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if what == "warmup" else 1):
                raise ValueError(f"ReviewKD: {what} must be an integer >= {0 if what == 'warmup' else 1} (the "
                                 f"authors': warmup 20 epochs, max_mid_channels 512), got {value!r}.")
        self.teacher_groups = groups
        self.warmup, self.max_mid_channels = warmup, max_mid_channels
        self.abfs = nn.ModuleList()
        self.built = False

    def teacher_maps(self, teacher_features: dict[str, Tensor]) -> list[Tensor]:
        """The teacher's map of each level: a layer's output, or the sum of a group's."""
        maps = []
        for group in self.teacher_groups:
            value = teacher_features[group[0]]
            for name in group[1:]:
                value = value + teacher_features[name]
            maps.append(_as_map(value, "ReviewKD", "+".join(group)))
        return maps

    def build(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        students = [_as_map(student_features[n], "ReviewKD", n) for n in self.student_layers]
        teachers = self.teacher_maps(teacher_features)
        mid = min(self.max_mid_channels, students[-1].shape[1])
        last = len(students) - 1
        self.abfs = nn.ModuleList([AttentionBasedFusion(s.shape[1], mid, t.shape[1], fuse=i < last)
                                   for i, (s, t) in enumerate(zip(students, teachers))])
        self.built = True

    def warmup_factor(self, epoch: int) -> float:
        return linear_warmup(epoch, self.warmup)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if not self.built:
            raise RuntimeError(f"ReviewKD {self.name!r}: its fusion modules are not built; DistillationModule."
                               "build_terms(input_shape) runs a dry run to build them (done at setup from the "
                               "DataModule).")
        students = [_as_map(out.student_features[n], "ReviewKD", n) for n in self.student_layers]
        teachers = self.teacher_maps(out.teacher_features)
        results: list[Tensor] = [students[0]] * len(students)
        residual = None
        for i in reversed(range(len(students))):  # the deepest level first
            results[i], residual = self.abfs[i](students[i], residual, teachers[i].shape[-2:])
        return {self.name: self.warmup_factor(out.epoch) * hcl_loss(results, teachers)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, warmup={self.warmup}"


def _layer_sums(layers: Sequence[str] | str) -> list[tuple[str, ...]]:
    """``["a", "b+c"]`` -> ``[("a",), ("b", "c")]``, with a clear error for an empty part."""
    layers = [layers] if isinstance(layers, str) else list(layers or [])
    groups = []
    for entry in layers:
        parts = tuple(p.strip() for p in entry.split("+")) if isinstance(entry, str) else ("",)
        if not all(parts):
            raise ValueError(f"ReviewKD: teacher_layers must be layer names or sums of them such as "
                             f"'stages.2.4.bn2+stages.2.4.shortcut', got {entry!r}.")
        groups.append(parts)
    return groups


__all__ = ["AttentionTransfer", "Hint", "ReviewKD", "VID"]
