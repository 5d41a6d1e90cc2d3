"""ProgressiveUnfreezing on one process: order, bit-identical frozen stages (parameters, BatchNorm statistics,
optimizer state), module paths checked against the real tree, and resume in the middle of the schedule
(together with TemperatureScheduler's state). The DDP no-drift test is in test_callbacks_ddp.py."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import ClassifierModule, DistillationModule
from kd_lightning.callbacks import ProgressiveUnfreezing, TemperatureScheduler

STAGES = {"1": 2, "2": 2, "5": 1}  # Linear + its BatchNorm from epoch 2, the middle Linear from epoch 1


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _loader(rows: int = 64, batch_size: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(rows, 1, 8, 8, generator=gen), torch.randint(0, 10, (rows,), generator=gen))
    return DataLoader(data, batch_size=batch_size)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", max_epochs=3, limit_train_batches=3, limit_val_batches=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path)
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class _Record(Callback):
    """Per epoch: a copy of the student's state and its stages' train/eval modes; optimizer state owners."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.modes: list[dict[str, bool]] = []
        self.optimizer_state_keys: list[set[int]] = []

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.clone() for k, v in pl_module.network.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:  # mid-epoch, after validation could have restored modes
            self.modes.append({s: pl_module.network.get_submodule(s).training for s in STAGES})

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.clone() for k, v in pl_module.network.state_dict().items()})
        self.optimizer_state_keys.append({id(p) for p in trainer.optimizers[0].state})

    def changed(self, epoch: int, prefix: str, since: dict[str, torch.Tensor] | None = None) -> bool:
        ref = self.initial if since is None else since
        return any(not torch.equal(v, ref[k]) for k, v in self.states[epoch].items() if k.startswith(prefix + "."))


@pytest.mark.parametrize(("kind", "optimizer"), [("distillation", "sgd"), ("classifier", "adamw")])
def test_unfreezing_order_and_frozen_stages_bit_identical(tmp_path, kind, optimizer):
    # SGD with momentum 0.9 and AdamW, both with weight decay: a frozen parameter would drift under either
    common = dict(num_classes=10, optim=dict(optimizer=optimizer, lr=0.05, weight_decay=0.01, lr_scheduler="none"))
    if kind == "distillation":
        model = DistillationModule(student=_net(), teacher=_net(), **common)
    else:
        model = ClassifierModule(model=_net(), **common)
    student = model.network
    record = _Record()
    unfreezing = ProgressiveUnfreezing(STAGES)
    # limit_val_batches: a validation pass each epoch restores module modes; frozen stages must stay in eval
    _trainer(tmp_path, [unfreezing, record], limit_val_batches=1).fit(model, _loader(), _loader())

    frozen_ids = {s: {id(p) for p in student.get_submodule(s).parameters()} for s in STAGES}
    for epoch in range(3):
        for stage, at in STAGES.items():
            if epoch < at:  # parameters and BatchNorm running statistics untouched, no optimizer state
                assert not record.changed(epoch, stage), (epoch, stage)
                assert not frozen_ids[stage] & record.optimizer_state_keys[epoch]
                assert record.modes[epoch][stage] is False
            else:
                assert record.changed(epoch, stage, since=record.states[epoch - 1] if epoch else None)
                assert frozen_ids[stage] <= record.optimizer_state_keys[epoch]
                assert record.modes[epoch][stage] is True
        assert record.changed(epoch, "7", since=record.states[epoch - 1] if epoch else None)  # the head trains
    assert unfreezing.frozen_stages == [] and student.training  # every stage back in train mode at the end


def test_adam_state_starts_fresh_at_unfreezing(tmp_path):
    """Adam's step count of a stage unfrozen at epoch 1 counts the steps since then only (bias correction)."""
    model = DistillationModule(student=_net(), teacher=_net(), num_classes=10, optim=dict(optimizer="adam", lr_scheduler="none"))
    trainer = _trainer(tmp_path, [ProgressiveUnfreezing({"5": 1})], max_epochs=2)
    trainer.fit(model, _loader())
    state = trainer.optimizers[0].state
    assert state[model.student[5].weight]["step"].item() == 3  # epoch 1 only
    assert state[model.student[7].weight]["step"].item() == 6  # both epochs


