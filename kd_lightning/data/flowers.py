"""Flower photos: the 5-class flower_photos set (``root/<class>/*.jpg``) or Oxford Flowers-102 (torchvision).

The flower_photos layout has no split: a seeded, stratified train/val(/test) split is made here, the same on
every run and every DDP rank; a ready-made ``train/`` + ``val/`` (+ ``test/``) tree is used as it is.
Default transforms as in the flowers distillation study: RandomResizedCrop(image_size) and a horizontal flip
for training, resize + centre crop for evaluation, ImageNet normalization.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

from kd_lightning.data.base import fetch
from kd_lightning.data.images import (
    ImageClassificationDataModule,
    Split,
    folder_layouts,
    folder_splits,
)

FLOWER_PHOTOS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWER_PHOTOS_CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


class FlowersDataModule(ImageClassificationDataModule):
    """Flower photos from an image folder, or Oxford Flowers-102 through torchvision.

    Args:
        root: ``dataset="folder"``: ``root/<class>/*.jpg`` (split here) or ``root/train/<class>/*.jpg`` +
            ``root/val/<class>/*.jpg`` (+ optional ``root/test/``). ``dataset="flowers102"``: torchvision's
            folder, holding ``flowers-102/``.
        dataset: ``"folder"`` or ``"flowers102"`` (official train/val/test split; the fractions are ignored).
        image_size: training and evaluation size (224 for the paper setup, 64-128 for CPU runs).
        val_fraction, test_fraction: held-out shares of each class when the folder has no ready-made split.
        crop_scale: RandomResizedCrop's range of crop areas (fraction of the image).
        eval_crop_fraction: evaluation resizes to ``image_size / eval_crop_fraction`` and centre-crops.
        download: fetch the data in ``prepare_data`` when it is missing (needs internet): flower_photos
            (``root`` must then end in ``flower_photos``; the archive is unpacked beside it) or Flowers-102.
        **kwargs: see :class:`~kd_lightning.data.images.ImageClassificationDataModule` (``auto_augment``,
            ``unlabelled_dir``, ``verify_images``, ``mean``/``std``, ``decoded_cache``) and
            :class:`~kd_lightning.data.base.ClassificationDataModule` (loader settings, ``labelled_fraction``,
            ``use_unlabelled``, ``split_seed``, ``noise_std``, ``mixup_alpha``, ``cutmix_alpha``).
    """

    def __init__(self, root: str, dataset: Literal["folder", "flowers102"] = "folder", image_size: int = 128,
                 val_fraction: float = 0.2, test_fraction: float = 0.0,
                 crop_scale: Sequence[float] = (0.08, 1.0), eval_crop_fraction: float = 0.875,
                 download: bool = False, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)
        if dataset not in ("folder", "flowers102"):
            raise ValueError(f"FlowersDataModule: unknown dataset {dataset!r}; choose 'folder' or 'flowers102'.")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"FlowersDataModule: crop_scale must be (min, max) with 0 < min <= max <= 1, got "
                             f"{list(crop_scale)}.")
        if not 0 < eval_crop_fraction <= 1:
            raise ValueError(f"FlowersDataModule: eval_crop_fraction must be in (0, 1], got {eval_crop_fraction}.")
        self.root, self.dataset, self.download = Path(root), dataset, download
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.crop_scale, self.eval_crop_fraction = tuple(crop_scale), eval_crop_fraction
        self._splits: tuple[Split, Split, Split | None] | None = None
        if dataset == "flowers102":
            from torchvision.datasets import Flowers102

            if not download and not (self.root / "flowers-102" / "jpg").is_dir():
                raise FileNotFoundError(
                    f"FlowersDataModule: Oxford Flowers-102 not found under '{self.root}'.\nExpected layout (as "
                    f"torchvision writes it): {self.root}/flowers-102/jpg/image_*.jpg, imagelabels.mat, setid.mat."
                    " Set download: true to fetch it (needs internet).")
            self.class_names = list(Flowers102.classes)
        elif download and not self.root.exists():  # scanned in setup(), after prepare_data has downloaded it
            if self.root.name != "flower_photos":
                raise ValueError(f"FlowersDataModule: with download: true, root must end in 'flower_photos' (the "
                                 f"archive's folder, unpacked beside it), got '{self.root}'.")
            self.class_names = list(FLOWER_PHOTOS_CLASSES)
        else:
            self._scan()
        self.num_classes = len(self.class_names)

    def _scan(self) -> None:
        names, train, val, test = folder_splits(
            self.root, owner="FlowersDataModule", layouts=folder_layouts(self.root), val_fraction=self.val_fraction,
            test_fraction=self.test_fraction, seed=self.split_seed, verify=self.verify_images)
        if getattr(self, "class_names", None) not in (None, names):
            raise ValueError(f"FlowersDataModule: '{self.root}' has classes {names}, expected {self.class_names}.")
        self.class_names, self._splits = names, (train, val, test)

    def prepare_data(self) -> None:
        if self.download and self.dataset == "flowers102":
            from torchvision.datasets import Flowers102

            fetch(lambda: Flowers102(str(self.root), split="train", download=True), self.root,
                  "FlowersDataModule (flowers102)")
        elif self.download and not self.root.exists():
            from torchvision.datasets.utils import download_and_extract_archive

            fetch(lambda: download_and_extract_archive(FLOWER_PHOTOS_URL, download_root=str(self.root.parent),
                                                       remove_finished=True), self.root,
                  "FlowersDataModule (flower_photos)")
        super().prepare_data()  # the decoded-image cache, once the files are there

    def find_splits(self) -> tuple[Split, Split, Split | None]:
        if self.dataset == "flowers102":
            base = self.root / "flowers-102"
            return flowers102_split(base, "train"), flowers102_split(base, "val"), flowers102_split(base, "test")
        if self._splits is None:
            self._scan()
        assert self._splits is not None
        return self._splits

    def train_geometry(self) -> list[Any]:
        from torchvision.transforms import v2

        return [v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True),
                v2.RandomHorizontalFlip()]

    def eval_geometry(self) -> list[Any]:
        from torchvision.transforms import v2

        return [v2.Resize(round(self.image_size / self.eval_crop_fraction), antialias=True),
                v2.CenterCrop(self.image_size)]


_FLOWERS102_SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def flowers102_split(base: Path, split: str) -> Split:
    """One official Oxford Flowers-102 split, read from the dataset's own files in ``base`` (``flowers-102/`` as
    torchvision's download lays it out): ``setid.mat`` lists the 1-based image ids of each split, ``imagelabels.mat``
    the 1-based class of every image id, and image ``n`` is ``jpg/image_<n:05d>.jpg``."""
    import numpy as np
    from scipy.io import loadmat

    labels = np.atleast_1d(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"])  # (N,), classes 1..102
    ids = np.atleast_1d(loadmat(base / "setid.mat", squeeze_me=True)[_FLOWERS102_SPLIT_KEYS[split]])
    ids = [int(i) for i in ids]
    return Split([os.fspath(base / "jpg" / f"image_{i:05d}.jpg") for i in ids], [int(labels[i - 1]) - 1 for i in ids])
