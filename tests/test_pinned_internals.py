"""The private Lightning and torch names kd_lightning relies on where no public way exists, one test each.

Each is used in exactly one place (named below). When an upgrade renames or removes one, this file fails with the
name and the place to mend, instead of an AttributeError deep inside a run.
"""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd_lightning import ClassifierModule, DistillationModule
from kd_lightning.callbacks import KLDivergenceLogger
from kd_lightning.data import DigitsDataModule


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def test_ddp_ignores_the_teacher():
    """kd_lightning/core.py (Distiller.__init__): DDP must neither broadcast nor reduce the frozen
    teacher; torch's only way is ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, which
    records the names on the module for DDP to read when it wraps it."""
    assert hasattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model"), (
        "torch removed DistributedDataParallel._set_params_and_buffers_to_ignore_for_model: mend "
        "Distiller.__init__ (kd_lightning/core.py)")
    module = DistillationModule(student=_mlp(8), teacher=_mlp(16))
    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    teacher_names = {f"teacher.{name}" for name in module.teacher.state_dict()}
    assert teacher_names and ignored == teacher_names
    assert not any(name.startswith("student.") for name in ignored)


def test_lightning_cli_reads_the_checkpoint_in_parse_ckpt_path():
    """kd_lightning/commands/cli.py (KDLightningCLI._parse_ckpt_path): the hook where LightningCLI reads --ckpt_path and
    merges its hyperparameters; we check the checkpoint against the config before it does."""
    hook = getattr(LightningCLI, "_parse_ckpt_path", None)
    assert callable(hook), "LightningCLI._parse_ckpt_path is gone: mend KDLightningCLI (kd_lightning/commands/cli.py)"
    assert list(inspect.signature(hook).parameters) == ["self"]
    assert "ckpt_path" in inspect.getsource(hook)


def test_fit_loop_internals_the_module_and_the_kl_logger_read(tmp_path):
    """kd_lightning/optim.py (OptimizerRecipe, cosine warm-up under max_epochs=-1): ``fit_loop.setup_data``
    loads the training loader early; kd_lightning/log_steps.py (logging_step, read by the module's logging and the
    KL logger): ``fit_loop.epoch_loop._batches_that_stepped`` is the step axis of Lightning's own logged metrics."""
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.fit_loop.epoch_loop._batches_that_stepped, trainer.global_step))

    assert callable(getattr(L.Trainer(logger=False).fit_loop, "setup_data", None)), (
        "Lightning's fit loop has no setup_data: mend OptimizerRecipe._cosine (kd_lightning/optim.py)")
    torch.manual_seed(0)
    module = ClassifierModule(_mlp(8), 10, optim=dict(optimizer="sgd", lr=0.1, lr_scheduler="cosine", warmup_epochs=1))
    trainer = L.Trainer(max_epochs=-1, max_steps=5, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Probe()], default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(batch_size=64))
    # One optimizer, a step every batch: at batch end, Lightning's logging step still counts the batches before
    # this one (0, 1, ...) while global_step already counts this batch's optimizer step (1, 2, ...).
    assert seen == [(i - 1, i) for i in range(1, 6)]
    assert KLDivergenceLogger._step(trainer) == 5


def test_submitit_renders_an_sbatch_script_without_submitting(tmp_path):
    """kd_lightning/commands/study/slurm.py (SlurmLauncher._print_script, ``--dry-run``): submitit's only way to
    render a job's sbatch script without submitting it is ``submitit.slurm.slurm._make_sbatch_string``."""
    pytest.importorskip("submitit")
    from submitit.slurm import slurm

    from kd_lightning.commands.study.slurm import sbatch_parameters

    render = getattr(slurm, "_make_sbatch_string", None)
    assert callable(render), ("submitit removed submitit.slurm.slurm._make_sbatch_string: mend "
                              "SlurmLauncher._print_script (kd_lightning/commands/study/slurm.py)")
    params = sbatch_parameters({"gpus": 2, "cpus": 8, "mem": "32G", "time": "01:30:00", "partition": "gpu",
                                "sbatch": ["--mail-type=END"], "setup": ["source .venv/bin/activate"]}, "kd-seed0")
    params["dependency"] = "afterok:123"
    script = render(command="python -m submitit.core._submit x", folder=tmp_path, **params)
    for line in ("#SBATCH --job-name=kd-seed0", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --time=90", "#SBATCH --partition=gpu",
                 "#SBATCH --dependency=afterok:123", "#SBATCH --requeue", "#SBATCH --mail-type=END",
                 "#SBATCH --signal=USR1@120", "source .venv/bin/activate"):
        assert line in script, line
    assert "USR2" not in script  # submitit's own requeue signal, replaced by Lightning's
