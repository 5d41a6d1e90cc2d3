"""scikit-learn's bundled digits: 1,797 real 8x8 grey images of handwritten digits, 10 classes, no download.

The data of the embedded quickstart: small enough that a teacher, a distilled student and a scratch student
train in seconds on a laptop CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from kd_lightning.data.base import ClassificationDataModule
from kd_lightning.data.splits import stratified_split


class DigitsDataModule(ClassificationDataModule):
    """Digits as ``(B, 1, 8, 8)`` float tensors in [0, 1], with a seeded stratified train/val/test split.

    Args:
        val_fraction, test_fraction: shares of the 1,797 images held out (stratified by class).
        noise_std: standard deviation of Gaussian input noise added to training batches (0: off).
        **kwargs: see :class:`~kd_lightning.data.base.ClassificationDataModule` (loader settings,
            ``labelled_fraction``, ``use_unlabelled``, ``split_seed``, ``mixup_alpha``, ``cutmix_alpha``,
            ``return_index``).
    """

    def __init__(self, val_fraction: float = 0.2, test_fraction: float = 0.2, noise_std: float = 0.0,
                 batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, labelled_fraction: float = 1.0, use_unlabelled: bool = True,
                 split_seed: int = 0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 return_index: bool = False, predict_split: Literal["test", "val"] = "test") -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, labelled_fraction,
                         use_unlabelled, split_seed, noise_std=noise_std, mixup_alpha=mixup_alpha,
                         cutmix_alpha=cutmix_alpha, return_index=return_index, predict_split=predict_split)
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
                             f"{val_fraction} and {test_fraction}.")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_classes = 10
        self.class_names = [str(d) for d in range(10)]
        self.input_shape = (1, 8, 8)

    def teacher_cache_description(self) -> dict[str, Any]:
        import sklearn

        data = {"dataset": "sklearn.datasets.load_digits", "sklearn": sklearn.__version__,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction, **self.train_rows_description()}
        return {"data": data, "transform": "none (images as they are; noise_std runs on the device)"}

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset | None, list[int]]:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        labels = torch.as_tensor(digits.target, dtype=torch.long)  # (N,)
        fractions = [1 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction]
        train_idx, val_idx, test_idx = stratified_split(labels.tolist(), fractions, self.split_seed)
        full = TensorDataset(images, labels)
        test = Subset(full, test_idx) if test_idx else None
        return Subset(full, train_idx), Subset(full, val_idx), test, labels[train_idx].tolist()
