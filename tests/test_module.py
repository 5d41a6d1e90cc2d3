"""DistillationModule and ClassifierModule: the frozen teacher, checkpoints, resume, metrics, bad input."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import ClassifierModule, DistillationModule
from kd_lightning.models import build_model

NUM_CLASSES = 4


def teacher_with_bn_and_dropout() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))


def student() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, NUM_CLASSES))


def loaders(n: int = 48, batch_size: int = 8):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size, shuffle=True), DataLoader(data, batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


class RecordTeacherMode(Callback):
    """Records the teacher's (and every submodule's) training flag at each teacher forward during training."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args):
            if trainer.training:
                self.modes.append(any(m.training for m in module.modules()))
        pl_module.teacher.register_forward_pre_hook(hook)


def test_teacher_stays_frozen_in_eval_mode_and_bit_identical(tmp_path):
    L.seed_everything(0)
    teacher = teacher_with_bn_and_dropout()
    teacher.train()  # even a teacher handed over in train mode must be switched off
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(student=student(), teacher=teacher, num_classes=NUM_CLASSES, optim=dict(lr=0.1))
    record = RecordTeacherMode()
    train, val = loaders()
    trainer(tmp_path, callbacks=[record]).fit(module, train, val)

    assert len(record.modes) == 2 * len(train) and not any(record.modes)
    assert not module.teacher.training
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # weights, BatchNorm running stats and num_batches_tracked
        assert torch.equal(before[key], after[key]), key
    assert all(not p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in module.student.parameters()}


def test_train_mode_switch_cannot_wake_the_teacher():
    module = DistillationModule(student=student(), teacher=teacher_with_bn_and_dropout(), num_classes=NUM_CLASSES)
    module.train()
    assert module.student.training and not any(m.training for m in module.teacher.modules())


def test_checkpoint_holds_no_teacher_and_resume_continues(tmp_path):
    L.seed_everything(0)
    train, val = loaders()

    def make():
        return DistillationModule(student=student(), teacher=teacher_with_bn_and_dropout(),
                                  num_classes=NUM_CLASSES, temperature=3.0, alpha=0.5)

    module = make()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(module, train, val)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("student.") for k in keys)
    assert not any("teacher" in k for k in keys)
    assert "teacher" not in str(list(module.state_dict()))

    saved_student = {k[len("student."):]: v for k, v in ckpt["state_dict"].items()}

    class CheckStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.global_step = trainer.global_step
            self.student_matches = all(torch.equal(v, pl_module.student.state_dict()[k])
                                       for k, v in saved_student.items())

    resumed, check = make(), CheckStart()
    teacher_before = {k: v.clone() for k, v in resumed.teacher.state_dict().items()}
    t2 = trainer(tmp_path, max_epochs=2, enable_checkpointing=True,
                 callbacks=[check, ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    t2.fit(resumed, train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert check.global_step == len(train) and check.student_matches
    assert t2.global_step == 2 * len(train) and t2.current_epoch == 2
    for key, value in resumed.teacher.state_dict().items():  # the rebuilt teacher was kept, not zeroed
        assert torch.equal(value, teacher_before[key])


def test_logs_the_named_metrics(tmp_path):
    module = DistillationModule(student=student(), teacher=teacher_with_bn_and_dropout(), num_classes=NUM_CLASSES,
                                temperature=2.5)
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=1)
    t.fit(module, train, val)
    metrics = t.callback_metrics
    for name in ["train/loss", "train/loss_kd", "train/loss_ce", "train/temperature", "val/acc", "val/teacher_acc",
                 "val/agreement", "val/kl", "val/loss"]:
        assert name in metrics, name
    assert metrics["train/temperature"].item() == 2.5
    assert 0.0 <= metrics["val/agreement"].item() <= 1.0 and metrics["val/kl"].item() >= 0.0
    results = t.test(module, val, verbose=False)[0]
    for name in ["test/acc", "test/teacher_acc", "test/agreement", "test/kl"]:
        assert name in results, name


def test_metrics_are_right_on_known_predictions(tmp_path):
    """Student always predicts class 0, teacher always class 1: agreement 0, accuracy = class shares."""

    class Constant(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.cls, self.bias = cls, nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), self.cls), NUM_CLASSES).float() * 5 + self.bias

    module = DistillationModule(student=Constant(0), teacher=Constant(1), num_classes=NUM_CLASSES)
    x, y = torch.randn(12, 3, 8, 8), torch.tensor([0] * 3 + [1] * 6 + [2] * 3)
    res = trainer(tmp_path).validate(module, DataLoader(TensorDataset(x, y), batch_size=5), verbose=False)[0]
    assert res["val/acc"] == pytest.approx(3 / 12)
    assert res["val/teacher_acc"] == pytest.approx(6 / 12)
    assert res["val/agreement"] == 0.0
    assert res["val/kl"] > 1.0


