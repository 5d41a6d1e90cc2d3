"""Which rows of a batch are labelled: one marker, one rule, used by the losses, the metrics and the data.

Targets are class indices ``(B,)`` or soft labels ``(B, K)`` (MixUp/CutMix):

* a class-index row is **unlabelled** when its label is :data:`UNLABELLED` (``-100``, cross-entropy's
  ``ignore_index``); the data marks the rows of a transfer set this way;
* a soft-label row is **unlabelled** when it sums to 0 (MixUp of two unlabelled rows); a row mixed from a labelled
  and an unlabelled one sums to the labelled share ``lam`` and counts as labelled.

Unlabelled rows get the distillation terms only: no hard loss, no accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNLABELLED = -100


def labelled_mask(targets: Tensor) -> Tensor:
    """``(B,)`` boolean: which rows have a label (the rule of the module docstring). Device ops only: no host sync."""
    return targets.sum(-1) > 0 if targets.ndim == 2 else targets != UNLABELLED


def labelled_rows(targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(labels, labelled)``, both ``(B,)``: class indices (0 where unlabelled, so they can index a tensor; the
    argmax of soft labels) and :func:`labelled_mask`."""
    labelled = labelled_mask(targets)
    if targets.ndim == 2:  # (B, K) soft labels
        return targets.argmax(-1), labelled
    return torch.where(labelled, targets, torch.zeros_like(targets)).long(), labelled


def one_hot_targets(targets: Tensor, num_classes: int) -> Tensor:
    """``(B,)`` class indices as float one-hot ``(B, K)``, all-zero for unlabelled rows; soft labels as float."""
    if targets.ndim == 2:
        return targets.float()
    labels, labelled = labelled_rows(targets)
    return torch.nn.functional.one_hot(labels, num_classes).float() * labelled.unsqueeze(-1)
