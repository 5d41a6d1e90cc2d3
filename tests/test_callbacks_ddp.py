"""Two-process CPU DDP (gloo): ProgressiveUnfreezing keeps the replicas identical after an unfreeze, and
KLDivergenceLogger's validation statistics are reduced over both ranks' shards.

Lightning's ``strategy="ddp_fork"`` runs the same DDP strategy (``DistributedDataParallel`` over gloo, a
``DistributedSampler`` per rank) in two forked processes, which inherit the already imported modules: no
second interpreter start. What each run saw is written to a file by rank 0 and checked here.

The control run uses Lightning's own ``BaseFinetuning`` (``requires_grad`` off, then on plus a new param group)
on the same model and data: there the unfrozen parameters are never all-reduced and the ranks drift apart
(Lightning issue #20340) -- which shows that the comparison does detect drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import DistillationModule
from kd_lightning.callbacks import KLDivergenceLogger, ProgressiveUnfreezing
from kd_lightning.losses import kl_divergence

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="needs fork and torch.distributed (gloo)")

STAGES = {"1": 1, "5": 2}  # Linear(64, 32) from epoch 1, Linear(32, 32) from epoch 2; the head trains throughout
MAX_EPOCHS = 3
VAL_ROWS = 64


def _data() -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(128, 1, 8, 8, generator=gen), torch.randint(0, 10, (128,), generator=gen))
    val = TensorDataset(torch.randn(VAL_ROWS, 1, 8, 8, generator=gen),
                        torch.randint(0, 10, (VAL_ROWS,), generator=gen))
    return train, val


class NaiveFinetuning(BaseFinetuning):
    """The requires_grad approach of Lightning's BackboneFinetuning, on the same stages."""

    def freeze_before_training(self, pl_module):
        self.freeze([pl_module.student[int(s)] for s in STAGES], train_bn=False)

    def finetune_function(self, pl_module, epoch, optimizer):
        for stage, at in STAGES.items():
            if epoch == at:
                self.unfreeze_and_add_param_group(pl_module.student[int(stage)], optimizer)


class Record(Callback):
    """In each rank: snapshots of the student per epoch; at the end, rank 0 writes the comparison."""

    def __init__(self, out: Path, val: TensorDataset, kl_logger: KLDivergenceLogger) -> None:
        self.out, self.val, self.kl_logger = out, val, kl_logger
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module):
        self.initial = {k: v.clone() for k, v in pl_module.student.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots.append({k: v.clone() for k, v in pl_module.student.state_dict().items()})

    def on_train_end(self, trainer, pl_module):  # after the last validation
        flat = torch.cat([t.detach().flatten().float() for t in pl_module.student.state_dict().values()])
        gathered = pl_module.all_gather(flat)  # (world, P): every parameter and buffer of each replica
        if trainer.global_rank != 0:
            return
        with torch.no_grad():  # the reference: the final networks on the whole validation set, in one process
            x, _ = self.val.tensors
            reference_kl = kl_divergence(pl_module.student.eval()(x), pl_module.teacher(x), 1.0).item()
        pl_module.student.train()
        stage_keys = {s: [k for k in self.initial if k.startswith(s + ".")] for s in [*STAGES, "2", "7"]}
        self.out.write_text(json.dumps({
            "world_size": gathered.shape[0],
            "max_rank_difference": (gathered[0] - gathered[1]).abs().max().item(),
            # per epoch, per stage: have the stage's parameters/buffers left their initial values?
            "moved": [{s: any(not torch.equal(snap[k], self.initial[k]) for k in keys)
                       for s, keys in stage_keys.items()} for snap in self.snapshots],
            "kl_val_kl_T1": trainer.callback_metrics["kl_val/kl_T1"].item(),
            "val_rows": self.kl_logger.last_val_stats["rows"].item(),
            "reference_kl_T1": reference_kl,
        }))


def _run_ddp(out: Path, naive: bool) -> dict:
    train, val = _data()
    pl.seed_everything(0)
    model = DistillationModule(student=nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                                     nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)),
                               teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10, optim=dict(lr=0.1, lr_scheduler="none"))  # SGD, momentum 0.9, weight decay 5e-4
    kl_logger = KLDivergenceLogger(log_every_n_steps=2)  # its per-step statistics are averaged over the ranks
    unfreezing = NaiveFinetuning() if naive else ProgressiveUnfreezing(STAGES, verbose=False)
    # a fixed version: the forked rank 0 writes the folder that this process reads afterwards
    logger = TensorBoardLogger(out.parent, name=out.stem, version=0, default_hp_metric=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=MAX_EPOCHS,
                         callbacks=[unfreezing, kl_logger, Record(out, val, kl_logger)], logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    results = json.loads(out.read_text())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    results["points"] = {tag: len(events.Scalars(tag)) for tag in ("kl_train/kl_T1", "kl_val/kl_T1")}
    return results


def test_ddp_unfreezing_keeps_ranks_identical(tmp_path):
    ours = _run_ddp(tmp_path / "ours.json", naive=False)
    assert ours["world_size"] == 2
    # bit-identical replicas (parameters and BatchNorm buffers) after both unfreezes
    assert ours["max_rank_difference"] == 0.0
    # the stages stayed still until their epoch and moved from it on; the head ("7") and the BatchNorm ("2",
    # not a stage) trained from the start
    assert len(ours["moved"]) == MAX_EPOCHS
    for epoch, moved in enumerate(ours["moved"]):
        for stage, at in STAGES.items():
            assert moved[stage] == (epoch >= at), (epoch, stage, moved)
        assert moved["7"] and moved["2"]

    # KLDivergenceLogger: the validation statistics cover both ranks' halves of the validation set
    assert ours["val_rows"] == VAL_ROWS
    assert ours["kl_val_kl_T1"] == pytest.approx(ours["reference_kl_T1"], rel=1e-5)
    # rank 0 wrote them: 3 epochs x 4 steps (64 rows per rank, batches of 16), every 2 steps; one per epoch
    assert ours["points"] == {"kl_train/kl_T1": 6, "kl_val/kl_T1": MAX_EPOCHS}

    # control: Lightning's requires_grad approach on the same run lets the replicas drift apart
    naive = _run_ddp(tmp_path / "naive.json", naive=True)
    assert naive["max_rank_difference"] > 1e-4
