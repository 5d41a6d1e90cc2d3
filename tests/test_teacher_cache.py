"""Offline distillation from the fingerprinted teacher cache (kd_lightning.callbacks.TeacherCache): the loss on cached
logits equals the online loss on the same views, stale or partial caches are rebuilt with a message, settings under
which cached logits would describe another image are refused, and a two-process DDP run from the cache equals a
one-process run."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from kd_lightning import DistillationModule
from kd_lightning.callbacks import TeacherCache
from kd_lightning.data import FlowersDataModule
from kd_lightning.data.batch import as_batch
from kd_lightning.data.synthetic import write_class_folders
from kd_lightning.data.teacher_cache import TeacherLogitsStore, make_view, view_of_epoch, view_seed
from kd_lightning.distillers import CrossEntropy, Hint, HintonKD


def nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                            nn.Linear(128, 3))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                            nn.Linear(16, 3))
    return student, teacher


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("flowers") / "photos", classes=3, per_class=8, size=24)


def datamodule(root: Path, **kwargs) -> FlowersDataModule:
    settings = dict(image_size=16, val_fraction=0.25, crop_scale=(0.3, 1.0), batch_size=6)
    settings.update(kwargs)
    return FlowersDataModule(str(root), **settings)


def module(teacher_seed: int = 0, **kwargs) -> DistillationModule:
    student, teacher = nets()
    if teacher_seed:
        teacher = nets(teacher_seed)[1]
    return DistillationModule(student=student, teacher=teacher, num_classes=3,
                              optim=dict(lr=0.05, lr_scheduler="none"), **kwargs)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    settings.update(kwargs)
    return pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, **settings)


class Batches(Callback):
    """Keeps every training batch and the loss the step computed on it."""

    def __init__(self) -> None:
        self.batches, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append([t.clone() if torch.is_tensor(t) else t for t in batch])
        self.losses.append(outputs["loss"].detach().clone())


def fit_cached(tmp_path: Path, root: Path, cache: Path, *, views: int = 2, dtype: str = "float32",
               model: DistillationModule | None = None, dm: FlowersDataModule | None = None, max_steps: int = 3,
               **cache_kwargs):
    pl.seed_everything(0)
    model = model or module()
    dm = dm or datamodule(root)
    keep = Batches()
    trainer(tmp_path, [TeacherCache(str(cache), views=views, dtype=dtype, **cache_kwargs), keep],
            max_steps=max_steps).fit(model, dm)
    return model, dm, keep


def test_cached_loss_equals_online_loss_on_the_same_views(tmp_path, folder):
    model, dm, keep = fit_cached(tmp_path, folder, tmp_path / "cache", views=3)
    assert len(keep.batches) == 3
    fresh = module()  # the same initial student: step 0 of the cached run is comparable
    teacher = fresh.teacher
    for step, (batch, loss) in enumerate(zip(keep.batches, keep.losses)):
        b = as_batch(batch)
        assert b.teacher_logits is not None and b.index is not None
        with torch.no_grad():
            online = teacher(b.images)  # the teacher on the very images the student trained on
        torch.testing.assert_close(b.teacher_logits, online, rtol=1e-5, atol=1e-5)
        if step == 0:
            cached_loss = fresh.losses(fresh.step(b))["loss"]
            online_loss = fresh.losses(fresh.step(b._replace(teacher_logits=None)))["loss"]
            torch.testing.assert_close(cached_loss, online_loss, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(loss, online_loss.detach(), rtol=1e-6, atol=1e-6)
    # each image is the row's view of the epoch, re-made from its seed: not a clean image, not another crop
    store = TeacherLogitsStore(tmp_path / "cache")
    b = as_batch(keep.batches[0])
    for row, image, logits in zip(b.index.tolist(), b.images, b.teacher_logits):
        v = view_of_epoch(0, row, 0, 3)
        remade = make_view(dm.train_set, row, view_seed(0, row, v))[0]
        assert torch.equal(image, remade)
        torch.testing.assert_close(store.logits(row, v), logits)
        others = [u for u in range(3) if u != v]
        assert not any(torch.equal(image, make_view(dm.train_set, row, view_seed(0, row, u))[0]) for u in others)


def test_float16_storage_is_close_and_top_k_keeps_the_rest_of_the_mass(tmp_path, folder):
    _, _, full = fit_cached(tmp_path, folder, tmp_path / "f32", views=1, max_steps=1)
    _, _, half = fit_cached(tmp_path, folder, tmp_path / "f16", views=1, dtype="float16", max_steps=1)
    a, b = as_batch(full.batches[0]).teacher_logits, as_batch(half.batches[0]).teacher_logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    _, _, top = fit_cached(tmp_path, folder, tmp_path / "top1", views=1, top_k=1, max_steps=1)
    t = as_batch(top.batches[0]).teacher_logits
    assert torch.equal(t.argmax(-1), a.argmax(-1))
    p, q = a.softmax(-1), t.softmax(-1)
    top_p = p.max(-1).values
    torch.testing.assert_close(q.max(-1).values, top_p, rtol=1e-4, atol=1e-4)  # the top class keeps its mass
    rest = q.topk(2, dim=-1).values[:, 1]  # the two other classes share 1 - p_top evenly
    torch.testing.assert_close(rest, (1 - top_p) / 2, rtol=1e-4, atol=1e-4)


class CountForwards(Callback):
    def __init__(self) -> None:
        self.training = 0
        self.handle = None

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args, output):
            self.training += int(trainer.training)
        self.handle = pl_module.teacher.register_forward_hook(hook)

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


def test_training_from_the_cache_runs_no_teacher_forward(tmp_path, folder):
    counter = CountForwards()
    pl.seed_everything(0)
    trainer(tmp_path, [TeacherCache(str(tmp_path / "cache")), counter], max_steps=4).fit(module(), datamodule(folder))
    assert counter.training == 0
    online = CountForwards()
    trainer(tmp_path, [online], max_steps=4).fit(module(), datamodule(folder))
    assert online.training == 4


@pytest.fixture
def info(monkeypatch) -> list[str]:
    """The callback's info messages (it reports through rank_zero_info; logging levels depend on other tests)."""
    import kd_lightning.callbacks.teacher_cache as module_under_test

    seen: list[str] = []
    monkeypatch.setattr(module_under_test, "rank_zero_info", lambda msg, *a, **k: seen.append(str(msg)))
    return seen


