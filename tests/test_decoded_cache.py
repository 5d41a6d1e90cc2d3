"""The decoded-image cache (kd_lightning.data.decoded) and the image DataModules' decoded_cache option."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from kd_lightning.data import CIFARDataModule, FlowersDataModule, ImageDataset
from kd_lightning.data import decoded
from kd_lightning.data.decoded import DATA, INDEX, MANIFEST, DecodedImages
from kd_lightning.data.files import decode_image_file
from kd_lightning.data.images import ArrayImages
from kd_lightning.data.synthetic import write_class_folders, write_images


def write_image(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> Path:
    from PIL import Image

    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """JPEGs of different sizes and shapes, a grey JPEG and a PNG."""
    folder = tmp_path / "images"
    sizes = [(16, 16), (40, 23), (23, 40), (97, 61), (1, 5)]
    paths = [write_image(folder / f"img_{i}.jpg", w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    paths.append(write_image(folder / "grey.jpg", 30, 20, seed=10, mode="L"))
    paths.append(write_image(folder / "alpha.png", 21, 13, seed=11, mode="RGBA"))
    return paths


@pytest.fixture
def messages(monkeypatch) -> list[str]:
    """The cache's info messages (it reports through rank_zero_info)."""
    seen: list[str] = []
    monkeypatch.setattr(decoded, "rank_zero_info", lambda msg, *a, **k: seen.append(str(msg)))
    return seen


def assert_matches_files(cache: DecodedImages, paths: list[Path]) -> None:
    for p in paths:
        image = cache(p)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert torch.equal(image, decode_image_file(p)), p


# -- the cache itself ------------------------------------------------------------------------------------------
def test_cached_images_equal_decoded_files(tmp_path, images, messages):
    cache = DecodedImages.open(tmp_path / "cache", images)
    assert cache.rebuilt == "no cache yet" and len(messages) == 1 and "7 images" in messages[0]
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {DATA, INDEX, MANIFEST}  # no temporary files left
    assert_matches_files(cache, images)
    assert [tuple(cache(p).shape) for p in images[:4]] == [(3, 16, 16), (3, 23, 40), (3, 40, 23), (3, 61, 97)]
    # each read owns its memory: writing into it changes neither the cache nor the next read
    first = cache(images[0])
    first.zero_()
    assert torch.equal(cache(images[0]), decode_image_file(images[0]))
    # a second open reuses the files, silently
    again = DecodedImages.open(tmp_path / "cache", images)
    assert again.rebuilt is None and len(messages) == 1
    assert_matches_files(again, images)
    with pytest.raises(KeyError, match="not in the decoded-image cache"):
        again(tmp_path / "other.jpg")


def test_modified_file_is_noticed_and_rebuilt(tmp_path, images, messages):
    DecodedImages.open(tmp_path / "cache", images)
    changed = write_image(images[1], 33, 12, seed=99)  # other content and size, same path
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # whatever the clock's resolution
    cache = DecodedImages.open(tmp_path / "cache", images)
    assert cache.rebuilt is not None and "1 file(s) changed" in cache.rebuilt and str(changed) in cache.rebuilt
    assert len(messages) == 2 and "1 file(s) changed" in messages[1]
    assert tuple(cache(changed).shape) == (3, 12, 33)
    assert_matches_files(cache, images)


def test_other_file_list_is_rebuilt(tmp_path, images, messages):
    DecodedImages.open(tmp_path / "cache", images)
    cache = DecodedImages.open(tmp_path / "cache", images[:-1])
    assert cache.rebuilt is not None and "1 file(s) gone" in cache.rebuilt
    assert_matches_files(cache, images[:-1])


def test_truncated_data_file_is_rebuilt(tmp_path, images, messages):
    DecodedImages.open(tmp_path / "cache", images)
    data = tmp_path / "cache" / DATA
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 100)
    cache = DecodedImages.open(tmp_path / "cache", images)
    assert cache.rebuilt is not None and "partial or damaged" in cache.rebuilt and len(messages) == 2
    assert os.path.getsize(data) == sum(decode_image_file(p).numel() for p in images)
    assert_matches_files(cache, images)


def test_missing_manifest_is_rebuilt(tmp_path, images, messages):
    DecodedImages.open(tmp_path / "cache", images)
    (tmp_path / "cache" / MANIFEST).unlink()
    with open(tmp_path / "cache" / DATA, "r+b") as f:  # data a crash could have left: must not be read
        f.write(b"\0" * 64)
    cache = DecodedImages.open(tmp_path / "cache", images)
    assert cache.rebuilt is not None and "no manifest" in cache.rebuilt and len(messages) == 2
    assert_matches_files(cache, images)


