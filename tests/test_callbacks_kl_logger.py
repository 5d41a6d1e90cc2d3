"""KLDivergenceLogger: TensorBoard tags and point counts of a short run, values against the module's own val
metrics and a direct computation, no extra forward passes, and no sync-prone tensor ops on quiet steps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import ClassifierModule, DistillationModule
from kd_lightning.callbacks import KLDivergenceLogger
from kd_lightning.metrics import DistillationStats
from kd_lightning.data import DigitsDataModule
from kd_lightning.losses import kl_divergence
from kd_lightning.metrics import entropy


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=2,
                    num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _model(**kwargs) -> DistillationModule:
    pl.seed_everything(0)
    return DistillationModule(student="mlp", teacher="mlp", num_classes=10, temperature=4.0, optim=dict(lr_scheduler="none"),
                              **kwargs)


def test_tensorboard_tags_and_point_counts(tmp_path):
    """2 epochs x 4 steps, statistics every 3 steps -> steps 2 and 5; 2 validation epochs of 2 x 32 rows."""
    kl_logger = KLDivergenceLogger(log_every_n_steps=3)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    trainer = _trainer(tmp_path, [kl_logger], logger=logger, log_every_n_steps=2)
    trainer.fit(_model(), DigitsDataModule(batch_size=32))

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0,
                                                             "tensors": 0})
    events.Reload()
    tags = events.Tags()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"]}
    for name in ("kl_T", "kl_T1", "entropy_teacher", "entropy_student", "agreement"):
        assert steps[f"kl_train/{name}"] == [2, 5]
    val_steps = steps["val/acc"]  # the module's own per-epoch metric: our points sit on the same steps
    assert len(val_steps) == 2
    val_tags = ["kl_val/kl_T", "kl_val/kl_T1", "kl_val/entropy_teacher", "kl_val/entropy_student", "kl_val/agreement",
                "kl_val/teacher_right_student_wrong", "kl_val/student_right_teacher_wrong"]
    val_tags += [f"kl_val/class_kl_T1/{c}" for c in range(10)]
    for tag in val_tags:
        assert steps[tag] == val_steps, tag
    assert [e.step for e in events.Histograms("kl_val/per_sample_kl_T1")] == val_steps
    assert [e.step for e in events.Images("kl_val/error_confusion")] == val_steps
    assert [e.step for e in events.Tensors("kl_val/error_confusion/text_summary")] == val_steps
    assert events.Histograms("kl_val/per_sample_kl_T1")[-1].histogram_value.num == 64  # one value per val row

    # the aggregated validation values agree with the module's own val/kl (KL at T=1) and val/agreement
    last = {tag: events.Scalars(tag)[-1].value for tag in steps}
    assert last["kl_val/kl_T1"] == pytest.approx(last["val/kl"], rel=1e-5)
    assert last["kl_val/agreement"] == pytest.approx(last["val/agreement"], abs=1e-6)
    assert last["kl_val/kl_T"] < last["kl_val/kl_T1"]  # softer distributions at T=4 are closer
    stats = kl_logger.last_val_stats
    assert stats["error_confusion"].sum() == pytest.approx(stats["teacher_right_student_wrong"] * 64)
    assert stats["error_confusion"].diagonal().sum() == 0  # an error is never the true class


def test_stats_match_a_direct_computation():
    """Per-class KL, the error confusion and unlabelled/soft-label rows, on hand-checkable logits."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 4, generator=gen), torch.randn(12, 4, generator=gen)
    y = torch.randint(0, 4, (12,), generator=gen)
    y[0] = -100  # unlabelled: in the KL means, not in label-based stats
    soft = torch.nn.functional.one_hot(y.clamp(min=0), 4).float()
    soft[0] = 0.0  # the same rows as MixUp-style soft labels
    for targets in (y, soft):
        metric = DistillationStats(4, detailed=True, per_sample=True)
        metric.update(s[:5], t[:5], targets[:5], 2.0)
        metric.update(s[5:], t[5:], targets[5:], 2.0)
        out = metric.compute()
        kl1 = kl_divergence(s, t, 1.0, reduction="none")
        assert out["kl_T"] == pytest.approx(kl_divergence(s, t, 2.0).item(), rel=1e-6)
        assert out["kl_T1"] == pytest.approx(kl1.mean().item(), rel=1e-6)
        assert out["entropy_teacher"] == pytest.approx(entropy(t).mean().item(), rel=1e-6)
        assert out["agreement"] == pytest.approx((s.argmax(1) == t.argmax(1)).float().mean().item())
        labelled = y != -100
        for c in range(4):
            rows = labelled & (y == c)
            expected = kl1[rows].mean().item() if rows.any() else 0.0
            assert out["class_kl_T1"][c] == pytest.approx(expected, rel=1e-6, abs=1e-7)
        confusion = torch.zeros(4, 4)
        for i in range(1, 12):
            if t[i].argmax() == y[i] and s[i].argmax() != y[i]:
                confusion[y[i], s[i].argmax()] += 1
        assert torch.equal(out["error_confusion"], confusion)
        assert out["teacher_right_student_wrong"] == pytest.approx(confusion.sum().item() / 11)
        assert torch.equal(out["per_sample_kl_T1"], torch.cat([kl1[:5], kl1[5:]]))


