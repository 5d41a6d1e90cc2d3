r"""
ProgressiveUnfreezing
^^^^^^^^^^^^^^^^^^^^^

Freezes stages of the student (named by module path: ``layer1``, ``features.0``, ``net.1``) and unfreezes
each one at its own epoch -- "freeze the teacher, unfreeze the student's layers progressively".

Why not ``requires_grad``
-------------------------
Lightning's ``BaseFinetuning`` / ``BackboneFinetuning`` freeze with ``requires_grad_(False)`` and unfreeze by
flipping it back and adding a param group. Under DDP that silently breaks training: DDP registers its
gradient all-reduce hooks only for the parameters that required grad when the model was wrapped, so a
parameter unfrozen later gets each rank's *local* gradient, every rank takes a different step, and the
replicas drift apart (Lightning issue #20340).

This callback never changes ``requires_grad``. Every student parameter stays trainable, in the optimizer
from the start, and in every DDP all-reduce, so the replicas can never diverge. A frozen stage is held still
in two places instead:

1. **Optimizer**: in ``on_before_optimizer_step`` -- after ``backward`` and hence after DDP's gradient
   all-reduce, before gradient clipping and ``optimizer.step()`` -- the gradients of frozen parameters are
   set to ``None``. Every ``torch.optim`` optimizer skips a parameter whose ``.grad`` is ``None``: no
   update, no weight decay (SGD and AdamW apply it only to parameters with a gradient), no momentum or Adam
   moment update. A frozen parameter is therefore bit-identical until its epoch, and its optimizer state
   does not exist yet when it is unfrozen: its first step starts from fresh momentum / Adam moments with
   Adam's bias correction at step 1, exactly as for a parameter group added at that moment. (Optimizer
   state left over for a frozen parameter, e.g. by a checkpoint from another setup, is dropped at train
   start for the same reason.)
2. **Module mode**: a frozen stage runs in ``eval()`` mode, so BatchNorm running statistics (buffers, not
   parameters) stay fixed and Dropout is off, as for a frozen feature extractor. The mode is re-applied
   before every training batch, because validation restores modes and a user hook may call ``train()``.

The frozen set is a function of the epoch (identical on every rank) and of the stages already unfrozen,
which are checkpointed: a run resumed in the middle of the schedule never re-freezes a stage that was
already unfrozen, even if the schedule in the config was changed.

Cost: gradients are still computed for frozen stages (that is what keeps DDP's all-reduce complete); with
early stages frozen, backward runs through them although their gradients are thrown away.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override


def student_of(pl_module: "pl.LightningModule") -> nn.Module:
    """The trained network: ``pl_module.network`` (a DistillationModule's student, a ClassifierModule's model), or
    the LightningModule itself for other modules."""
    network = getattr(pl_module, "network", None)
    return network if isinstance(network, nn.Module) else pl_module


def _module_names(root: nn.Module, max_depth: int = 2) -> list[str]:
    """Module paths under ``root`` with at most ``max_depth`` components (``layer1``, ``layer1.0``)."""
    return [name for name, _ in root.named_modules() if name and name.count(".") < max_depth]


class ProgressiveUnfreezing(Callback):
    r"""Keeps student stages frozen until their epoch; correct under DDP (see the module docstring).

    Stage ``s`` with ``unfreeze_at[s] = e`` is frozen during epochs ``0 .. e-1`` and trainable from epoch
    ``e`` on. Parts of the student that are not listed train from the start.

    Example (the ``mlp`` student: ``net.1``, ``net.3`` ... are its Linear layers)::

        ProgressiveUnfreezing(unfreeze_at={"net.1": 4, "net.3": 2})  # the head trains from epoch 0

    Args:
        unfreeze_at: module path (relative to the student, ``pl_module.network``) -> the epoch at
            which it becomes trainable. Paths are checked at fit start against the real module tree; two
            paths may not contain each other.
        verbose: log each unfreezing (rank 0).
    """

    def __init__(self, unfreeze_at: dict[str, int], verbose: bool = True) -> None:
        super().__init__()
        if not isinstance(unfreeze_at, dict) or not unfreeze_at:
            raise ValueError("unfreeze_at must be a non-empty mapping of module path -> epoch, e.g. "
                             "{'layer1': 10, 'layer2': 5}.")
        for path, epoch in unfreeze_at.items():
            if not isinstance(path, str) or not path or not all(path.split(".")):
                raise ValueError(f"Stage names are module paths such as 'layer1' or 'features.0', got {path!r}.")
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"The unfreeze epoch of {path!r} must be an int >= 0, got {epoch!r}.")
        paths = sorted(unfreeze_at)
        for a in paths:
            for b in paths:
                if a != b and b.startswith(a + "."):
                    raise ValueError(f"Stages {a!r} and {b!r} overlap ({b!r} is inside {a!r}); list each "
                                     "module in one stage only.")
        self.unfreeze_at = dict(unfreeze_at)
        self.verbose = verbose
        self._unfrozen: set[str] = set()  # stages unfrozen so far; checkpointed
        self._frozen_params: list[nn.Parameter] = []
        self._frozen_modules: list[nn.Module] = []

    # -- state --------------------------------------------------------------------------------------------
    @property
    def frozen_stages(self) -> list[str]:
        """The stages frozen now, sorted by unfreeze epoch."""
        return [s for s in sorted(self.unfreeze_at, key=lambda s: (self.unfreeze_at[s], s))
                if s not in self._unfrozen]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": sorted(self._unfrozen)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._unfrozen = set(state_dict["unfrozen"])

    # -- checks -------------------------------------------------------------------------------------------
    def _stage_modules(self, pl_module: "pl.LightningModule") -> dict[str, nn.Module]:
        student = student_of(pl_module)
        modules = {}
        for path in self.unfreeze_at:
            try:
                module = student.get_submodule(path)
            except AttributeError:
                names = _module_names(student)
                raise ValueError(
                    f"ProgressiveUnfreezing: the student ({type(student).__name__}) has no module {path!r}. Its "
                    f"modules are: {', '.join(names)}" + (" (and deeper paths inside them)." if any(
                        n.count(".") >= 2 for n, _ in student.named_modules()) else ".")) from None
            if next(module.parameters(), None) is None:
                raise ValueError(f"ProgressiveUnfreezing: the student's module {path!r} "
                                 f"({type(module).__name__}) has no parameters; there is nothing to freeze.")
            modules[path] = module
        return modules

    def check_settings(self, pl_module: "pl.LightningModule", datamodule: Any = None, stage: str = "fit") -> None:
        """A clear error naming the student's modules when a stage is not one of them (the ``kd-lightning``
        command calls it before anything is written; ``setup`` again)."""
        if stage == "fit":
            self._stage_modules(pl_module)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self.check_settings(pl_module, trainer.datamodule)

    def describe_for_hparams(self) -> dict[str, Any]:
        return {"schedule/unfreeze_at": str(self.unfreeze_at)}

    # -- freezing -----------------------------------------------------------------------------------------
    def _update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Unfreeze the stages whose epoch has come; refresh the frozen parameter/module lists."""
        epoch = trainer.current_epoch
        modules = self._stage_modules(pl_module)
        for path in self.frozen_stages:
            if self.unfreeze_at[path] <= epoch:
                self._unfrozen.add(path)
                modules[path].train(pl_module.training)
                if self.verbose:
                    rank_zero_info(f"ProgressiveUnfreezing: epoch {epoch}: unfroze {path!r}.")
        self._frozen_modules = [modules[path] for path in self.frozen_stages]
        self._frozen_params = [p for m in self._frozen_modules for p in m.parameters()]
        self._hold_modes()

    def _hold_modes(self) -> None:
        for module in self._frozen_modules:
            if module.training:
                module.eval()  # BatchNorm statistics fixed, Dropout off

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # after checkpoint restore: current_epoch, optimizer state and our `_unfrozen` are those of the resume
        self._update(trainer, pl_module)
        frozen = {id(p) for p in self._frozen_params}
        for optimizer in trainer.optimizers:
            for p in [p for p in optimizer.state if id(p) in frozen]:
                del optimizer.state[p]  # unfrozen later, they start from fresh optimizer state

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._update(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._hold_modes()

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: Optimizer) -> None:
        # Gradients are already all-reduced across DDP ranks here (that happens during backward), so dropping
        # them is the same decision on every rank. A None grad makes torch.optim skip the parameter entirely.
        for p in self._frozen_params:
            p.grad = None

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # leave the student as a plain module: no stage stuck in eval mode for whatever runs next
        for module in self._frozen_modules:
            module.train(pl_module.training)
        self._frozen_modules, self._frozen_params = [], []