def messages(seen: list[str]) -> str:
    text = "\n".join(seen)
    seen.clear()
    return text


def test_stale_or_partial_caches_are_rebuilt_with_a_message(tmp_path, folder, info):
    cache = tmp_path / "cache"
    fit_cached(tmp_path, folder, cache, max_steps=1)
    assert "building" in messages(info)
    fit_cached(tmp_path, folder, cache, max_steps=1)
    assert "using the cached teacher logits" in messages(info)

    fit_cached(tmp_path, folder, cache, model=module(teacher_seed=1), max_steps=1)  # another teacher
    assert "built for a different teacher" in messages(info)
    fit_cached(tmp_path, folder, cache, max_steps=1)
    assert "built for a different teacher" in messages(info)

    fit_cached(tmp_path, folder, cache, dm=datamodule(folder, crop_scale=(0.5, 1.0)), max_steps=1)  # transform
    assert "built for a different transform" in messages(info)
    fit_cached(tmp_path, folder, cache, max_steps=1)
    assert "building" in messages(info)

    fit_cached(tmp_path, folder, cache, views=3, max_steps=1)
    assert "built for a different views" in messages(info)

    data = tmp_path / "photos_copy"
    import shutil

    shutil.copytree(folder, data)
    fit_cached(tmp_path, data, cache, max_steps=1)  # another data folder (and views back to 2)
    assert "different data, views" in messages(info)
    fit_cached(tmp_path, data, cache, max_steps=1)
    assert "using" in messages(info)
    first = sorted((data / "class_0").iterdir())[0]
    first.write_bytes(sorted((data / "class_1").iterdir())[0].read_bytes())  # a file rewritten in place
    os.utime(first, ns=(1, 1))
    fit_cached(tmp_path, data, cache, max_steps=1)
    assert "built for a different data" in messages(info)

    logits = cache / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-40])  # truncated
    fit_cached(tmp_path, data, cache, max_steps=1)
    assert "damaged or truncated" in messages(info)
    assert TeacherLogitsStore(cache).stale_reason(TeacherLogitsStore(cache).manifest["parts"]) is None

    (cache / "manifest.json").unlink()  # a build that did not finish
    fit_cached(tmp_path, data, cache, max_steps=1)
    assert "partial cache" in messages(info)

    fit_cached(tmp_path, data, cache, precision="bf16", max_steps=1)  # logits of a bfloat16 teacher pass
    assert "built for a different precision" in messages(info)


