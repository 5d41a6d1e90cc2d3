"""Image folders and datasets, shared by the flowers and CIFAR DataModules (files: :mod:`kd_lightning.data.files`).

* :func:`scan_class_folders` / :func:`scan_image_folder` list a ``root/<class>/*`` tree or a flat folder once,
  in sorted order (so splits are the same on every machine and rank), at construction: a missing or empty
  folder, or a class folder without images, is a clear error that shows the expected layout. Unreadable or
  truncated files are left out with one warning that names them (:func:`kd_lightning.data.files.check_image_file`),
  before training, instead of a PIL traceback mid-epoch.
* :class:`ImageDataset` turns items (paths, or indices into an array) into ``(transform(image), label)``.
* :class:`ImageClassificationDataModule` is the shared base: ``torchvision.transforms.v2`` pipelines
  (per-dataset geometry from the subclass, optional AutoAugment/RandAugment/TrivialAugment, normalize),
  ``unlabelled_dir`` and ``decoded_cache`` (files decoded once, :mod:`kd_lightning.data.decoded`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.data.base import ClassificationDataModule
from kd_lightning.data.decoded import DecodedImages
from kd_lightning.data.files import (IMG_EXTENSIONS, decode_image_file, drop_unreadable, file_entries, is_image,
                                     list_images)
from kd_lightning.data.splits import stratified_split
from kd_lightning.labels import UNLABELLED

AutoAugment = Literal["none", "autoaugment", "randaugment", "trivialaugment"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ArrayImages:
    """Loads item ``i`` of a ``uint8`` array ``(N, H, W, 3)`` (e.g. torchvision's CIFAR) as ``(3, H, W)``."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def __call__(self, i: int) -> Tensor:
        return torch.from_numpy(self.array[i]).permute(2, 0, 1)


class ImageDataset(Dataset):
    """``(transform(load(items[i])), labels[i])``.

    An image that cannot be decoded at run time (changed or damaged after the check at construction) does not
    stop training: it is replaced by the next readable image **as an unlabelled row** (label -100, so no wrong
    label is learnt and validation accuracy skips it), with one warning naming the file.
    """

    def __init__(self, items: Sequence[Any], labels: Sequence[int], transform: Callable[[Tensor], Tensor] | None,
                 load: Callable[[Any], Tensor] = decode_image_file) -> None:
        if len(items) != len(labels):
            raise ValueError(f"{len(items)} items but {len(labels)} labels.")
        self.items, self.labels = list(items), [int(y) for y in labels]
        self.transform, self.load = transform, load
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        tries = min(len(self.items), 16)
        for step in range(tries):
            j = (i + step) % len(self.items)
            try:
                image = self.load(self.items[j])
            except Exception as err:  # noqa: BLE001 -- any decoder error
                if j not in self._warned:
                    self._warned.add(j)
                    warnings.warn(f"Cannot decode image {self.items[j]} ({type(err).__name__}: {err}); using the "
                                  "next image as an unlabelled row instead. Replace or delete the file.",
                                  stacklevel=2)
                continue
            label = self.labels[i] if step == 0 else UNLABELLED
            return (self.transform(image) if self.transform is not None else image), label
        raise RuntimeError(f"Cannot decode image {self.items[i]} nor the {tries - 1} images after it: is the data "
                           "folder readable?")


# -- folder scans -----------------------------------------------------------------------------------------------
@dataclass
class ImageFolderScan:
    """A scanned ``root/<class>/*`` tree: sorted class names, and file paths with their class index."""

    root: Path
    class_names: list[str]
    paths: list[Path]
    labels: list[int]


def _layout_error(cls_name: str, problem: str, layouts: str) -> FileNotFoundError:
    return FileNotFoundError(f"{cls_name}: {problem}\nExpected layout:\n{layouts}")


def scan_class_folders(root: str | os.PathLike, *, owner: str, layouts: str, verify: bool = True,
                       class_names: Sequence[str] | None = None) -> ImageFolderScan:
    """Scan ``root/<class>/**/*.<image ext>``.

    Args:
        owner: the DataModule's name, for error messages.
        layouts: the expected layout(s), shown in every error.
        verify: check every file (:func:`check_image_file`) and leave out unreadable ones with one warning.
        class_names: the classes to use, in index order (a val/test folder must use the train folder's
            classes); a folder not in this list is an error, a missing one is allowed.
    """
    root = Path(root)
    if not root.is_dir():
        problem = f"the data folder '{root}' does not exist." if not root.exists() else \
            f"'{root}' is not a folder."
        raise _layout_error(owner, problem, layouts)
    try:
        subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as err:
        raise _layout_error(owner, f"cannot read the data folder '{root}': {err}", layouts) from err
    if not subdirs:
        loose = [p for p in root.iterdir() if is_image(p)]
        hint = f" It holds {len(loose)} image files directly, but they need one folder per class." if loose else ""
        raise _layout_error(owner, f"no class folders in '{root}'.{hint}", layouts)
    if class_names is None:
        class_names = subdirs
    else:
        unknown = sorted(set(subdirs) - set(class_names))
        if unknown:
            raise ValueError(f"{owner}: '{root}' has class folders {unknown} that the training folder does not "
                             f"have (its classes: {list(class_names)}).")
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        if name not in subdirs:
            continue
        files = list_images(root / name)
        if verify:
            files, _ = drop_unreadable(files, f"'{root / name}'")
        if not files:
            raise _layout_error(owner, f"the class folder '{root / name}' has no readable images "
                                       f"({', '.join(IMG_EXTENSIONS)}).", layouts)
        paths.extend(files)
        labels.extend([index] * len(files))
    return ImageFolderScan(root, list(class_names), paths, labels)


def scan_image_folder(folder: str | os.PathLike, *, what: str, verify: bool = True) -> list[Path]:
    """The readable images under a folder without classes (subfolders included, their names ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: the folder '{folder}' does not exist or is not a folder. Expected a "
                                f"folder of images without classes: '{folder}/*.jpg'.")
    try:
        files = list_images(folder)
    except OSError as err:
        raise FileNotFoundError(f"{what}: cannot read the folder '{folder}': {err}") from err
    if verify:
        files, bad = drop_unreadable(files, f"'{folder}'")
        if not files and bad:
            raise ValueError(f"{what}: none of the {len(bad)} image files in '{folder}' can be read.")
    if not files:
        raise FileNotFoundError(f"{what}: no images ({', '.join(IMG_EXTENSIONS)}) in '{folder}'. Expected a "
                                f"folder of images without classes: '{folder}/*.jpg'.")
    return files


@dataclass
class Split:
    """One split: items (paths or array indices), their labels, and how to load an item."""

    items: list[Any]
    labels: list[int]
    load: Callable[[Any], Tensor] = decode_image_file

    def subset(self, indices: Sequence[int]) -> "Split":
        return Split([self.items[i] for i in indices], [self.labels[i] for i in indices], self.load)


def describe_items(split: Split) -> str:
    """sha256 of what a split's images are: the :func:`file_entries` of its files, or the bytes of the array that
    array-backed items index."""
    import hashlib

    digest = hashlib.sha256(f"{len(split.items)}\n".encode())
    array = getattr(split.load, "array", None)
    paths = [item for item in split.items if isinstance(item, (str, os.PathLike))]
    if len(paths) == len(split.items):
        for path, size, mtime in file_entries(paths):
            digest.update(f"{path}\t{size}\t{mtime}\n".encode())
    elif array is not None and not paths:
        import numpy as np

        digest.update("".join(f"{int(item)}\n" for item in split.items).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    else:
        raise NotImplementedError("Cannot describe the items of this split for a teacher cache: they must be all "
                                  "file paths, or all indices into an array-backed load.")
    return digest.hexdigest()


def split_by_class(split: Split, fractions: Sequence[float], seed: int) -> list[Split]:
    """``split`` cut into seeded, stratified parts (:func:`kd_lightning.data.splits.stratified_split`)."""
    return [split.subset(idx) for idx in stratified_split(split.labels, fractions, seed)]


# -- the shared DataModule base ----------------------------------------------------------------------------------
class ImageClassificationDataModule(ClassificationDataModule):
    """RGB image classification: transforms, augmentation switches and ``unlabelled_dir``.

    A subclass sets ``num_classes``/``class_names``, calls ``super().__init__``, implements ``find_splits()``
    (train/val/test :class:`Split`) and ``train_geometry()``/``eval_geometry()`` (the crop/resize/flip part of
    the pipelines), and may set ``default_mean``/``default_std``/``autoaugment_policy``.

    Args:
        image_size: side of the square images the model sees (``input_shape = (3, image_size, image_size)``).
        auto_augment: per-image policy after the geometry: ``"none"``, ``"autoaugment"`` (the dataset's
            policy), ``"randaugment"`` (2 ops, magnitude 9) or ``"trivialaugment"``.
        unlabelled_dir: a folder of extra training images without classes (subfolders allowed, names
            ignored), added to the training set as unlabelled rows (label -100) when ``use_unlabelled``.
        verify_images: check every file at construction and leave out unreadable ones with one warning.
        mean, std: normalization (default: the dataset's).
        decoded_cache: a folder for decoded-image caches (:mod:`kd_lightning.data.decoded`): the images of the
            train/val/test splits that are files are decoded once into ``<decoded_cache>/splits`` (all of their
            files together, so another split of the same files reuses it), those of ``unlabelled_dir`` into
            ``<decoded_cache>/unlabelled``, and served from there (the same tensors as decoding the files).
            Built in ``prepare_data`` (or ``setup`` when that was not called), checked against the files'
            sizes and mtimes on every run, and rebuilt when they changed. Use one folder per data set. Splits
            held as arrays (CIFAR through torchvision) are already decoded and are left as they are.
        **kwargs: see :class:`~kd_lightning.data.base.ClassificationDataModule`.
    """

    default_mean: tuple[float, float, float] = IMAGENET_MEAN
    default_std: tuple[float, float, float] = IMAGENET_STD
    autoaugment_policy: str = "IMAGENET"
    min_image_size = 16

    def __init__(self, image_size: int, auto_augment: AutoAugment = "none", unlabelled_dir: str | None = None,
                 verify_images: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, decoded_cache: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if decoded_cache is not None and (not str(decoded_cache) or Path(decoded_cache).is_file()):
            problem = "is empty" if not str(decoded_cache) else f"'{decoded_cache}' is a file"
            raise ValueError(f"{name}: decoded_cache {problem}; give a folder (created when missing) for the "
                             "decoded images, or null for none.")
        if image_size < self.min_image_size:
            raise ValueError(f"{name}: image_size={image_size} is too small; use at least {self.min_image_size} "
                             "(and what the model needs: 32 for the CIFAR networks, 64-224 for ImageNet ones).")
        if auto_augment not in ("none", "autoaugment", "randaugment", "trivialaugment"):
            raise ValueError(f"{name}: unknown auto_augment {auto_augment!r}; choose 'none', 'autoaugment', "
                             "'randaugment' or 'trivialaugment'.")
        for key, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != 3:
                raise ValueError(f"{name}: {key} needs 3 values (R, G, B), got {list(value)}.")
        if std is not None and min(std) <= 0:
            raise ValueError(f"{name}: std values must be > 0, got {list(std)}.")
        self.image_size = image_size
        self.auto_augment = auto_augment
        self.verify_images = verify_images
        self.mean = tuple(mean) if mean is not None else self.default_mean
        self.std = tuple(std) if std is not None else self.default_std
        self.input_shape = (3, image_size, image_size)
        self.unlabelled_dir = unlabelled_dir
        self.decoded_cache = decoded_cache
        self._unlabelled_paths: list[Path] = []
        self._unlabelled_load: Callable[[Any], Tensor] = decode_image_file  # the cache's, after setup
        self._decoded: dict[str, Any] | None = None  # the opened decoded-image caches (checked once per process)
        if unlabelled_dir is not None and self.use_unlabelled:
            self._unlabelled_paths = scan_image_folder(unlabelled_dir, what=f"{name} unlabelled_dir",
                                                       verify=verify_images)

    # -- to implement -----------------------------------------------------------------------------------------
    def find_splits(self) -> tuple[Split, Split, Split | None]:
        """``(train, val, test)``; ``test`` may be None."""
        raise NotImplementedError

    def train_geometry(self) -> list[Any]:
        raise NotImplementedError

    def eval_geometry(self) -> list[Any]:
        raise NotImplementedError

    # -- transforms ---------------------------------------------------------------------------------------------
    def _policy(self) -> list[Any]:
        from torchvision.transforms import v2

        if self.auto_augment == "autoaugment":
            return [v2.AutoAugment(v2.AutoAugmentPolicy[self.autoaugment_policy])]
        if self.auto_augment == "randaugment":
            return [v2.RandAugment()]
        if self.auto_augment == "trivialaugment":
            return [v2.TrivialAugmentWide()]
        return []

    def _normalize(self) -> list[Any]:
        from torchvision.transforms import v2

        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]

    def train_transform(self) -> Callable[[Tensor], Tensor]:
        """``uint8 (3, H, W)`` -> ``float (3, image_size, image_size)``, with random augmentation."""
        from torchvision.transforms import v2

        return v2.Compose([*self.train_geometry(), *self._policy(), *self._normalize()])

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        """``uint8 (3, H, W)`` -> ``float (3, image_size, image_size)``, deterministic."""
        from torchvision.transforms import v2

        return v2.Compose([*self.eval_geometry(), *self._normalize()])

    # -- decoded-image caches -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build the decoded-image caches (Lightning calls this once per node, before ``setup``)."""
        if self.decoded_cache is not None:
            self._decoded_caches()

    def _decoded_caches(self) -> dict[str, Any]:
        """``{"splits": ..., "unlabelled": ...}``: the opened (built if needed) caches, None where a source has no
        files to cache (splits that are arrays, no ``unlabelled_dir``). Checked against the files once per process:
        ``setup`` reuses what ``prepare_data`` opened in the same process."""

        if self._decoded is not None:
            return self._decoded

        splits = [s for s in self.find_splits() if s is not None and s.load is decode_image_file]
        files = sorted({os.fspath(p) for s in splits for p in s.items})
        unlabelled = sorted({os.fspath(p) for p in self._unlabelled_paths})
        folder = Path(self.decoded_cache)  # type: ignore[arg-type]
        self._decoded = {"splits": DecodedImages.open(folder / "splits", files) if files else None,
                         "unlabelled": DecodedImages.open(folder / "unlabelled", unlabelled) if unlabelled else None}
        return self._decoded

    # -- datasets -----------------------------------------------------------------------------------------------
    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset | None, list[int]]:
        train, val, test = self.find_splits()
        if self.decoded_cache is not None:
            caches = self._decoded_caches()
            unlabelled = caches["unlabelled"]
            self._unlabelled_load = unlabelled if unlabelled is not None else decode_image_file

            def cached(split: Split) -> Split:
                if split.load is not decode_image_file or caches["splits"] is None:
                    return split  # an array (already decoded) or another loader: as it is
                return Split(split.items, split.labels, caches["splits"])

            same = test is val
            train, val = cached(train), cached(val)
            test = val if same else None if test is None else cached(test)
        train_tf, eval_tf = self.train_transform(), self.eval_transform()
        val_set = ImageDataset(val.items, val.labels, eval_tf, val.load)
        test_set = None if test is None else val_set if test is val else \
            ImageDataset(test.items, test.labels, eval_tf, test.load)
        return ImageDataset(train.items, train.labels, train_tf, train.load), val_set, test_set, train.labels

    def teacher_cache_description(self) -> dict[str, Any]:
        """The training files (path, size and modification time of each, or the bytes of an array-backed split), the
        rows kept, and the training transform with the library versions that run it (a teacher cache's key)."""
        import torchvision

        train = self.find_splits()[0]
        unlabelled = Split(self._unlabelled_paths, [UNLABELLED] * len(self._unlabelled_paths))
        data = {"train": describe_items(train), "unlabelled": describe_items(unlabelled),
                **self.train_rows_description()}
        transform = {"pipeline": repr(self.train_transform()), "image_size": self.image_size,
                     "mean": list(self.mean), "std": list(self.std), "auto_augment": self.auto_augment,
                     "torch": torch.__version__, "torchvision": torchvision.__version__}
        return {"data": data, "transform": transform}

    def build_unlabelled(self) -> Dataset | None:
        if not self._unlabelled_paths:
            return None
        return ImageDataset(self._unlabelled_paths, [UNLABELLED] * len(self._unlabelled_paths),
                            self.train_transform(), self._unlabelled_load)


class FitSize(torch.nn.Module):
    """Resize (shorter side) and centre-crop to ``size`` x ``size``, only when the image is not that size
    already (e.g. extra unlabelled images in a 32 px CIFAR pipeline)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        image = F.resize(image, [self.size], antialias=True)
        return F.center_crop(image, [self.size, self.size])


def folder_layouts(root: str | os.PathLike, test_dir: bool = False) -> str:
    """The folder layouts :func:`folder_splits` reads, for error messages."""
    r = str(root).rstrip("/")
    return (f"  {r}/<class>/*.jpg                 one folder per class; train/val(/test) split here "
            "(seeded, stratified)\n"
            f"  {r}/train/<class>/*.jpg  and  {r}/{'test' if test_dir else 'val'}/<class>/*.jpg   "
            f"a ready-made split ({r}/{'val' if test_dir else 'test'}/ optional)")


def folder_splits(root: str | os.PathLike, *, owner: str, layouts: str, val_fraction: float,
                  test_fraction: float, seed: int, verify: bool = True,
                  ) -> tuple[list[str], Split, Split, Split | None]:
    """``(class_names, train, val, test)`` of an image-folder tree.

    * ``root/train/<class>/*`` present: ``root/val/`` and ``root/test/`` are used where present; a missing
      ``val/`` is carved from ``train/`` (``val_fraction``, seeded and stratified), or, with ``val_fraction=0``,
      is ``test/``; a missing ``test/`` is carved from ``train/`` when ``test_fraction > 0``, else absent.
    * otherwise ``root/<class>/*``, split into train/val/test by ``val_fraction``/``test_fraction``.

    Files are listed in sorted order, so the split is the same on every run and every DDP rank.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"{owner}: val_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
                         f"{val_fraction} and {test_fraction}.")
    root = Path(root)
    ready = (root / "train").is_dir()
    train_scan = scan_class_folders(root / "train" if ready else root, owner=owner, layouts=layouts, verify=verify)
    names = train_scan.class_names
    train = Split([*train_scan.paths], [*train_scan.labels])

    def scan_if_present(sub: str) -> Split | None:
        if not (ready and (root / sub).is_dir()):
            return None
        scan = scan_class_folders(root / sub, owner=owner, layouts=layouts, verify=verify, class_names=names)
        return Split(scan.paths, scan.labels)

    val, test = scan_if_present("val"), scan_if_present("test")
    carve_val = val is None and val_fraction > 0
    carve_test = test is None and test_fraction > 0
    if val is None and not carve_val and test is None:
        raise ValueError(f"{owner}: no validation data: set val_fraction > 0 or add a val/ (or test/) folder.\n"
                         f"Expected layout:\n{layouts}")
    fractions = [1.0 - (val_fraction if carve_val else 0) - (test_fraction if carve_test else 0),
                 val_fraction if carve_val else 0.0, test_fraction if carve_test else 0.0]
    if carve_val or carve_test:
        train, carved_val, carved_test = split_by_class(train, fractions, seed)
        val = carved_val if carve_val else val
        test = carved_test if carve_test else test
    if val is None:  # val_fraction=0 with a test/ folder: validate on it (the CIFAR papers' practice)
        val = test
    assert val is not None
    return names, train, val, test
