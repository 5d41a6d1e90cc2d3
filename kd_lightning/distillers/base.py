"""The seam every method plugs into: :class:`StepOutputs` (what one step gives the terms) and
:class:`DistillationTerm` (a weighted loss term that may tap layers and build adapters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor, nn


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


def linear_warmup(epoch: int, epochs: int) -> float:
    """The loss-weight warm-up of DKD and ReviewKD: ``min((epoch + 1) / epochs, 1)``, epochs counted from 1 as in
    the authors' code (``epoch`` from 0, as :attr:`StepOutputs.epoch`); ``epochs = 0``: 1 from the start."""
    return 1.0 if epochs == 0 else min((epoch + 1) / epochs, 1.0)


def check_layer_pairs(term: str, student_layers: Sequence[str], teacher_layers: Sequence[object]) -> None:
    """A clear error unless a term's student and teacher layers are non-empty lists of the same length (the pairs
    a feature term compares one by one)."""
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError(f"{term}: student_layers {list(student_layers)} and teacher_layers {list(teacher_layers)} "
                         "must be non-empty lists of the same length (pairs), e.g. [stages.1, stages.2] for both.")


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

    #: True for a term that reads each training row's dataset index (``StepOutputs.index``: a memory bank's rows);
    #: the module then asks the data for it (``return_index: true``) and calls :meth:`bind_train_rows`.
    needs_index = False

    def bind_train_rows(self, labels: Tensor) -> None:
        """Learn the training set before training: ``labels`` ``(N,)``, the class of every training row by dataset
        index (``-100``: unlabelled). Called at setup for terms with ``needs_index``. Default: nothing."""

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"


__all__ = ["DistillationTerm", "StepOutputs", "check_layer_pairs", "linear_warmup"]
