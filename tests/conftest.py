"""Shared fixtures: real digits checkpoints written by a few optimizer steps (for evaluate and export), and a
fake of torchvision's CIFAR-10 files (they need a download)."""

from __future__ import annotations

import os

# One CPU thread per test process: the networks are tiny (extra threads only synchronise) and `make test` runs one
# worker per core (pytest-xdist). Set before torch is imported, so subprocesses started by tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning import ClassifierModule, DistillationModule
from kd_lightning.data import DigitsDataModule

TEACHER_KWARGS = {"hidden": [64]}
STUDENT_KWARGS = {"hidden": [16]}


@dataclass(frozen=True)
class DigitsCheckpoints:
    teacher: Path  # ClassifierModule .ckpt: mlp {hidden: [64]}
    kd: Path  # DistillationModule .ckpt: student mlp {hidden: [16]}, teacher from `teacher`
    scratch: Path  # ClassifierModule .ckpt: mlp {hidden: [16]}
    student_state_dict: Path  # the KD student's weights as a plain state_dict (no architecture recorded)


@pytest.fixture(scope="session")
def digits_checkpoints(tmp_path_factory) -> DigitsCheckpoints:
    """Three runs of 20 optimizer steps on the bundled digits, saved as Lightning checkpoints (a few seconds)."""
    root = tmp_path_factory.mktemp("digits_checkpoints")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    optimizer = {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0}

    def fit(module: L.LightningModule, name: str) -> Path:
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_steps=20, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=root)
        trainer.fit(module, DigitsDataModule(batch_size=64))
        path = root / f"{name}.ckpt"
        trainer.save_checkpoint(path)
        return path

    teacher = fit(ClassifierModule("mlp", 10, model_kwargs=TEACHER_KWARGS, optim=optimizer), "teacher")
    kd_module = DistillationModule(student="mlp", student_kwargs=STUDENT_KWARGS, teacher="mlp",
                                   teacher_kwargs=TEACHER_KWARGS, teacher_checkpoint=str(teacher), num_classes=10,
                                   optim=optimizer)
    kd = fit(kd_module, "kd")
    scratch = fit(ClassifierModule("mlp", 10, model_kwargs=STUDENT_KWARGS, optim=optimizer), "scratch")
    state_dict = root / "student_state_dict.pt"
    torch.save(kd_module.student.state_dict(), state_dict)
    return DigitsCheckpoints(teacher, kd, scratch, state_dict)


@pytest.fixture
def fake_torchvision_cifar10(monkeypatch):
    """``fake(root, train_rows, test_rows)``: ``CIFARDataModule(root)`` in torchvision mode reads random uint8
    arrays of that many rows (labels ``i % 10``) instead of torchvision's downloaded files."""
    import numpy as np

    from kd_lightning.data import CIFARDataModule

    def fake(root: Path, train_rows: int, test_rows: int) -> None:
        class FakeCIFAR10:
            def __init__(self, root, train, download=False):
                n = train_rows if train else test_rows
                self.data = np.random.default_rng(int(train)).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
                self.targets = [i % 10 for i in range(n)]

        (Path(root) / "cifar-10-batches-py").mkdir(exist_ok=True)
        monkeypatch.setattr(CIFARDataModule, "_torchvision_class", lambda self: FakeCIFAR10)

    return fake