class ThreeHeads(nn.Module):
    """A teacher with a main head and two auxiliary heads, as GoogLeNet (main first)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(128, 3) for _ in range(3))

    def forward(self, x):
        features = self.body(x)
        return tuple(head(features) for head in self.heads)


@pytest.mark.parametrize("teacher_weights", [None, [1.0, 0.3, 0.3]], ids=["heads-averaged", "heads-weighted"])
def test_a_multi_head_teacher_distils_offline_exactly_as_online(tmp_path, folder, teacher_weights):
    """Every head is cached: whatever the terms do with the heads online (average them, weight them, DKD's main
    head), they do offline, on the same numbers."""
    from kd_lightning.distillers import DKD

    def three_head_module():
        student = nets()[0]
        terms = {"kd": HintonKD(0.6, temperature=2.0, teacher_weights=teacher_weights),
                 "dkd": DKD(0.2, warmup=0), "ce": CrossEntropy(0.2)}
        return DistillationModule(student=student, teacher=ThreeHeads(), num_classes=3, terms=terms,
                                  optim=dict(lr=0.05, lr_scheduler="none"))

    _, _, keep = fit_cached(tmp_path, folder, tmp_path / "cache", views=2, model=three_head_module())
    fresh = three_head_module()
    b = as_batch(keep.batches[0])
    assert b.teacher_logits.shape == (len(b.images), 3, 3)  # (B, heads, classes)
    with torch.no_grad():
        online_heads = fresh.teacher(b.images)
    for h in range(3):
        torch.testing.assert_close(b.teacher_logits[:, h], online_heads[h], rtol=1e-5, atol=1e-5)
    cached = fresh.losses(fresh.step(b))
    online = fresh.losses(fresh.step(b._replace(teacher_logits=None)))
    assert set(cached) == {"loss", "loss_kd", "loss_dkd", "loss_ce"}
    for name in cached:
        torch.testing.assert_close(cached[name], online[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keep.losses[0], online["loss"].detach(), rtol=1e-6, atol=1e-6)


def test_settings_that_would_pair_logits_with_other_images_are_refused(tmp_path, folder):
    cache = str(tmp_path / "cache")
    for kwargs, words in (({"noise_std": 0.1}, "noise_std=0.1"),):
        with pytest.raises(ValueError, match=words):
            trainer(tmp_path, [TeacherCache(cache)]).fit(module(), datamodule(folder, **kwargs))
    hint = [CrossEntropy(0.5), HintonKD(0.5), Hint(student_layer="1", teacher_layer="1")]
    with pytest.raises(ValueError, match="tap teacher layers"):
        trainer(tmp_path, [TeacherCache(cache)]).fit(module(terms=hint), datamodule(folder))
    with pytest.raises(ValueError, match="needs a DistillationModule with a teacher"):
        trainer(tmp_path, [TeacherCache(cache)]).fit(DistillationModule(student=nets()[0], num_classes=3),
                                                     datamodule(folder))

    class NumpyJitter(nn.Module):  # randomness from numpy's generator: not replayable from a seed
        def forward(self, x):
            return x + float(np.random.rand())

    dm = datamodule(folder)
    tf = dm.train_transform
    dm.train_transform = lambda: torch.nn.Sequential(tf(), NumpyJitter())
    with pytest.raises(ValueError, match="cannot replay"):
        trainer(tmp_path, [TeacherCache(cache)]).fit(module(), dm)
    assert not Path(cache).exists()  # refused before anything was written

    for kwargs in ({"views": 0}, {"dtype": "int8"}, {"top_k": 0}, {"precision": "8"}, {"dirpath": ""}):
        with pytest.raises(ValueError, match="TeacherCache"):
            TeacherCache(**{"dirpath": cache, **kwargs})


class SaveState(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.out)


def _ddp_run(tmp_path: Path, root: Path, devices: int, batch_size: int) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    out = tmp_path / f"state_{devices}.pt"
    dm = datamodule(root, batch_size=batch_size, val_fraction=0.25)
    pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto", max_steps=3,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, default_root_dir=tmp_path,
               callbacks=[TeacherCache(str(tmp_path / f"cache_{devices}"), views=2, dtype="float32"),
                          SaveState(out)]).fit(module(), dm)
    return torch.load(out, weights_only=True)


@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                    reason="needs fork and torch.distributed (gloo)")
def test_two_process_ddp_from_the_cache_equals_one_process(tmp_path, folder):
    two = _ddp_run(tmp_path, folder, devices=2, batch_size=3)  # built rank by rank, 3 rows per rank and step
    one = _ddp_run(tmp_path, folder, devices=1, batch_size=6)  # the same 6 rows per step in one process
    a = np.load(tmp_path / "cache_2" / "logits.npy")
    b = np.load(tmp_path / "cache_1" / "logits.npy")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-5, msg=key)


def test_a_run_resumed_from_a_checkpoint_replays_the_same_cached_views(tmp_path, folder):
    """Kill-and-resume from the cache: one epoch, a checkpoint, a second epoch in a new process state, against
    two uninterrupted epochs: the same weights (the view of each row in each epoch is a function of the run's seed,
    the epoch and the row)."""
    def run(epochs: int, ckpt: str | None = None) -> tuple[DistillationModule, pl.Trainer]:
        pl.seed_everything(0)
        model = module()
        t = trainer(tmp_path, [TeacherCache(str(tmp_path / "cache"), views=3)], max_steps=-1, max_epochs=epochs)
        t.fit(model, datamodule(folder), ckpt_path=ckpt)
        return model, t

    whole, _ = run(2)
    half, t = run(1)
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    torch.manual_seed(123)  # a resumed process starts from other random states
    resumed, _ = run(2, str(tmp_path / "epoch1.ckpt"))
    assert not all(torch.equal(a, b) for a, b in zip(half.state_dict().values(), whole.state_dict().values()))
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key



class SlowTeacher(nn.Sequential):
    """nets()'s teacher, slowed down so that a second run starts while the first is still building."""

    def forward(self, x):
        time.sleep(0.05)
        return super().forward(x)