def test_temperature_and_weights_are_plain_attributes_used_by_the_next_step(tmp_path):
    seen = []

    class Lower(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.temperature, pl_module.terms["kd"].weight = 1.0 + batch_idx, 0.5

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.callback_metrics["train/temperature"].item(),
                         pl_module.terms["kd"].temperature, pl_module.terms["kd"].weight))

    module = DistillationModule(student=student(), teacher=teacher_with_bn_and_dropout(), num_classes=NUM_CLASSES)
    train, _ = loaders(n=24)
    trainer(tmp_path, max_epochs=1, callbacks=[Lower()], log_every_n_steps=1).fit(module, train)
    assert seen == [(1.0, 1.0, 0.5), (2.0, 2.0, 0.5), (3.0, 3.0, 0.5)]


def test_multi_head_teacher_uses_weights(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3 * 8 * 8, NUM_CLASSES), nn.Linear(3 * 8 * 8, NUM_CLASSES)

        def forward(self, x):
            x = x.flatten(1)
            return self.a(x), self.b(x)

    from kd_lightning.losses import distillation_loss

    teacher = TwoHeads()
    module = DistillationModule(student=student(), teacher=teacher, num_classes=NUM_CLASSES,
                                teacher_weights=[1.0, 0.3], alpha=0.9)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, NUM_CLASSES, (8,))
    out = module.training_step((x, y), 0)
    s = module.student(x)
    ref = distillation_loss(s, list(teacher(x)), y, module.temperature, 0.9, [1.0, 0.3])
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    torch.testing.assert_close(out["teacher_logits"], teacher(x)[0])


@pytest.mark.parametrize("optimizer,scheduler,kind", [
    ("sgd", "cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
    ("adamw", "step", torch.optim.lr_scheduler.StepLR),
    ("adam", "multistep", torch.optim.lr_scheduler.MultiStepLR),
])
def test_optimizer_and_scheduler_from_names(tmp_path, optimizer, scheduler, kind):
    module = ClassifierModule(model=student(), num_classes=NUM_CLASSES, optim=dict(optimizer=optimizer, lr=0.01, lr_scheduler=scheduler, milestones=[1], step_size=1))
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=2)
    t.fit(module, train, val)
    opt = t.optimizers[0]
    assert type(opt).__name__.lower() == optimizer
    assert isinstance(t.lr_scheduler_configs[0].scheduler, kind)
    assert opt.param_groups[0]["lr"] < 0.01  # the schedule moved the learning rate down


def _lr_recorder():
    """A callback appending the learning rate seen by each training step to the returned list."""
    lrs: list[float] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    return lrs, Record()


def test_warmup_then_cosine(tmp_path):
    module = ClassifierModule(model=student(), num_classes=NUM_CLASSES, optim=dict(lr=0.1, warmup_epochs=1))
    lrs, record = _lr_recorder()
    train, _ = loaders()
    trainer(tmp_path, max_epochs=3, callbacks=[record]).fit(module, train)
    steps = len(train)
    assert lrs[0] < lrs[steps - 1] <= 0.1 + 1e-9  # rising during warm-up
    assert lrs[-1] < lrs[steps]  # then decaying


def test_warmup_is_measured_in_epochs_when_the_run_is_limited_by_max_steps(tmp_path):
    module = ClassifierModule(model=student(), num_classes=NUM_CLASSES, optim=dict(lr=0.1, warmup_epochs=1))
    lrs, record = _lr_recorder()
    train, _ = loaders()  # 6 batches an epoch
    trainer(tmp_path, max_epochs=-1, max_steps=24, callbacks=[record]).fit(module, train)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert peak == len(train)  # warm-up over one epoch (6 steps), not over the whole run
    assert lrs[-1] < lrs[peak] / 2


def test_classifier_multi_head_loss_weights_aux_heads():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, NUM_CLASSES), nn.Linear(4, NUM_CLASSES)

        def forward(self, x):
            return self.a(x), self.b(x)

    net = TwoHeads()
    x, y = torch.randn(6, 4), torch.randint(0, NUM_CLASSES, (6,))
    ce = torch.nn.functional.cross_entropy
    module = ClassifierModule(model=net, num_classes=NUM_CLASSES, head_weights=[1.0, 0.3])
    loss = module.training_step((x, y), 0)["loss"]
    assert loss.item() == pytest.approx((ce(net.a(x), y) + 0.3 * ce(net.b(x), y)).item(), rel=1e-6)
    # no hidden default: without head_weights the main head alone is trained, as for a student
    main_only = ClassifierModule(model=net, num_classes=NUM_CLASSES).training_step((x, y), 0)["loss"]
    assert main_only.item() == pytest.approx(ce(net.a(x), y).item(), rel=1e-6)