def test_undecodable_file_raises_on_read_as_decoding_would(tmp_path, images, messages):
    bad = tmp_path / "images" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    cache = DecodedImages.open(tmp_path / "cache", [*images, bad])
    with pytest.raises(ValueError, match="could not be decoded"):
        cache(bad)
    dataset = ImageDataset([bad, images[0]], [1, 2], None, cache)
    with pytest.warns(UserWarning, match="Cannot decode image"):
        image, label = dataset[0]  # replaced by the next image, as an unlabelled row (as for the files)
    assert torch.equal(image, decode_image_file(images[0])) and label == -100


def test_loader_pickles_into_spawned_workers(tmp_path, images, messages):
    cache = DecodedImages.open(tmp_path / "cache", images)
    cache(images[0])  # maps the file in this process: the map must not travel
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._data is None and torch.equal(clone(images[2]), decode_image_file(images[2]))
    dataset = ImageDataset(images, list(range(len(images))), None, cache)
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = list(loader)
    assert [y for _, y in got] == list(range(len(images)))
    for (image, _), path in zip(got, images):
        assert torch.equal(image, decode_image_file(path))


# -- the DataModule option --------------------------------------------------------------------------------------
@pytest.fixture
def flowers(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "flowers"
    for k, (name, size) in enumerate([("daisy", 40), ("rose", 33), ("tulip", 48)]):
        write_images(root / name, 12, size=size, seed=k)
    write_image(root / "rose" / "wide.jpg", 70, 30, seed=5)
    extra = tmp_path / "extra"
    write_images(extra, 6, size=36, seed=50)
    return root, extra


def make_flowers(root: Path, extra: Path, **kwargs) -> FlowersDataModule:
    return FlowersDataModule(str(root), image_size=24, val_fraction=0.2, test_fraction=0.2, batch_size=8,
                             unlabelled_dir=str(extra), labelled_fraction=0.5, **kwargs)


def loads_of(dm: FlowersDataModule) -> list:
    train = dm.train_set
    assert isinstance(train, ConcatDataset)
    labelled, unlabelled = train.datasets
    return [labelled.dataset.load, unlabelled.load, dm.val_set.load, dm.test_set.load]


def test_datamodule_with_cache_gives_the_same_batches(tmp_path, flowers, messages):
    root, extra = flowers
    plain = make_flowers(root, extra)
    plain.setup("fit")
    cached = make_flowers(root, extra, decoded_cache=str(tmp_path / "dc"))
    cached.prepare_data()
    assert len(messages) == 2  # splits and unlabelled, built in prepare_data
    cached.setup("fit")
    assert len(messages) == 2  # setup reuses them
    loads = loads_of(cached)
    assert all(isinstance(load, DecodedImages) for load in loads)
    assert loads[0] is loads[2] is loads[3] and loads[1].folder == tmp_path / "dc" / "unlabelled"
    assert len(loads[0]) == 37 and len(loads[1]) == 6  # every split's files in one cache
    for a, b in zip(plain.train_dataloader(), cached.train_dataloader()):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for loader in ("val_dataloader", "test_dataloader"):
        for a, b in zip(getattr(plain, loader)(), getattr(cached, loader)()):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_setup_builds_without_prepare_data(tmp_path, flowers, messages):
    root, extra = flowers
    dm = make_flowers(root, extra, decoded_cache=str(tmp_path / "dc"))
    dm.setup("fit")
    assert len(messages) == 2 and (tmp_path / "dc" / "splits" / MANIFEST).is_file()
    assert all(isinstance(load, DecodedImages) for load in loads_of(dm))


def test_decoded_cache_must_be_a_folder(tmp_path, flowers):
    root, extra = flowers
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="decoded_cache '.*a_file' is a file; give a folder"):
        make_flowers(root, extra, decoded_cache=str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match="decoded_cache is empty"):
        make_flowers(root, extra, decoded_cache="")


def test_array_splits_are_left_as_they_are(tmp_path, fake_torchvision_cifar10, messages):
    fake_torchvision_cifar10(tmp_path, 30, 10)
    dm = CIFARDataModule(str(tmp_path), val_fraction=0.0, decoded_cache=str(tmp_path / "dc"))
    dm.prepare_data()
    dm.setup("fit")
    assert isinstance(dm.train_set.load, ArrayImages) and isinstance(dm.val_set.load, ArrayImages)
    assert messages == [] and not (tmp_path / "dc").exists()


def test_cifar_image_folder_is_cached(tmp_path, messages):
    write_class_folders(tmp_path / "cifar" / "train", 10, per_class=2, size=32)
    write_class_folders(tmp_path / "cifar" / "test", 10, per_class=1, size=32, seed=100)
    dm = CIFARDataModule(str(tmp_path / "cifar"), val_fraction=0.0, decoded_cache=str(tmp_path / "dc"))
    dm.setup("fit")
    assert isinstance(dm.train_set.load, DecodedImages) and dm.test_set is dm.val_set
    assert len(dm.train_set.load) == 30 and len(messages) == 1
