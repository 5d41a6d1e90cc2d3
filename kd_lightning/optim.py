"""The optimizer and learning-rate schedule of a run: one recipe, its own config section.

In YAML it is the ``optim:`` section, beside ``model:`` and ``data:``, so a folder's ``base.yaml`` states the recipe
once and every run of the folder (teacher, KD student, scratch student) trains with it unless its file says
otherwise::

    optim:
      optimizer: adamw        # sgd | adamw | adam
      lr: 0.003
      weight_decay: 0.0001
      lr_scheduler: cosine    # none | cosine (per step, after warmup_epochs) | step | multistep

From Python: ``DistillationModule(..., optim=OptimizerRecipe("adamw", lr=3e-3))`` (or a dict of the same fields).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping, Sequence

import torch

OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULERS = ("none", "cosine", "step", "multistep")


@dataclass
class OptimizerRecipe:
    """An optimizer chosen by name, its settings, and the LR schedule.

    Args:
        optimizer: ``sgd`` (with ``momentum``, ``nesterov``), ``adamw`` or ``adam``.
        lr: the peak learning rate.
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) weight decay.
        lr_scheduler: ``none``; ``cosine``: per optimizer step over the whole run, after a linear warm-up of
            ``warmup_epochs``; ``step``: times ``gamma`` every ``step_size`` epochs; ``multistep``: times ``gamma`` at
            each epoch of ``milestones``.
    """

    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_scheduler: Literal["none", "cosine", "step", "multistep"] = "cosine"
    warmup_epochs: int = 0
    step_size: int = 30
    milestones: Sequence[int] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer: unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"optim.lr_scheduler: unknown schedule {self.lr_scheduler!r}; choose one of "
                             f"{', '.join(LR_SCHEDULERS)}.")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}.")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError(f"optim.weight_decay and optim.warmup_epochs must be >= 0, got {self.weight_decay} "
                             f"and {self.warmup_epochs}.")
        self.milestones = [int(m) for m in self.milestones]

    @classmethod
    def of(cls, value: "OptimizerRecipe | Mapping[str, Any] | None") -> "OptimizerRecipe":
        """``value`` as a recipe: itself, the defaults for None, or a mapping of its fields (as checkpoints keep
        it); an unknown field is an error that names the valid ones."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if hasattr(value, "as_dict"):  # a jsonargparse Namespace
            value = value.as_dict()
        if not isinstance(value, Mapping):
            raise ValueError(f"optim must be an OptimizerRecipe or a mapping of its fields, got {value!r}.")
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in value if k not in valid]
        if unknown:
            raise ValueError(f"optim: unknown setting(s) {unknown}; valid: {', '.join(valid)}.")
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def build(self, param_groups: list[dict[str, Any]], trainer: Any) -> Any:
        """What ``LightningModule.configure_optimizers`` returns for ``param_groups``; ``trainer`` gives the run's
        length (a per-step cosine needs the total number of optimizer steps)."""
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(param_groups, lr=self.lr, momentum=self.momentum,
                                  weight_decay=self.weight_decay, nesterov=self.nesterov)
        else:
            cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
            opt = cls(param_groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_scheduler == "none":
            return opt
        if self.lr_scheduler == "cosine":
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self._cosine(opt, trainer), "interval": "step"}}
        if self.lr_scheduler == "step":
            sched: Any = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_size, gamma=self.gamma)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.milestones), gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _cosine(self, opt: torch.optim.Optimizer, trainer: Any) -> Any:
        """Cosine decay per step over the whole run, after an optional linear warm-up measured in epochs."""
        if math.isinf(trainer.estimated_stepping_batches):
            raise ValueError("optim.lr_scheduler 'cosine' needs a finite run: set trainer.max_epochs or max_steps.")
        total = max(1, int(trainer.estimated_stepping_batches))
        warmup = 0
        if self.warmup_epochs > 0:  # the epoch length is needed only to measure the warm-up in epochs
            if trainer.train_dataloader is None:
                # Only in max_epochs=-1 runs (estimated_stepping_batches loads the loader in all others), and
                # Lightning has no public call to load it early: its fit loop's setup_data, in this one place
                # (pinned by tests/test_pinned_internals.py).
                trainer.fit_loop.setup_data()
            batches = trainer.num_training_batches
            steps_per_epoch = total if math.isinf(batches) else max(
                1, math.ceil(batches / trainer.accumulate_grad_batches))
            warmup = min(self.warmup_epochs * steps_per_epoch, total - 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup)
        if warmup == 0:
            return cosine
        return torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, warmup), cosine], [warmup])


# the names a config wrote in the model section before the recipe had its own (kd_lightning <= 0.1 configs)
MOVED_TO_OPTIM = tuple(f.name for f in fields(OptimizerRecipe))