def test_teacher_loads_from_classifier_checkpoint_and_state_dict(tmp_path):
    L.seed_everything(0)
    clf = ClassifierModule(model="mlp", num_classes=NUM_CLASSES, model_kwargs={"in_features": 192, "hidden": [8]})
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    train, val = loaders()
    trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(clf, train, val)
    torch.save(clf.model.state_dict(), tmp_path / "plain.pt")
    for path in (tmp_path / "last.ckpt", tmp_path / "plain.pt"):
        kd = DistillationModule(student="mlp", teacher="mlp", num_classes=NUM_CLASSES, teacher_checkpoint=str(path),
                                student_kwargs={"in_features": 192, "hidden": [4]},
                                teacher_kwargs={"in_features": 192, "hidden": [8]})
        for key, value in clf.model.state_dict().items():
            assert torch.equal(kd.teacher.state_dict()[key], value)
    # a distilled student can teach in turn: its checkpoint holds student.* keys
    kd_ckpt = ModelCheckpoint(dirpath=tmp_path / "kd", save_last=True)
    trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[kd_ckpt]).fit(kd, train, val)
    second = DistillationModule(student="mlp", teacher="mlp", num_classes=NUM_CLASSES,
                                teacher_checkpoint=str(tmp_path / "kd" / "last.ckpt"),
                                student_kwargs={"in_features": 192, "hidden": [2]},
                                teacher_kwargs={"in_features": 192, "hidden": [4]})
    assert torch.equal(second.teacher.state_dict()["net.1.weight"], kd.student.state_dict()["net.1.weight"])


def test_hparams_reach_tensorboard_hparams_tab(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    module = DistillationModule(student="mlp", teacher="mlp", num_classes=NUM_CLASSES, temperature=3.0,
                                student_kwargs={"in_features": 192, "hidden": [4]},
                                teacher_kwargs={"in_features": 192, "hidden": [8]})
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    train, val = loaders()
    trainer(tmp_path, max_epochs=1, logger=logger).fit(module, train, val)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "val/acc" in acc.Tags()["scalars"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/experiment").plugin_data.content).experiment
    assert {"val/acc", "val/acc_best", "val/agreement", "val/kl", "test/acc"} <= {
        m.name.tag for m in experiment.metric_infos}
    assert "model/terms/kd/temperature" in {h.name for h in experiment.hparam_infos}
    # no fake metric points: the first val/acc point is a real epoch-end value
    assert len(acc.Scalars("val/acc")) == 1


def test_bad_input_gives_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown model name 'resnet99'.*resnet18"):
        DistillationModule(student="resnet99", teacher="mlp", num_classes=3)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        DistillationModule(student="mlp", teacher="mlp", num_classes=3, teacher_checkpoint=str(tmp_path / "nope.ckpt"))
    torch.save(build_model("mlp", 5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ValueError, match="5 classes.*data has 3 classes"):
        DistillationModule(student="mlp", teacher="mlp", num_classes=3, teacher_checkpoint=str(tmp_path / "five.pt"))
    five_way = build_model("mlp", 5, in_features=192)
    module = DistillationModule(student=student(), teacher=five_way, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="teacher gives 5 class scores but the data has 4"):
        module.check_input_shape((3, 8, 8))
    with pytest.raises(ValueError, match="cannot run on inputs of shape"):
        DistillationModule(student="flowers_cnn", teacher="resnet20", num_classes=3).check_input_shape((3, 1, 1))
    with pytest.raises(ValueError, match="num_classes is required"):
        DistillationModule(student="mlp", teacher="mlp")
    with pytest.raises(ValueError, match="alpha"):
        DistillationModule(student="mlp", teacher="mlp", num_classes=3, alpha=2.0)
    with pytest.raises(ValueError, match="1000 classes"):
        DistillationModule(student="mlp", teacher="resnet18", num_classes=3, teacher_pretrained=True)
    assert sorted(os.listdir(tmp_path)) == ["five.pt"]


def test_resume_with_another_teacher_warns(tmp_path):
    """The teacher is not in checkpoints; its fingerprint is, so a retrained or moved teacher is noticed."""
    torch.save(build_model("mlp", NUM_CLASSES, in_features=192, hidden=[8]).state_dict(), tmp_path / "t.pt")

    def make():
        return DistillationModule(student="mlp", teacher="mlp", num_classes=NUM_CLASSES,
                                  teacher_checkpoint=str(tmp_path / "t.pt"),
                                  student_kwargs={"in_features": 192, "hidden": [4]},
                                  teacher_kwargs={"in_features": 192, "hidden": [8]})

    train, val = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(make(), train, val)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert len(saved["teacher_fingerprint"]) == 64

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same teacher: no warning
        DistillationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    torch.save(build_model("mlp", NUM_CLASSES, in_features=192, hidden=[8]).state_dict(), tmp_path / "t.pt")
    with pytest.warns(UserWarning, match="not the one the student was trained with"):
        DistillationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
