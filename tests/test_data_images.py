"""Flowers and CIFAR DataModules on generated image folders (and on ../shared/data when it is there)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.data import CIFARDataModule, FlowersDataModule
from kd_lightning.labels import UNLABELLED
from kd_lightning.data.cifar import CIFAR10_CLASSES
from kd_lightning.data.files import decode_image_file
from kd_lightning.data.images import ImageDataset
from kd_lightning.data.synthetic import write_class_folders, write_images
from kd_lightning.module import DistillationModule

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FLOWERS5 = SHARED / "flowers5"
CIFAR_SMALL = SHARED / "cifar10-small"


@pytest.fixture
def flowers(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "flowers", ["daisy", "rose", "tulip"], per_class=[10, 20, 10], size=24)


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    root = tmp_path / "cifar"
    write_class_folders(root / "train", CIFAR10_CLASSES, per_class=10, size=32)
    write_class_folders(root / "test", CIFAR10_CLASSES, per_class=2, size=32, seed=100)
    return root


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def split_items(dm) -> tuple[list, list, list]:
    train, val, test = dm.find_splits()
    return train.items, val.items, (test.items if test is not None else [])


# -- splits ------------------------------------------------------------------------------------------------------
def test_flowers_split_is_seeded_stratified_and_identical(flowers):
    a = FlowersDataModule(str(flowers), image_size=16, val_fraction=0.2, test_fraction=0.1)
    torch.manual_seed(99)
    b = FlowersDataModule(str(flowers), image_size=16, val_fraction=0.2, test_fraction=0.1)
    assert split_items(a) == split_items(b)
    assert split_items(FlowersDataModule(str(flowers), image_size=16, split_seed=1)) != split_items(
        FlowersDataModule(str(flowers), image_size=16))
    assert a.class_names == ["daisy", "rose", "tulip"] and a.num_classes == 3 and a.input_shape == (3, 16, 16)
    train, val, test = a.find_splits()
    assert Counter(val.labels) == {0: 2, 1: 4, 2: 2} and Counter(test.labels) == {0: 1, 1: 2, 2: 1}
    assert len({*train.items, *val.items, *test.items}) == 40
    a.setup()
    x, y = a.train_set[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y in (0, 1, 2)
    batch = next(iter(a.val_dataloader()))
    assert batch[0].shape == (8, 3, 16, 16) and batch[1].dtype == torch.int64


def test_loader_settings_with_worker_processes(flowers):
    dm = FlowersDataModule(str(flowers), image_size=16, batch_size=5, num_workers=1, persistent_workers=True,
                           labelled_fraction=0.5)
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers and loader.drop_last
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 16, 16) and ((y == UNLABELLED) | (y >= 0)).all()
    assert not FlowersDataModule(str(flowers), persistent_workers=True).persistent_workers  # needs workers


def test_flowers_ready_made_train_val_folders(tmp_path):
    root = tmp_path / "split"
    write_class_folders(root / "train", ["a", "b"], per_class=6, size=20)
    write_class_folders(root / "val", ["a", "b"], per_class=2, size=20, seed=7)
    dm = FlowersDataModule(str(root), image_size=16)
    train, val, test = dm.find_splits()
    assert len(train.items) == 12 and len(val.items) == 4 and test is None
    assert all("/val/" in str(p) for p in val.items)
    write_images(root / "val" / "zebra", 1, 20)
    with pytest.raises(ValueError, match="zebra"):
        FlowersDataModule(str(root), image_size=16)


def test_cifar_folder_mode(cifar, tmp_path):
    dm = CIFARDataModule(str(cifar), batch_size=10)
    assert dm.source == "folder" and dm.num_classes == 10 and dm.class_names == CIFAR10_CLASSES
    assert dm.input_shape == (3, 32, 32) and dm.mean[0] == pytest.approx(0.4914)
    dm.setup()
    assert len(dm.train_set) == 90 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    assert Counter(labels_of(dm.val_set)) == {k: 1 for k in range(10)}
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 3, 32, 32)
    on_test = CIFARDataModule(str(cifar), val_fraction=0.0)
    on_test.setup()
    assert len(on_test.train_set) == 100 and on_test.val_set is on_test.test_set
    wrong = tmp_path / "c3"
    write_class_folders(wrong / "train", 3, per_class=2, size=32)
    with pytest.raises(ValueError, match="cifar10.*10 classes.*3 class folders"):
        CIFARDataModule(str(wrong))
    resized = CIFARDataModule(str(cifar), image_size=40)
    resized.setup()
    assert resized.train_set[0][0].shape == (3, 40, 40)


def test_torchvision_mode_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFARDataModule(str(tmp_path), dataset="cifar100")
    with pytest.raises(FileNotFoundError, match="flowers-102"):
        FlowersDataModule(str(tmp_path), dataset="flowers102")


# -- transfer sets -------------------------------------------------------------------------------------------------
def test_labelled_fraction_per_class_and_full_val(flowers):
    dm = FlowersDataModule(str(flowers), image_size=16, labelled_fraction=0.25)
    dm.setup()
    labels = labels_of(dm.train_set)
    assert len(labels) == 32
    assert Counter(y for y in labels if y != UNLABELLED) == {0: 2, 1: 4, 2: 2}
    assert UNLABELLED not in labels_of(dm.val_set)
    scratch = FlowersDataModule(str(flowers), image_size=16, labelled_fraction=0.25, use_unlabelled=False)
    scratch.setup()
    assert sorted(labels_of(scratch.train_set)) == sorted(y for y in labels if y != UNLABELLED)


def test_unlabelled_dir_rows_are_unlabelled(flowers, cifar, tmp_path):
    extra = tmp_path / "extra"
    write_images(extra, 5, size=48)
    write_images(extra / "nested", 2, size=48, ext="png")
    dm = FlowersDataModule(str(flowers), image_size=16, unlabelled_dir=str(extra))
    dm.setup()
    labels = labels_of(dm.train_set)
    assert len(labels) == 32 + 7 and labels.count(UNLABELLED) == 7
    assert dm.train_set[len(labels) - 1][0].shape == (3, 16, 16)
    c = CIFARDataModule(str(cifar), unlabelled_dir=str(extra))
    c.setup()
    assert c.train_set[len(c.train_set) - 1] [0].shape == (3, 32, 32)  # 48 px images fitted to 32
    scratch = FlowersDataModule(str(flowers), image_size=16, unlabelled_dir=str(extra), use_unlabelled=False)
    scratch.setup()
    assert UNLABELLED not in labels_of(scratch.train_set)


# -- bad input: clear errors at construction ----------------------------------------------------------------------
def test_missing_or_empty_folder_shows_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist[\s\S]*Expected layout[\s\S]*<class>"):
        FlowersDataModule(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no class folders[\s\S]*Expected layout"):
        FlowersDataModule(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"Expected layout[\s\S]*train/<class>"):
        CIFARDataModule(str(tmp_path / "empty"), source="folder")
    write_images(tmp_path / "flat", 3)
    with pytest.raises(FileNotFoundError, match="3 image files directly"):
        FlowersDataModule(str(tmp_path / "flat"))


def test_class_folder_without_images(flowers):
    (flowers / "lily").mkdir()
    (flowers / "lily" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"class folder .*lily.* has no readable images"):
        FlowersDataModule(str(flowers))


def test_bad_unlabelled_dir(flowers, tmp_path):
    with pytest.raises(FileNotFoundError, match="unlabelled_dir.*does not exist"):
        FlowersDataModule(str(flowers), unlabelled_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unlabelled_dir: no images"):
        FlowersDataModule(str(flowers), unlabelled_dir=str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="a.jpg"), pytest.raises(ValueError, match="none of the 1 image files"):
        FlowersDataModule(str(flowers), unlabelled_dir=str(tmp_path / "junk"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(labelled_fraction=0.0), r"labelled_fraction must be in \(0, 1\]"),
    (dict(labelled_fraction=1.5), r"labelled_fraction must be in \(0, 1\]"),
    (dict(image_size=8), "image_size=8 is too small"),
    (dict(val_fraction=0.0), "no validation data"),
    (dict(val_fraction=0.7, test_fraction=0.4), "sum below 1"),
    (dict(auto_augment="augmix"), "unknown auto_augment"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
])
def test_bad_settings(flowers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowersDataModule(str(flowers), **kwargs)


def test_truncated_jpeg_is_skipped_with_one_warning(flowers):
    victim = sorted((flowers / "rose").iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    (flowers / "rose" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = FlowersDataModule(str(flowers), image_size=16, val_fraction=0.2)
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(messages) == 1 and victim.name in messages[0] and "empty.jpg" in messages[0]
    train, val, _ = dm.find_splits()
    assert victim not in train.items + val.items and len(train.items) + len(val.items) == 39


def test_file_damaged_after_the_scan_becomes_an_unlabelled_row(tmp_path):
    paths = write_images(tmp_path / "imgs", 3, size=20)
    ds = ImageDataset(paths, [0, 1, 2], transform=None)
    paths[1].write_bytes(paths[1].read_bytes()[:100])
    with pytest.warns(UserWarning, match=paths[1].name):
        x, y = ds[1]
    assert y == UNLABELLED and torch.equal(x, decode_image_file(paths[2]))
    assert ds[0][1] == 0


def test_image_size_too_small_for_the_model_fails_before_training(flowers):
    dm = FlowersDataModule(str(flowers), image_size=16)
    wide_kernel = nn.Sequential(nn.Conv2d(3, 4, 20), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    module = DistillationModule(student=wide_kernel, teacher="flowers_cnn", num_classes=3)
    with pytest.raises(ValueError, match="image size too small"):
        module.check_input_shape(dm.input_shape)
    with pytest.raises(ValueError, match="gives 5 class scores but the data has 3"):
        DistillationModule(student="flowers_cnn", teacher=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)),
                           num_classes=3).check_input_shape(dm.input_shape)


# -- end to end ----------------------------------------------------------------------------------------------------
def test_distillation_fits_on_a_tiny_flowers_folder(flowers, tmp_path):
    import lightning as L

    write_images(tmp_path / "extra", 6, size=24)
    dm = FlowersDataModule(str(flowers), image_size=32, batch_size=8, labelled_fraction=0.5,
                           unlabelled_dir=str(tmp_path / "extra"), mixup_alpha=0.2, cutmix_alpha=1.0,
                           noise_std=0.1, auto_augment="randaugment")
    L.seed_everything(0)
    module = DistillationModule(student="flowers_cnn", teacher="flowers_cnn", num_classes=dm.num_classes,
                                temperature=5.0, alpha=0.45)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= float(metrics["val/acc"]) <= 1


# -- the shared real images ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not FLOWERS5.is_dir(), reason="../shared/data/flowers5 not present")
def test_real_flowers5():
    dm = FlowersDataModule(str(FLOWERS5), image_size=64, val_fraction=0.2, labelled_fraction=0.1, batch_size=16)
    assert dm.class_names == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    train, val, _ = dm.find_splits()
    total = Counter(train.labels) + Counter(val.labels)
    assert [total[k] for k in range(5)] == [764, 1052, 784, 733, 984]
    assert [Counter(val.labels)[k] for k in range(5)] == [round(0.2 * n) for n in (764, 1052, 784, 733, 984)]
    assert split_items(dm) == split_items(FlowersDataModule(str(FLOWERS5), image_size=64, val_fraction=0.2))
    dm.setup()
    labelled = [y for y in (dm.train_set.dataset.labels[i] for i in dm.train_set.labelled)]
    assert [Counter(labelled)[k] for k in range(5)] == [round(0.1 * c) for c in
                                                       (Counter(train.labels)[k] for k in range(5))]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 64, 64) and torch.isfinite(x).all()


@pytest.mark.skipif(not CIFAR_SMALL.is_dir(), reason="../shared/data/cifar10-small not present")
def test_real_cifar10_small():
    dm = CIFARDataModule(str(CIFAR_SMALL), val_fraction=0.1, batch_size=32)
    assert dm.source == "folder" and dm.class_names == CIFAR10_CLASSES
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4500, 500, 1000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and abs(float(x.mean())) < 0.5


# -- torchvision sources (their files need a download: faked here) -------------------------------------------------
def test_cifar_torchvision_mode_split(tmp_path, fake_torchvision_cifar10):
    fake_torchvision_cifar10(tmp_path, 50, 20)
    dm = CIFARDataModule(str(tmp_path), val_fraction=0.2, labelled_fraction=0.5)
    assert dm.source == "torchvision" and dm.class_names == CIFAR10_CLASSES
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 20)
    assert Counter(labels_of(dm.val_set)) == {k: 1 for k in range(10)}
    assert labels_of(dm.train_set).count(UNLABELLED) == 20
    assert dm.train_set[0][0].shape == (3, 32, 32)


def test_flowers102_mode_uses_the_official_split(tmp_path):
    import numpy as np
    from scipy.io import savemat

    from kd_lightning.data.flowers import flowers102_split

    base = tmp_path / "flowers-102"
    for i, path in enumerate(write_images(base / "jpg", 6, size=40), start=1):  # the dataset's own file names
        path.rename(base / "jpg" / f"image_{i:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([[5, 7, 5, 102, 1, 7]])})  # 1-based class per image id
    savemat(base / "setid.mat", {"trnid": np.array([[2, 1]]), "valid": np.array([[3, 4]]), "tstid": np.array([[6, 5]])})
    train = flowers102_split(base, "train")
    assert [Path(p).name for p in train.items] == ["image_00002.jpg", "image_00001.jpg"] and train.labels == [6, 4]
    assert flowers102_split(base, "val").labels == [4, 101] and flowers102_split(base, "test").labels == [6, 0]
    dm = FlowersDataModule(str(tmp_path), dataset="flowers102", image_size=32)
    assert dm.num_classes == 102
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (2, 2, 2)
    assert dm.val_set[0][0].shape == (3, 32, 32)
