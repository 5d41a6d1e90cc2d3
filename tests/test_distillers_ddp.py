"""A feature term under two-process CPU DDP (gloo, forked) trains the student and its adapter exactly as one
process does on the same global batches: gradients of the adapter are reduced like the student's. (The adapter
has no BatchNorm here: per-process batch statistics would differ, and CPU DDP has no SyncBatchNorm.)"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from kd_lightning import DistillationModule
from kd_lightning.distillers import AttentionTransfer, CrossEntropy, Hint, HintonKD

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="needs fork and torch.distributed (gloo)")


class Interleaved(Sampler):
    """Rows rank, rank + world, ... in order (resolved when iterated, inside the DDP process): each step of the
    two-process run sees the 16 rows that one step of the one-process run sees."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _world(self) -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // self._world()[1]


class Save(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.out)


def _run(tmp_path: Path, devices: int, batch_size: int) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    conv = lambda c: nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c * 64, 4))
    student, teacher = conv(3), conv(6)
    terms = [CrossEntropy(weight=0.5), HintonKD(weight=0.5, temperature=2.0),
             Hint(student_layer="1", teacher_layer="1", weight=1.0, batchnorm=False),
             AttentionTransfer(student_layers=["0"], teacher_layers=["0"], weight=10.0)]
    module = DistillationModule(student=student, teacher=teacher, num_classes=4, optim=dict(lr=0.1, lr_scheduler="none", weight_decay=0.0), terms=terms)
    module.build_terms((1, 8, 8))
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen))
    out = tmp_path / f"state_{devices}.pt"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                         max_steps=4, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Save(out)])
    trainer.fit(module, DataLoader(data, batch_size=batch_size, sampler=Interleaved(len(data))))
    return torch.load(out, weights_only=True)


def test_feature_term_under_ddp_equals_one_process(tmp_path):
    two = _run(tmp_path, devices=2, batch_size=8)  # each step: rows 0, 2, .. on rank 0 and 1, 3, .. on rank 1
    one = _run(tmp_path, devices=1, batch_size=16)  # the same 16 rows in one process
    assert any(k.startswith("terms.hint.adapter.") for k in one)
    assert set(one) == set(two)
    for key in one:
        assert torch.allclose(one[key].float(), two[key].float(), atol=1e-5), key
