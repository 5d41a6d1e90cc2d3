r"""Distillation terms: one small module per method, combined by :class:`~kd_lightning.DistillationModule`.

A run's loss is a weighted sum of terms, a mapping from each term's name to its ``class_path``/``init_args``::

    model:
      init_args:
        terms:
          ce: {class_path: kd_lightning.distillers.CrossEntropy, init_args: {weight: 1.0}}   # the hard labels
          kd: {class_path: kd_lightning.distillers.HintonKD, init_args: {weight: 0.9, temperature: 4.0}}
          at:
            class_path: kd_lightning.distillers.AttentionTransfer
            init_args: {weight: 1000.0, student_layers: [stages.1, stages.2], teacher_layers: [stages.1, stages.2]}

``loss = sum_i weight_i * sum(term_i(step).values())``; each value is logged as ``train/loss_<name>`` (and
``val/``, ``test/``) after weighting, so the logged parts add up to ``train/loss``. The name addresses a term's
settings on the command line and in studies (``--model.init_args.terms.kd.init_args.temperature 2``) and in
schedules (``terms.kd.temperature``). A list of terms (each named by its ``name``, default its kind) works too.

A term sees one :class:`StepOutputs` per step: the student's logits, the teacher's heads, the targets, the
features of the layers it asked for (captured by forward hooks in the same forward passes that give the logits),
the epoch and the optional per-sample index. It returns a dict of named loss values (unweighted).

To add a method: write its loss as a documented function in :mod:`kd_lightning.losses` (or here), subclass
:class:`DistillationTerm` below with ``name``, optional ``student_layers``/``teacher_layers``, optional
``build`` (adapters, from the feature shapes of a dry run) and ``forward``; name it in a YAML file.

Adapters (FitNets' regressor) belong to the training run, not to the student: they live in the module's
``terms`` (checkpointed, restored on resume, optimised in their own parameter group) and never in
``module.student``, so exports and parameter counts of the student do not include them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor, nn

from kd_lightning.losses import (
    attention_transfer_loss,
    channel_normalize,
    dkd_loss,
    hard_loss,
    hint_loss,
    match_spatial,
    soft_kd_loss,
)


@dataclass
class StepOutputs:
    """What one training/validation step gives every term.

    Attributes:
        student_logits: ``(B, K)`` the student's main head.
        teacher_logits: the teacher's heads, each ``(B, K)``, main head first (no gradient); empty without a teacher.
        targets: ``(B,)`` class indices (``-100``: unlabelled, see :mod:`kd_lightning.labels`) or ``(B, K)`` soft
            labels.
        student_features / teacher_features: layer name -> output of that layer in this step's forward pass.
        epoch: the current epoch (from 0).
        index: ``(B,)`` dataset indices of the rows, when the batch carries them (for memory-bank methods).
        student_heads: every head of the student, main first (GoogLeNet's auxiliary heads); ``[student_logits]``
            when it has one.
    """

    student_logits: Tensor
    teacher_logits: list[Tensor]
    targets: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    epoch: int = 0
    index: Tensor | None = None
    student_heads: list[Tensor] = field(default_factory=list)


def _check_layers(layers: Sequence[str] | str | None, what: str) -> tuple[str, ...]:
    if layers is None:
        return ()
    if isinstance(layers, str):
        layers = [layers]
    layers = tuple(layers)
    if not all(isinstance(n, str) and n for n in layers):
        raise ValueError(f"{what} must be layer names (strings such as 'layer3' or 'features.4'), got {layers!r}.")
    return layers


class DistillationTerm(nn.Module):
    """Base class of a loss term: a ``weight`` >= 0, a ``name`` (the log key ``loss_<name>``) and the layers it
    taps. Subclasses implement ``forward(out: StepOutputs) -> dict[str, Tensor]``."""

    default_name = "term"

    def __init__(self, weight: float = 1.0, name: str | None = None, student_layers: Sequence[str] = (),
                 teacher_layers: Sequence[str] = ()) -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{type(self).__name__}: weight must be a number >= 0, got {weight!r}.")
        self.weight = float(weight)
        self.name = name or self.default_name
        if not self.name.isidentifier():
            raise ValueError(f"{type(self).__name__}: name must be a plain identifier (it names the log key "
                             f"loss_<name> and the scheduler path terms.<name>), got {self.name!r}.")
        self.student_layers = _check_layers(student_layers, "student_layers")
        self.teacher_layers = _check_layers(teacher_layers, "teacher_layers")
        self.built = True

    def rename(self, name: str) -> None:
        """Take ``name`` (the key of a ``terms:`` mapping); a different ``name`` given to the term is an error."""
        if self.name != name and self.name != self.default_name:
            raise ValueError(f"{type(self).__name__} is listed as {name!r} but named {self.name!r}: the key of the "
                             "terms mapping is its name; drop its `name`.")
        if not name.isidentifier():
            raise ValueError(f"term name {name!r} must be a plain identifier (it names the log key loss_<name> and "
                             "the scheduler path terms.<name>).")
        self.name = name

    def check_heads(self, role: str, heads: int) -> None:
        """A clear error when this term's per-head weights do not fit a ``role`` network with ``heads`` heads."""
        weights = getattr(self, "teacher_weights" if role == "teacher" else "head_weights", None)
        if weights is not None and len(weights) != heads:
            raise ValueError(f"The term {self.name!r} weights {len(weights)} {role} heads, but the {role} gives "
                             f"{heads}: give one weight per head, main head first.")

    def build(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        """Create whatever depends on feature shapes (adapters), from a dry run's features. Default: nothing."""

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"


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


def shorthand_terms(temperature: float = 4.0, alpha: float = 0.9,
                    teacher_weights: Sequence[float] | None = None) -> dict[str, DistillationTerm]:
    """The ``temperature``/``alpha`` shorthand of Hinton et al. (2015) as terms: ``{"kd": HintonKD(alpha, T),
    "ce": CrossEntropy(1 - alpha)}``, i.e. ``loss = alpha * T^2 KL + (1 - alpha) * CE`` exactly as
    :func:`kd_lightning.losses.distillation_loss`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    return {"kd": HintonKD(weight=alpha, temperature=temperature, teacher_weights=teacher_weights),
            "ce": CrossEntropy(weight=1.0 - alpha)}


__all__ = ["AttentionTransfer", "CrossEntropy", "DKD", "DistillationTerm", "Hint", "HintonKD", "StepOutputs",
           "shorthand_terms"]
