"""What every kd_lightning DataModule shares: class count known at construction (the CLI links it into the
model), loader settings, and partial labelling for transfer sets.

A subclass sets ``num_classes``, ``class_names`` and ``input_shape`` in ``__init__`` (so bad paths fail before
anything is written) and implements ``build_datasets()``, returning the train/val/test datasets of ``(x, y)``
and the train set's labels. Unlabelled rows carry the label ``-100`` (cross-entropy's ignore index); the
distillation loss gives them the soft term only.
"""

from __future__ import annotations

from typing import Any, Sequence

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from kd_lightning.data.splits import labelled_subset

UNLABELLED = -100


class PartiallyLabelled(Dataset):
    """``dataset`` with the labels of all rows outside ``labelled`` replaced by ``-100``."""

    def __init__(self, dataset: Dataset, labelled: Sequence[int]) -> None:
        self.dataset = dataset
        self.labelled = frozenset(labelled)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self.dataset[i]
        return x, (y if i in self.labelled else UNLABELLED)


class ClassificationDataModule(LightningDataModule):
    """Base class; see the module docstring.

    Args:
        batch_size: per-process batch size.
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        labelled_fraction: fraction of each training class that keeps its label (seeded, stratified, the same on
            every rank); the rest become unlabelled rows. Validation and test sets keep every label.
        use_unlabelled: keep the unlabelled rows in the training set (distillation) or drop them (the scratch
            baseline, which can learn nothing from them).
        split_seed: seed of the train/val/test split and of the labelled subset.
    """

    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, labelled_fraction: float = 1.0, use_unlabelled: bool = True,
                 split_seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0.0 < labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.labelled_fraction = labelled_fraction
        self.use_unlabelled = use_unlabelled
        self.split_seed = split_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset | None, Sequence[int]]:
        """``(train, val, test, train_labels)``; ``test`` may be None."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, self.val_set, self.test_set, train_labels = self.build_datasets()
        labelled = labelled_subset(train_labels, self.labelled_fraction, self.split_seed)
        if self.labelled_fraction < 1.0:
            train = PartiallyLabelled(train, labelled) if self.use_unlabelled else Subset(train, labelled)
        self.train_set = train

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no such split; call setup() first or check the data.")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                          drop_last=shuffle and len(dataset) > self.batch_size)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, shuffle=False)
