"""Function matching offline (Beyer et al., CVPR 2022) through the teacher cache: with the DataModule's MixUp/CutMix
on, the cached views are per-sample mixed views replayed from seeds, so the cached logits are the teacher's logits on
the very mixed image the student trains on; the mixing settings are in the cache's fingerprint; the replay and the
soft labels are deterministic and follow kd_lightning.labels; a resumed run replays the same mixed views."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from kd_lightning import DistillationModule
from kd_lightning.callbacks import TeacherCache
from kd_lightning.data import FlowersDataModule
from kd_lightning.data.batch import as_batch
from kd_lightning.data.synthetic import write_class_folders
from kd_lightning.data.teacher_cache import (
    TeacherLogitsStore,
    ViewMixing,
    make_cached_view,
    make_view,
    view_of_epoch,
    view_seed,
)
from kd_lightning.labels import UNLABELLED, labelled_mask
from test_teacher_cache import info, messages  # noqa: F401 - the callback's messages (a fixture and its reader)

MIXES = {"mixup": dict(mixup_alpha=1.0), "cutmix": dict(cutmix_alpha=1.0),
         "both": dict(mixup_alpha=0.4, cutmix_alpha=1.0)}


def nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                            nn.Linear(128, 3))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                            nn.Linear(16, 3))
    return student, teacher


def module() -> DistillationModule:
    student, teacher = nets()
    return DistillationModule(student=student, teacher=teacher, num_classes=3, optim=dict(lr=0.05, lr_scheduler="none"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("flowers") / "photos", classes=3, per_class=8, size=24)


def datamodule(root: Path, **kwargs) -> FlowersDataModule:
    settings = dict(image_size=16, val_fraction=0.25, crop_scale=(0.3, 1.0), batch_size=6, labelled_fraction=0.5)
    settings.update(kwargs)
    return FlowersDataModule(str(root), **settings)


class Batches(Callback):
    """Every training batch as the step received it (after on_after_batch_transfer)."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(as_batch([t.clone() if torch.is_tensor(t) else t for t in batch]))


def fit(tmp_path: Path, dm: FlowersDataModule, cache: Path, views: int = 2, max_steps: int = 3,
        ckpt_path: str | None = None, **trainer_kwargs):
    pl.seed_everything(0)
    keep, model = Batches(), module()
    settings = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    settings.update(trainer_kwargs)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[TeacherCache(str(cache), views=views, dtype="float32"),
                                                               keep], **settings)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, keep, trainer


@pytest.mark.parametrize("mix", list(MIXES), ids=list(MIXES))
def test_cached_logits_are_the_teachers_on_the_very_mixed_images_the_student_gets(tmp_path, folder, mix):
    dm = datamodule(folder, **MIXES[mix])
    _, keep, _ = fit(tmp_path, dm, tmp_path / "cache", views=2, max_steps=3)
    teacher = nets()[1]
    mixing = dm.teacher_cache_mixing()
    kinds = set()
    for b in keep.batches:
        assert b.targets.shape == (len(b.images), 3) and b.targets.dtype == torch.float32  # soft labels
        with torch.no_grad():
            online = teacher(b.images)  # the teacher on the very images the student trained on
        torch.testing.assert_close(b.teacher_logits, online, rtol=1e-5, atol=1e-5)
        for row, image, target in zip(b.index.tolist(), b.images, b.targets):
            v = view_of_epoch(0, row, 0, 2)
            plain = make_view(dm.train_set, row, view_seed(0, row, v))[0]
            assert not torch.equal(image, plain)  # a mixed image, not the row's own view
            remade, label = make_cached_view(dm.train_set, row, v, 0, mixing)[:2]
            assert torch.equal(image, remade) and torch.equal(target, label)
            kinds.add(mixing.params(0, row, v, len(dm.train_set), 16, 16).kind)
    assert kinds == ({"mixup", "cutmix"} if mix == "both" else {mix})
    # the store holds exactly those logits at [row, view]; the batch-level mixing did not run on top
    store = TeacherLogitsStore(tmp_path / "cache")
    b = keep.batches[0]
    for row, logits in zip(b.index.tolist(), b.teacher_logits):
        torch.testing.assert_close(store.logits(row, view_of_epoch(0, row, 0, 2)), logits)


def test_a_cache_built_for_other_mixing_settings_is_rebuilt_with_the_reason(tmp_path, folder, info):
    cache = tmp_path / "cache"
    fit(tmp_path, datamodule(folder), cache, max_steps=1)  # no mixing: the fingerprint has no mixing part
    assert "building" in messages(info)
    assert "mixing" not in TeacherLogitsStore(cache).manifest["parts"]
    fit(tmp_path, datamodule(folder, mixup_alpha=1.0), cache, max_steps=1)  # mixing turned on
    assert "because it was built for a different mixing" in messages(info)
    assert TeacherLogitsStore(cache).manifest["parts"]["mixing"].startswith("mixup_alpha=1.0, cutmix_alpha=0.0")
    fit(tmp_path, datamodule(folder, mixup_alpha=1.0), cache, max_steps=1)
    assert "using the cached teacher logits" in messages(info)
    fit(tmp_path, datamodule(folder, mixup_alpha=0.5), cache, max_steps=1)  # alpha changed
    assert "because it was built for a different mixing" in messages(info)
    fit(tmp_path, datamodule(folder, mixup_alpha=0.5, cutmix_alpha=1.0), cache, max_steps=1)  # CutMix added
    assert "because it was built for a different mixing" in messages(info)
    fit(tmp_path, datamodule(folder), cache, max_steps=1)  # mixing turned off again
    assert "because it was built for a different mixing" in messages(info)
    assert "mixing" not in TeacherLogitsStore(cache).manifest["parts"]
    # noise on the device still changes the image after the teacher saw it: refused with a cache
    with pytest.raises(ValueError, match="noise_std=0.1"):
        fit(tmp_path, datamodule(folder, mixup_alpha=1.0, noise_std=0.1), cache, max_steps=1)


