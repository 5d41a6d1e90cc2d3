"""The batch contract shared by the steps, the DataModules and MixUp/CutMix.

A batch is positional, as a DataLoader collates it: ``(images, targets[, index[, teacher_logits]])``.

- ``images``: ``(B, C, H, W)`` (or any ``(B, ...)`` network input);
- ``targets``: ``(B,)`` class indices (``-100``: unlabelled) or ``(B, K)`` soft labels (MixUp/CutMix);
- ``index`` (optional): ``(B,)`` dataset indices of the rows (``return_index: true`` on a DataModule), for
  methods with a per-sample memory (CRD's memory bank);
- ``teacher_logits`` (optional): ``(B, K)`` cached teacher logits (offline distillation): the module then skips
  the teacher's forward pass unless a term taps teacher layers.

:func:`as_batch` reads any such tuple or list as a :class:`Batch`. MixUp/CutMix mix images and targets and
refuse a batch with optional per-sample fields (they would stay unmixed and describe another image).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor
from torch.utils.data import Dataset


class Batch(NamedTuple):
    images: Tensor
    targets: Tensor
    index: Tensor | None = None
    teacher_logits: Tensor | None = None

    def extra_fields(self) -> list[str]:
        """The names of the optional per-sample fields this batch carries."""
        return [name for name in ("index", "teacher_logits") if getattr(self, name) is not None]


def as_batch(batch: Any) -> Batch:
    """``batch`` (a :class:`Batch`, or a tuple/list in its field order) as a :class:`Batch`."""
    if isinstance(batch, Batch):
        return batch
    if not isinstance(batch, (tuple, list)) or not 2 <= len(batch) <= 4:
        raise ValueError(f"A batch is (images, targets[, index[, teacher_logits]]); got "
                         f"{type(batch).__name__}" + (f" of {len(batch)} fields." if hasattr(batch, '__len__') else "."))
    return Batch(*batch)


class WithIndex(Dataset):
    """``dataset``'s ``(x, y)`` rows as ``(x, y, i)``: the row's index travels with it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[i][:2]
        return x, y, i