def _attach_in_a_process(root: Path, cache: Path, start, messages_file: Path) -> None:
    """One run's start on the shared cache, in its own process as a study job is (spawned: run by the test below)."""
    import kd_lightning.callbacks.teacher_cache as module_under_test

    seen: list[str] = []
    module_under_test.rank_zero_info = lambda msg, *a, **k: seen.append(str(msg))
    student, teacher = nets()
    model = DistillationModule(student=student, teacher=SlowTeacher(*teacher), num_classes=3)
    dm = datamodule(root)
    callback = TeacherCache(str(cache), views=2)
    callback.check_settings(model, dm)
    start.wait()
    callback.attach(model, dm)
    messages_file.write_text("\n".join(seen))


def test_runs_started_together_on_one_cache_build_it_once_and_read_it_complete(tmp_path, folder):
    """The seeds of a study under ``--launcher local --jobs N`` share one cache and start together: one builds, the
    others wait and then use it (before the build lock each rebuilt the same files, truncating them under the
    other)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    cache, start = tmp_path / "cache", context.Barrier(2)
    files = [tmp_path / f"messages_{i}.txt" for i in range(2)]
    runs = [context.Process(target=_attach_in_a_process, args=(folder, cache, start, file)) for file in files]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    assert [run.exitcode for run in runs] == [0, 0]
    text = "\n".join(file.read_text() for file in files)
    assert text.count("building the teacher cache") == 1, text
    assert text.count("another run is building the cache") == 1 and text.count("using the cached") == 1, text
    store = TeacherLogitsStore(cache)
    assert store.stale_reason(store.manifest["parts"]) is None
    teacher, dm = nets()[1], datamodule(folder)
    dm.setup("fit")
    for row in range(len(dm.train_set)):  # every row complete: the teacher's logits on its views
        for view in range(2):
            image = make_view(dm.train_set, row, view_seed(0, row, view))[0]
            with torch.no_grad():
                expected = teacher(image[None])[0]
            torch.testing.assert_close(store.logits(row, view), expected, rtol=1e-3, atol=1e-3)


def test_a_cache_that_another_run_trains_from_is_not_rebuilt_under_it(tmp_path, folder, info):
    """Two runs of other settings on one cache folder (e.g. a search over the crop scale, two label fractions): the
    second is refused while the first trains from the cache, instead of rewriting the logits it reads."""
    cache = tmp_path / "cache"

    def start(teacher_seed: int = 0) -> TeacherCache:
        callback, model, dm = TeacherCache(str(cache), views=2), module(teacher_seed), datamodule(folder)
        callback.check_settings(model, dm)
        callback.attach(model, dm)
        return callback

    training = start()  # a run whose fit has not ended
    built_for = TeacherLogitsStore(cache).manifest["parts"]["teacher"]
    with pytest.raises(RuntimeError, match=r"a different teacher\) that 1 other run\(s\) are training from"):
        start(teacher_seed=1)
    assert TeacherLogitsStore(cache).manifest["parts"]["teacher"] == built_for  # untouched
    same = start()  # the same settings are served as before
    assert "using the cached teacher logits" in messages(info)
    same.release_reader()
    training.release_reader()  # its fit ended
    (cache / "readers" / "123-dead.lock").touch()  # left by a killed run: held by no one
    start(teacher_seed=1).release_reader()
    assert "built for a different teacher" in messages(info)
    assert not list((cache / "readers").iterdir())