def test_unknown_stage_lists_the_valid_names(tmp_path):
    model = DistillationModule(student="mlp", teacher="mlp", num_classes=10, optim=dict(lr_scheduler="none"))
    with pytest.raises(ValueError, match=r"no module 'layer1'\. Its modules are: net, net\.0, net\.1, net\.2"):
        _trainer(tmp_path, [ProgressiveUnfreezing({"layer1": 1})]).fit(model, _loader())
    with pytest.raises(ValueError, match=r"'net\.2' \(ReLU\) has no parameters"):
        _trainer(tmp_path, [ProgressiveUnfreezing({"net.2": 1})]).fit(model, _loader())


@pytest.mark.parametrize(("unfreeze_at", "match"), [
    ({}, "non-empty mapping"),
    (["layer1"], "non-empty mapping"),
    ({"layer1": -1}, "must be an int >= 0"),
    ({"layer1": 1.5}, "must be an int >= 0"),
    ({"": 1}, "module paths"),
    ({"layer1": 1, "layer1.0": 2}, "overlap"),
])
def test_invalid_arguments(unfreeze_at, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveUnfreezing(unfreeze_at)


class _Epochs(Callback):
    """Per epoch: the temperature used, and whether each stage moved during the epoch."""

    def __init__(self) -> None:
        self.temperature: dict[int, float] = {}
        self.moved: dict[int, dict[str, bool]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.before = {k: v.clone() for k, v in pl_module.student.state_dict().items()}
        self.temperature[trainer.current_epoch] = pl_module.temperature

    def on_train_epoch_end(self, trainer, pl_module):
        after = pl_module.student.state_dict()
        self.moved[trainer.current_epoch] = {
            s: any(not torch.equal(after[k], v) for k, v in self.before.items() if k.startswith(s + "."))
            for s in ("1", "5")}


def test_resume_mid_schedule_restores_temperature_and_unfrozen_stages(tmp_path):
    """A 4-epoch run, and the same run resumed from its epoch-1 checkpoint, see the same temperatures and the
    same frozen stages. The resumed run's config moves stage "5" to epoch 3 and asks for 6 epochs: the
    checkpoint wins -- "5" (unfrozen at epoch 1) is not frozen again, "1" stays frozen until its epoch 3, and
    the cosine keeps its 4-epoch curve."""

    def run(root, max_epochs, unfreeze_at, ckpt_path=None):
        pl.seed_everything(0)
        model = DistillationModule(student=_net(), teacher=_net(), num_classes=10, temperature=4.0,
                                   optim=dict(lr_scheduler="none"))
        epochs = _Epochs()
        unfreezing = ProgressiveUnfreezing(unfreeze_at)
        callbacks = [TemperatureScheduler("cosine", end=1.0), unfreezing, epochs,
                     ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)]
        trainer = _trainer(root, callbacks, max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(model, _loader(), ckpt_path=ckpt_path)
        return epochs, unfreezing

    full, _ = run(tmp_path / "full", 4, {"1": 3, "5": 1})
    resumed, unfreezing = run(tmp_path / "resumed", 6, {"1": 3, "5": 3}, ckpt_path=tmp_path / "full" / "epoch=1.ckpt")

    assert full.temperature == pytest.approx({0: 4.0, 1: 3.25, 2: 1.75, 3: 1.0})  # cosine 4 -> 1 over 4 epochs
    assert resumed.temperature == pytest.approx({2: 1.75, 3: 1.0, 4: 1.0, 5: 1.0})
    assert full.moved == {0: {"1": False, "5": False}, 1: {"1": False, "5": True},
                          2: {"1": False, "5": True}, 3: {"1": True, "5": True}}
    assert resumed.moved == {2: {"1": False, "5": True}, 3: {"1": True, "5": True},
                             4: {"1": True, "5": True}, 5: {"1": True, "5": True}}
    assert unfreezing.state_dict() == {"unfrozen": ["1", "5"]}