def test_the_replay_is_deterministic_and_the_soft_labels_follow_the_labels_rule(folder):
    dm = datamodule(folder, mixup_alpha=1.0, cutmix_alpha=1.0)
    dm.setup("fit")
    data, mixing = dm.train_set, dm.teacher_cache_mixing()
    rows = len(data)
    labels = [int(data[i][1]) for i in range(rows)]
    assert UNLABELLED in labels and any(y != UNLABELLED for y in labels)  # labelled_fraction 0.5
    seen = {"both labelled": 0, "half labelled": 0, "unlabelled": 0}
    partners = set()
    for i in range(rows):
        for v in range(3):
            torch.manual_seed(1000 * i + v)  # the caller's generators must not matter
            random.seed(v)
            image, target = make_cached_view(data, i, v, 7, mixing)[:2]
            again, target_again = make_cached_view(data, i, v, 7, mixing)[:2]
            assert torch.equal(image, again) and torch.equal(target, target_again)
            p = mixing.params(7, i, v, rows, image.shape[-2], image.shape[-1])
            assert p.partner != i and 0 <= p.partner < rows and 0.0 <= p.lam <= 1.0
            partners.add(p.partner)
            x_i = make_view(data, i, view_seed(7, i, v))[0]
            x_j = make_view(data, p.partner, view_seed(7, p.partner, v))[0]
            if p.kind == "mixup":  # an independent reference of the mixed image
                torch.testing.assert_close(image, p.lam * x_i + (1 - p.lam) * x_j, rtol=1e-6, atol=1e-6)
            else:
                x1, y1, x2, y2 = p.box
                inside = torch.zeros(image.shape[-2:], dtype=torch.bool)
                inside[y1:y2, x1:x2] = True
                assert torch.equal(image[:, inside], x_j[:, inside]) and torch.equal(image[:, ~inside], x_i[:, ~inside])
                assert p.lam == pytest.approx(1 - inside.float().mean().item())  # lambda = the row's share of pixels
            expected = torch.zeros(3)
            y_i, y_j = labels[i], labels[p.partner]
            if y_i != UNLABELLED:
                expected[y_i] += p.lam
            if y_j != UNLABELLED:
                expected[y_j] += 1 - p.lam
            torch.testing.assert_close(target, expected)
            total = float(target.sum())
            if y_i != UNLABELLED and y_j != UNLABELLED:
                seen["both labelled"] += 1
                assert total == pytest.approx(1.0)
            elif y_i != UNLABELLED or y_j != UNLABELLED:  # only the labelled share has a hard target
                seen["half labelled"] += 1
                assert total == pytest.approx(p.lam if y_i != UNLABELLED else 1 - p.lam)
                assert bool(labelled_mask(target[None])[0]) == (total > 0)
            else:  # all zero: unlabelled, distillation terms only
                seen["unlabelled"] += 1
                assert total == 0 and not bool(labelled_mask(target[None])[0])
    assert all(seen.values()), seen
    assert len(partners) > rows // 2  # partners spread over the rows
    # another cache seed or view gives another mix; the same seed in another process state the same one
    a = make_cached_view(data, 0, 0, 7, mixing)[0]
    assert not torch.equal(a, make_cached_view(data, 0, 0, 8, mixing)[0])
    assert not torch.equal(a, make_cached_view(data, 0, 1, 7, mixing)[0])
    with pytest.raises(ValueError, match="ViewMixing"):
        ViewMixing(3, 0.0, 0.0)


def test_a_resumed_run_replays_the_same_mixed_views(tmp_path, folder):
    """One epoch, a checkpoint, a second epoch from another process state, against two uninterrupted epochs: the
    same mixed images, soft labels and cached logits in the second epoch, and the same weights."""
    def run(epochs: int, ckpt: str | None = None):
        return fit(tmp_path, datamodule(folder, mixup_alpha=1.0, cutmix_alpha=1.0), tmp_path / "cache", views=2,
                   max_steps=-1, max_epochs=epochs, ckpt_path=ckpt)

    whole, whole_batches, _ = run(2)
    _, _, t = run(1)
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    torch.manual_seed(123)  # a resumed process starts from other random states
    resumed, resumed_batches, _ = run(2, str(tmp_path / "epoch1.ckpt"))
    second = whole_batches.batches[len(whole_batches.batches) - len(resumed_batches.batches):]
    assert resumed_batches.batches and len(second) == len(resumed_batches.batches) < len(whole_batches.batches)
    for a, b in zip(second, resumed_batches.batches):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.teacher_logits, b.teacher_logits)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
