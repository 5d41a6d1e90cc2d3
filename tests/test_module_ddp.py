"""Two-process CPU DDP (gloo, forked): the frozen teacher is kept out of DistributedDataParallel entirely and
stays bit-identical; the student replicas stay identical. Rank 0 writes what it saw to a file checked here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import DistillationModule

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="needs fork and torch.distributed (gloo)")


class Report(Callback):
    def __init__(self, out: Path, teacher_before: dict[str, torch.Tensor]) -> None:
        self.out, self.teacher_before, self.teacher_modes = out, teacher_before, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.teacher_modes.append(any(m.training for m in pl_module.teacher.modules()))

    def on_train_end(self, trainer, pl_module):
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper
        student = torch.cat([p.detach().flatten() for p in pl_module.student.state_dict().values()])
        gathered = trainer.strategy.all_gather(student)  # (world, N)
        teacher_same = all(torch.equal(v, self.teacher_before[k]) for k, v in pl_module.teacher.state_dict().items())
        if trainer.is_global_zero:
            self.out.write_text(json.dumps({
                "world_size": trainer.world_size,
                "ddp_type": type(ddp).__name__,
                "ignored": sorted(ddp.parameters_to_ignore),
                "reduced_names": [n for n, p in ddp.module.named_parameters() if p.requires_grad],
                "student_rank_difference": (gathered[0] - gathered[1]).abs().max().item(),
                "teacher_bit_identical": teacher_same,
                "teacher_ever_training": any(self.teacher_modes),
            }))


# compile_student: the compiled student (torch.compile's "eager" backend: traced by dynamo, not optimised) holds no
# parameters of its own, so DDP reduces the plain student's gradients and the replicas stay identical
@pytest.mark.parametrize("compile_student", [False, {"backend": "eager"}], ids=["plain", "compiled"])
def test_teacher_is_outside_ddp_and_frozen(tmp_path, compile_student):
    pl.seed_everything(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    module = DistillationModule(student=student, teacher=teacher, num_classes=4, optim=dict(lr=0.1),
                                compile_student=compile_student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen))
    out = tmp_path / "report.json"
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Report(out, before)])
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8))
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["ddp_type"] == "DistributedDataParallel"
    assert report["ignored"] == sorted(f"teacher.{k}" for k in before)  # weights and BatchNorm buffers
    assert report["reduced_names"] and all(n.startswith("student.") for n in report["reduced_names"])
    assert report["student_rank_difference"] == 0.0
    assert report["teacher_bit_identical"] and not report["teacher_ever_training"]
