"""Splits, labelled fractions and batch-level augmentation (no image files needed)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from kd_lightning.data import BatchMix, DigitsDataModule
from kd_lightning.labels import UNLABELLED, one_hot_targets
from kd_lightning.data.splits import labelled_subset, stratified_split
from kd_lightning.losses import distillation_loss

LABELS = [k for k in range(4) for _ in range(10 * (k + 1))]  # 10, 20, 30, 40 per class


def test_stratified_split_is_seeded_stratified_and_complete():
    a = stratified_split(LABELS, [0.6, 0.2, 0.2], seed=3)
    torch.manual_seed(123)  # the global RNG must not matter (DDP ranks seed differently)
    b = stratified_split(LABELS, [0.6, 0.2, 0.2], seed=3)
    assert a == b
    assert stratified_split(LABELS, [0.6, 0.2, 0.2], seed=4) != a
    assert sorted(i for part in a for i in part) == list(range(len(LABELS)))
    for part, frac in zip(a, [0.6, 0.2, 0.2]):
        counts = Counter(LABELS[i] for i in part)
        assert [counts[k] for k in range(4)] == [round(10 * (k + 1) * frac) for k in range(4)]


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(LABELS, [0.5, 0.2])


def test_labelled_subset_counts_per_class():
    keep = labelled_subset(LABELS, 0.1, seed=0)
    assert keep == labelled_subset(LABELS, 0.1, seed=0)
    assert Counter(LABELS[i] for i in keep) == {0: 1, 1: 2, 2: 3, 3: 4}
    assert len(labelled_subset([0, 0, 1], 0.01)) == 2  # at least one per class
    assert labelled_subset(LABELS, 1.0) == list(range(len(LABELS)))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"labelled_fraction must be in \(0, 1\]"):
            labelled_subset(LABELS, bad)


@pytest.mark.parametrize("fraction", [0.0, 1.01, -1.0])
def test_digits_rejects_bad_labelled_fraction(fraction):
    with pytest.raises(ValueError, match=r"labelled_fraction must be in \(0, 1\]"):
        DigitsDataModule(labelled_fraction=fraction)


def test_digits_labelled_fraction_keeps_val_labels():
    dm = DigitsDataModule(labelled_fraction=0.1, split_seed=1)
    dm.setup()
    train_labels = [dm.train_set[i][1] for i in range(len(dm.train_set))]
    labelled = Counter(y for y in train_labels if y != UNLABELLED)
    assert sum(labelled.values()) == pytest.approx(0.1 * len(train_labels), abs=10)
    assert set(labelled) == set(range(10))
    assert all(int(dm.val_set[i][1]) != UNLABELLED for i in range(len(dm.val_set)))
    scratch = DigitsDataModule(labelled_fraction=0.1, split_seed=1, use_unlabelled=False)
    scratch.setup()
    assert len(scratch.train_set) == sum(labelled.values())
    assert all(int(scratch.train_set[i][1]) != UNLABELLED for i in range(len(scratch.train_set)))


def test_soft_targets_zero_rows_for_unlabelled():
    y = torch.tensor([2, UNLABELLED, 0])
    t = one_hot_targets(y, 3)
    assert t.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize("mix", [dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0), dict(mixup_alpha=1.0, cutmix_alpha=1.0)])
def test_batch_mix_with_unlabelled_rows_feeds_the_loss(mix):
    torch.manual_seed(0)
    k, b = 5, 16
    x = torch.randn(b, 3, 16, 16)
    y = torch.randint(0, k, (b,))
    y[::2] = UNLABELLED
    xm, ym = BatchMix(k, **mix)(x, y)
    assert xm.shape == x.shape and ym.shape == (b, k) and ym.dtype == torch.float32
    sums = ym.sum(-1)
    assert torch.all((sums >= -1e-6) & (sums <= 1 + 1e-6))
    losses = distillation_loss(torch.randn(b, k, requires_grad=True), torch.randn(b, k), ym, 5.0, 0.45)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()

    all_labelled = BatchMix(k, **mix)(x, torch.randint(0, k, (b,)))[1]
    assert torch.allclose(all_labelled.sum(-1), torch.ones(b))
    none_labelled = BatchMix(k, **mix)(x, torch.full((b,), UNLABELLED))[1]
    assert torch.all(none_labelled == 0)
    assert torch.isfinite(distillation_loss(torch.randn(b, k), torch.randn(b, k), none_labelled)["loss"])


def test_batch_augmentation_runs_on_training_batches_only():
    dm = DigitsDataModule(mixup_alpha=0.2, noise_std=0.1)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    dm.trainer = SimpleNamespace(training=False)
    out = dm.on_after_batch_transfer([x, y], 0)
    assert out[0] is x and out[1] is y
    dm.trainer = SimpleNamespace(training=True, current_epoch=0, is_last_batch=False, global_rank=0)
    xa, ya = dm.on_after_batch_transfer([x, y], 0)
    assert ya.shape == (8, 10) and not torch.equal(xa, x)
    assert dm.train_progress.batches == 1
    xb, _ = dm.on_after_batch_transfer([x, y], 0)  # the next batch position: other noise, other pairs
    assert not torch.equal(xa, xb)
    replay = DigitsDataModule(mixup_alpha=0.2, noise_std=0.1)  # a resumed run: the same position, the same mix
    replay.trainer = dm.trainer
    xr, yr = replay.on_after_batch_transfer([x, y], 0)
    assert torch.equal(xr, xa) and torch.equal(yr, ya)
    dm.trainer = None
    assert DigitsDataModule().on_after_batch_transfer([x, y], 0)[1] is y


def test_bad_augmentation_settings():
    with pytest.raises(ValueError, match="noise_std"):
        DigitsDataModule(noise_std=-0.1)
    with pytest.raises(ValueError, match="mixup_alpha"):
        DigitsDataModule(mixup_alpha=-1)


def test_training_order_and_augmentation_are_functions_of_seed_epoch_and_sample(monkeypatch):
    """Whatever the worker count, and after skipping into an epoch as a resumed run does, the training loader gives
    the same samples with the same random augmentation; another epoch gives another order and other draws."""
    from torch.utils.data import Dataset

    from kd_lightning.data.resumable import EpochShuffleSampler, LoaderProgress, ResumableLoader, SeededSamples

    class Noisy(Dataset):  # a random "augmentation": noise drawn from torch's global generator
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.full((2,), float(i)) + torch.rand(2), i

    def loader(workers: int) -> ResumableLoader:
        sampler = EpochShuffleSampler(range(20), num_replicas=1, rank=0, seed=7)
        return ResumableLoader(SeededSamples(Noisy(), seed=7), sampler=sampler, batch_size=4, num_workers=workers,
                               progress=LoaderProgress())

    def epoch(dl: ResumableLoader, e: int) -> list[torch.Tensor]:
        dl.sampler.set_epoch(e)
        return [x for x, _ in dl]

    serial, parallel = epoch(loader(0), 1), epoch(loader(2), 1)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == 5
    assert not torch.equal(torch.cat(serial), torch.cat(epoch(loader(0), 2)))
    resumed = loader(0)
    resumed.load_state_dict({"epoch": 1, "batches": 2, "epoch_done": False})  # a checkpoint after 2 batches
    rest = [x for x, _ in resumed]
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, serial[2:]))
    after_epoch = loader(0)
    after_epoch.load_state_dict({"epoch": 1, "batches": 5, "epoch_done": True})
    assert after_epoch.sampler.epoch == 2 and after_epoch.progress.batches == 0