class _CountForwards(Callback):
    def setup(self, trainer, pl_module, stage):
        self.calls = {"student": 0, "teacher": 0}
        for name in self.calls:
            getattr(pl_module, name).register_forward_hook(lambda *_, name=name: self.calls.__setitem__(
                name, self.calls[name] + 1))


def test_no_extra_forward_passes(tmp_path):
    counts = []
    for callbacks in ([], [KLDivergenceLogger(log_every_n_steps=1)]):
        counter = _CountForwards()
        logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
        _trainer(tmp_path, [counter, *callbacks], max_epochs=1, logger=logger).fit(_model(), DigitsDataModule())
        counts.append(counter.calls)
    # 4 train + 2 val batches + 1 zero batch of the module's input-shape check in setup
    assert counts[0] == counts[1] == {"student": 7, "teacher": 7}


# Tensor ops that copy device memory to the host or wait for it (a host sync on CUDA), or whose output size
# depends on the data.
_SYNC_OPS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
             "masked_select", "unique", "bincount", "any", "all", "equal", "allclose", "boolean_mask_indexing"}


class _OpSpy(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("__getitem__", "__setitem__") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:]):
            name = "boolean_mask_indexing"  # its output size depends on the data: a sync on CUDA
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _SpiedLogger(KLDivergenceLogger):
    """Records the torch ops of each hook call."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_ops: list[list[str]] = []
        self.val_ops: list[list[str]] = []

    def on_train_batch_end(self, *args, **kwargs):
        with _OpSpy() as spy:
            super().on_train_batch_end(*args, **kwargs)
        self.train_ops.append(spy.ops)

    def on_validation_batch_end(self, *args, **kwargs):
        with _OpSpy() as spy:
            super().on_validation_batch_end(*args, **kwargs)
        self.val_ops.append(spy.ops)


def test_quiet_steps_do_no_tensor_work_and_validation_batches_no_sync(tmp_path, monkeypatch):
    update_ops: list[list[str]] = []
    original_update = DistillationStats.update

    def spied_update(self, *args, **kwargs):
        with _OpSpy() as spy:
            original_update(self, *args, **kwargs)
        update_ops.append(spy.ops)

    monkeypatch.setattr(DistillationStats, "update", spied_update)
    spied = _SpiedLogger(log_every_n_steps=4)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    model = _model()
    steps_with_stats = []
    original_step = type(model).training_step

    def training_step(self, batch, batch_idx):
        out = original_step(self, batch, batch_idx)
        steps_with_stats.append(self.last_step_stats is not None)
        return out

    monkeypatch.setattr(type(model), "training_step", training_step)
    _trainer(tmp_path, [spied], max_epochs=1, logger=logger).fit(model, DigitsDataModule())
    assert [bool(ops) for ops in spied.train_ops] == [False, False, False, True]  # only step 3 logs
    assert "tolist" in spied.train_ops[3]  # the one transfer of a logged step (the spy does see it)
    assert steps_with_stats == [False, False, False, True]  # the module computes them only when asked
    # validation: the module owns and updates the statistics (on-device sums, no sync); the callback only renders
    assert len(spied.val_ops) == 2 and not any(spied.val_ops)
    assert len(update_ops) == 2 and all(update_ops)
    assert not {op for ops in update_ops for op in ops} & _SYNC_OPS


def test_needs_a_distillation_module(tmp_path):
    model = ClassifierModule(model="mlp", num_classes=10, optim=dict(lr_scheduler="none"))
    with pytest.raises(ValueError, match="needs a kd_lightning.DistillationModule with a teacher; got ClassifierModule"):
        _trainer(tmp_path, [KLDivergenceLogger()]).fit(model, DigitsDataModule())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        KLDivergenceLogger(log_every_n_steps=0)
    with pytest.raises(ValueError, match="max_class_scalars"):
        KLDivergenceLogger(max_class_scalars=-1)


def test_many_classes_give_a_text_table_not_scalars(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 30, (64,), generator=gen))
    loader = DataLoader(data, batch_size=32)
    model = DistillationModule(student="mlp", teacher="mlp", num_classes=30, optim=dict(lr_scheduler="none"))
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    _trainer(tmp_path, [KLDivergenceLogger(max_class_scalars=20)], max_epochs=1, logger=logger).fit(
        model, loader, loader)
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert not [t for t in events.Tags()["scalars"] if t.startswith("kl_val/class_kl_T1/")]
    table = events.Tensors("kl_val/class_kl_T1/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| class | mean KL (T=1) | rows |") and table.count("\n") == 21
