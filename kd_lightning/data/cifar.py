"""CIFAR-10 / CIFAR-100, from torchvision's pickled batches or from an image-folder copy.

Standard training augmentation (RandomCrop 32 with padding 4, horizontal flip, per-dataset mean/std); a
seeded, stratified validation split is carved from the training images (``val_fraction=0`` validates on the
test set instead, as most KD papers report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kd_lightning.data.base import fetch
from kd_lightning.data.images import (
    ArrayImages,
    FitSize,
    ImageClassificationDataModule,
    Split,
    folder_layouts,
    folder_splits,
    split_by_class,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
STATS = {  # per-dataset channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
assert len(CIFAR100_CLASSES) == 100 and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)


class CIFARDataModule(ImageClassificationDataModule):
    """CIFAR-10 or CIFAR-100 through torchvision, or from ``root/train/<class>/*`` + ``root/test/<class>/*``.

    Args:
        root: torchvision's folder (holding ``cifar-10-batches-py/`` or ``cifar-100-python/``), or an image
            folder copy ``root/train/<class>/*.png|jpg`` and ``root/test/<class>/*`` (``root/val/`` optional).
        dataset: ``"cifar10"`` or ``"cifar100"``: class count, class names (torchvision) and mean/std.
        source: ``"auto"`` (the image folder when ``root/train/`` exists, else torchvision), ``"folder"`` or
            ``"torchvision"``.
        image_size: 32, or another size to resize to (e.g. for ImageNet networks).
        val_fraction: share of each training class held out for validation (seeded, stratified); 0 validates
            on the test set.
        padding: RandomCrop padding (4 at 32 px).
        download: torchvision mode: fetch the data in ``prepare_data`` when missing (needs internet).
        **kwargs: see :class:`~kd_lightning.data.images.ImageClassificationDataModule` (``auto_augment``,
            ``unlabelled_dir``, ``verify_images``, ``mean``/``std``, ``decoded_cache``) and
            :class:`~kd_lightning.data.base.ClassificationDataModule` (loader settings, ``labelled_fraction``,
            ``use_unlabelled``, ``split_seed``, ``noise_std``, ``mixup_alpha``, ``cutmix_alpha``).
    """

    autoaugment_policy = "CIFAR10"

    def __init__(self, root: str, dataset: Literal["cifar10", "cifar100"] = "cifar10",
                 source: Literal["auto", "folder", "torchvision"] = "auto", image_size: int = 32,
                 val_fraction: float = 0.1, padding: int = 4, download: bool = False, **kwargs: Any) -> None:
        if dataset not in STATS:
            raise ValueError(f"CIFARDataModule: unknown dataset {dataset!r}; choose 'cifar10' or 'cifar100'.")
        if source not in ("auto", "folder", "torchvision"):
            raise ValueError(f"CIFARDataModule: unknown source {source!r}; choose 'auto', 'folder' or "
                             "'torchvision'.")
        self.default_mean, self.default_std = STATS[dataset]
        super().__init__(image_size=image_size, **kwargs)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"CIFARDataModule: val_fraction must be in [0, 1), got {val_fraction}.")
        if padding < 0:
            raise ValueError(f"CIFARDataModule: padding must be >= 0, got {padding}.")
        self.root, self.dataset, self.download = Path(root), dataset, download
        self.val_fraction, self.padding = val_fraction, padding
        expected = CIFAR10_CLASSES if dataset == "cifar10" else CIFAR100_CLASSES
        self.source = source if source != "auto" else ("folder" if (self.root / "train").is_dir() else "torchvision")
        self._splits: tuple[Split, Split, Split | None] | None = None
        if self.source == "folder":
            layouts = folder_layouts(self.root, test_dir=True)
            if not (self.root / "train").is_dir():
                problem = "does not exist" if not self.root.exists() else "has no train/ folder"
                raise FileNotFoundError(f"CIFARDataModule: the data folder '{self.root}' {problem}.\n"
                                        f"Expected layout:\n{layouts}")
            names, train, val, test = folder_splits(self.root, owner="CIFARDataModule", layouts=layouts,
                                                    val_fraction=val_fraction, test_fraction=0.0,
                                                    seed=self.split_seed, verify=self.verify_images)
            if len(names) != len(expected):
                raise ValueError(f"CIFARDataModule: dataset={dataset!r} has {len(expected)} classes but "
                                 f"'{self.root / 'train'}' has {len(names)} class folders: {names}.")
            self.class_names, self._splits = names, (train, val, test)
        else:
            folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
            if not download and not (self.root / folder).is_dir():
                raise FileNotFoundError(
                    f"CIFARDataModule: {dataset} not found under '{self.root}'. Expected one of:\n"
                    f"  {self.root}/{folder}/            torchvision's files (download: true fetches them)\n"
                    f"{folder_layouts(self.root, test_dir=True)}")
            self.class_names = list(expected)
        self.num_classes = len(self.class_names)

    def _torchvision_class(self) -> Any:
        from torchvision.datasets import CIFAR10, CIFAR100

        return CIFAR10 if self.dataset == "cifar10" else CIFAR100

    def prepare_data(self) -> None:
        if self.source == "torchvision" and self.download:
            def download() -> None:
                for train in (True, False):
                    self._torchvision_class()(str(self.root), train=train, download=True)

            fetch(download, self.root, f"CIFARDataModule ({self.dataset})")
        super().prepare_data()  # the decoded-image cache of an image-folder copy (torchvision's arrays need none)

    def find_splits(self) -> tuple[Split, Split, Split | None]:
        if self._splits is not None:
            return self._splits
        cls = self._torchvision_class()

        def load(train: bool) -> Split:
            data = cls(str(self.root), train=train, download=False)
            return Split(list(range(len(data.targets))), list(data.targets), ArrayImages(data.data))

        train, test = load(True), load(False)
        if self.val_fraction > 0:
            train, val = split_by_class(train, [1 - self.val_fraction, self.val_fraction], self.split_seed)
        else:
            val = test
        self._splits = (train, val, test)
        return self._splits

    def train_geometry(self) -> list[Any]:
        from torchvision.transforms import v2

        return [FitSize(self.image_size), v2.RandomCrop(self.image_size, padding=self.padding),
                v2.RandomHorizontalFlip()]

    def eval_geometry(self) -> list[Any]:
        return [FitSize(self.image_size)]
