"""LightningModules: ``DistillationModule`` (frozen teacher -> trainable student) and ``ClassifierModule``
(one network on hard labels: a teacher, or the scratch-student baseline). Both share optimizer settings,
metrics and logging, so a KD student and its scratch baseline are measured the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Literal, Mapping, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.data.batch import as_batch
from kd_lightning.distillers import DistillationTerm, StepOutputs, legacy_terms
from kd_lightning.losses import hard_loss, kl_divergence
from kd_lightning.metrics import DistillationStats, step_statistics
from kd_lightning.models.loading import load_model
from kd_lightning.seeding import derive_seed, run_seed

IGNORE_INDEX = -100  # the label of an unlabelled row (cross-entropy's ignore_index)
# teacher_precision -> the autocast dtype of the teacher's forward pass (None: no autocast of its own)
TEACHER_PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def as_heads(output: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A network's output as a list of logits, main head first (GoogLeNet gives (main, aux2, aux1))."""
    return [output] if isinstance(output, Tensor) else list(output)


@contextmanager
def capture_features(network: nn.Module, layers: Sequence[str], into: dict[str, Tensor]) -> Iterator[None]:
    """Forward hooks on ``network``'s submodules ``layers`` that store each one's output in ``into[name]`` during
    the forward passes run inside the block (the same passes that give the logits); removed on exit."""
    modules = dict(network.named_modules())
    handles = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            into[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    try:
        for name in dict.fromkeys(layers):
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_layer_names(network: nn.Module, layers: Sequence[str], role: str, term: str) -> None:
    """A clear error naming the valid layers when ``network`` has no submodule called one of ``layers``."""
    valid = [name for name, _ in network.named_modules() if name]
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise ValueError(f"The distillation term {term!r} taps the {role} layer(s) {unknown}, but the {role} "
                         f"({type(network).__name__}) has no such submodule. Valid layer names: {', '.join(valid)}.")


def count_outputs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Width of ``model``'s main head on a zero batch of ``input_shape``; its train/eval mode is restored."""
    was_training = model.training
    model.eval()  # no BatchNorm statistics may move
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            x = torch.zeros(2, *input_shape, device=None if param is None else param.device)
            return as_heads(model(x))[0].shape[-1]
    finally:
        model.train(was_training)


def compile_options(value: bool | Mapping[str, Any] | None, arg: str) -> dict[str, Any] | None:
    """``compile_student``/``compile_model`` as ``torch.compile`` keyword arguments: ``False`` -> None (no
    compilation), ``True`` -> ``{}`` (torch's defaults: the inductor backend), a mapping -> its items, checked
    against ``torch.compile``'s own parameters so that a typo is an error at construction, not at the first step."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, Mapping):
        raise ValueError(f"{arg} must be true, false or a dict of torch.compile arguments (e.g. "
                         f"{{mode: max-autotune}}), got {value!r}.")
    valid = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = [key for key in value if key not in valid]
    if unknown:
        raise ValueError(f"{arg}: {unknown} are not torch.compile arguments; valid: {', '.join(valid)}.")
    return dict(value)


def flat_hparams(params: Any, prefix: str = "") -> dict[str, Any]:
    """Hyperparameters as TensorBoard's HPARAMS tab takes them: nested dicts (and lists of dicts, such as
    ``terms``) flattened to ``a/b/c`` keys, values kept when int/float/bool/str, else written as text."""
    if hasattr(params, "as_dict"):  # a jsonargparse Namespace
        params = params.as_dict()
    out: dict[str, Any] = {}
    items = params.items() if isinstance(params, dict) else enumerate(params)
    for key, value in items:
        name = f"{prefix}{key}"
        if hasattr(value, "as_dict"):
            value = value.as_dict()
        if isinstance(value, dict) or (isinstance(value, (list, tuple)) and value
                                       and all(isinstance(v, dict) or hasattr(v, "as_dict") for v in value)):
            out.update(flat_hparams(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, Tensor) and value.numel() == 1:
            out[name] = value.item()
        else:
            out[name] = str(value)
    return out


def head_width(network: nn.Module) -> int | None:
    """The output width of ``network``'s last ``nn.Linear`` (its classifier head), or None when it has none."""
    last = None
    for module in network.modules():
        if isinstance(module, nn.Linear):
            last = module
    return None if last is None else last.out_features


class _TrainableModule(LightningModule):
    """Optimizer and LR schedule chosen by name (YAML-friendly, flat in TensorBoard's HPARAMS), and metrics."""

    def __init__(self, num_classes: int | None, optimizer: Literal["sgd", "adamw", "adam"], lr: float,
                 momentum: float, weight_decay: float, nesterov: bool,
                 lr_scheduler: Literal["none", "cosine", "step", "multistep"], warmup_epochs: int,
                 step_size: int, milestones: Sequence[int], gamma: float) -> None:
        super().__init__()
        if num_classes is None or num_classes < 1:
            raise ValueError("num_classes is required (a positive int); under `kd-lightning` it comes from the "
                             f"DataModule's num_classes. Got {num_classes!r}.")
        if optimizer not in ("sgd", "adamw", "adam"):
            raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of 'sgd', 'adamw', 'adam'.")
        if lr_scheduler not in ("none", "cosine", "step", "multistep"):
            raise ValueError(f"Unknown lr_scheduler {lr_scheduler!r}; choose one of "
                             "'none', 'cosine', 'step', 'multistep'.")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        self.num_classes = num_classes
        self._channels_last = False
        self._compile_kwargs: dict[str, Any] | None = None
        # (network, its torch.compile wrapper), made at the first step. A plain tuple, not an attribute holding the
        # wrapper: torch.compile returns an nn.Module, which would register as a child and add `_orig_mod.` keys to
        # state_dict() and second names for the same parameters. The wrapper shares the network's parameters,
        # so the optimizer and DDP (which wraps this LightningModule) see and reduce them once, as usual.
        self._compiled: tuple[nn.Module, Callable[..., Any]] | None = None

    # -- GPU paths: channels_last memory format, torch.compile ------------------------------------------------
    def _set_gpu_paths(self, channels_last: bool, compile_value: bool | Mapping[str, Any] | None,
                       compile_arg: str) -> None:
        """Validate and keep ``channels_last`` and the ``torch.compile`` arguments of the trainable network."""
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {channels_last!r}.")
        self._channels_last = channels_last
        self._compile_kwargs = compile_options(compile_value, compile_arg)

    def prepare_input(self, x: Tensor) -> Tensor:
        """The step's images in the networks' memory format: channels_last for 4-D inputs when asked (a copy in
        another layout: same values), else ``x`` itself."""
        if self._channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def run_trainable(self, x: Tensor) -> Any:
        """The trainable network's output on ``x`` in the training/validation/test steps: through its
        ``torch.compile`` wrapper when compilation is on (made here, at the first call, and remade if the network
        was replaced), else the plain network. ``forward``, exports and evaluation use the plain network."""
        if self._compile_kwargs is None:
            return self.trainable_module()(x)
        network = self.trainable_module()
        if self._compiled is None or self._compiled[0] is not network:
            self._compiled = (network, torch.compile(network, **self._compile_kwargs))
        return self._compiled[1](x)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_compiled"] = None  # compiled code does not pickle; it is remade at the next step
        return state

    # -- optimization -------------------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [{"params": [p for p in self.trainable_module().parameters() if p.requires_grad]},
                  *self.extra_param_groups()]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=hp.nesterov)
        else:
            cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            opt = cls(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_scheduler == "none":
            return opt
        if hp.lr_scheduler == "cosine":  # per step, over the whole run, after an optional linear warm-up
            if math.isinf(self.trainer.estimated_stepping_batches):
                raise ValueError("lr_scheduler 'cosine' needs a finite run: set trainer.max_epochs or max_steps.")
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warmup = 0
            if hp.warmup_epochs > 0:  # the epoch length is needed only to measure the warm-up in epochs
                if self.trainer.train_dataloader is None:
                    # Only in max_epochs=-1 runs (estimated_stepping_batches loads the loader in all others), and
                    # Lightning has no public call to load it early: its fit loop's setup_data, in this one place
                    # (pinned by tests/test_pinned_internals.py).
                    self.trainer.fit_loop.setup_data()
                batches = self.trainer.num_training_batches
                steps_per_epoch = total if math.isinf(batches) else max(
                    1, math.ceil(batches / self.trainer.accumulate_grad_batches))
                warmup = min(hp.warmup_epochs * steps_per_epoch, total - 1)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup)
            sched = cosine if warmup == 0 else torch.optim.lr_scheduler.SequentialLR(
                opt, [torch.optim.lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, warmup), cosine], [warmup])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.lr_scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.gamma)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups trained beside the network (a DistillationModule's adapters); none by default."""
        return []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout and any other draw of the step come from a generator seeded by the step's position (see
        # kd_lightning.seeding): a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
        torch.manual_seed(derive_seed(run_seed(), "step", self.global_rank, self.current_epoch, batch_idx))

    # -- metrics --------------------------------------------------------------------------------------------
    def _make_metrics(self, teacher: bool) -> nn.ModuleDict:
        def collection() -> MetricCollection:
            metrics: dict[str, Any] = {"acc": MulticlassAccuracy(self.num_classes, average="micro",
                                                                 ignore_index=IGNORE_INDEX)}
            if teacher:
                metrics["teacher_acc"] = MulticlassAccuracy(self.num_classes, average="micro",
                                                            ignore_index=IGNORE_INDEX)
                metrics["agreement"] = MulticlassAccuracy(self.num_classes, average="micro")
                metrics["kl"] = MeanMetric()
            return MetricCollection(metrics, compute_groups=False)

        return nn.ModuleDict({"val": collection(), "test": collection()})

    def _log_epoch_metrics(self, stage: str) -> None:
        """Compute (reduced across DDP ranks by torchmetrics), log as ``<stage>/<name>``, reset."""
        collection = self.metrics[stage]
        if not collection["acc"].update_called:
            return
        # already reduced by torchmetrics; sync_dist only re-averages equal values and keeps Lightning quiet
        self.log_dict({f"{stage}/{name}": value for name, value in collection.compute().items()}, sync_dist=True)
        collection.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def on_fit_start(self) -> None:
        # TensorBoard's HPARAMS tab: declare which scalar tags are the metrics to compare runs by. Writing the
        # hparams summary directly (as TensorBoardLogger does inside) adds no fake metric points at step 0.
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                names = [f"{stage}/{name}" for stage in ("val", "test") for name in self.metrics[stage]]
                params = flat_hparams(dict(self.hparams))
                writer = logger.experiment.file_writer  # SummaryWriter's event file writer (public attribute)
                for summary in hparams_summary(params, {name: math.nan for name in names}):
                    writer.add_summary(summary)

    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        """Run each network on a zero batch of ``input_shape``: a clear error before training, not mid-epoch."""
        for role, net in self.named_networks().items():
            try:
                width = count_outputs(net, input_shape)
            except RuntimeError as err:
                raise ValueError(f"The {role} ({type(net).__name__}) cannot run on inputs of shape "
                                 f"{tuple(input_shape)} (channels, height, width): {err}. Is the image size too "
                                 "small for this model, or the channel count wrong?") from err
            if width != self.num_classes:
                raise ValueError(f"The {role} gives {width} class scores but the data has {self.num_classes} "
                                 "classes: teacher, student and data must agree on the class count.")

    def named_networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        input_shape = getattr(self.trainer.datamodule, "input_shape", None) if self._trainer else None
        if input_shape is not None:
            self.check_input_shape(input_shape)
            self.example_input_array = torch.zeros(1, *input_shape)  # in/out sizes and FLOPs in ModelSummary
        if self._channels_last:
            # For the trainer's run only (undone in teardown): the 4-D weights change layout, not value, so
            # state_dict() keys and values are the same and a module out of a trainer is in the default layout.
            self.to(memory_format=torch.channels_last)

    def teardown(self, stage: str) -> None:
        if self._channels_last:
            self.to(memory_format=torch.contiguous_format)


class ClassifierModule(_TrainableModule):
    """Trains one network on hard labels: a teacher for distillation, or the scratch-student baseline.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` and ``test/acc``. For a multi-head network the loss is
    ``sum_i head_weights[i] * CE(head_i)`` (GoogLeNet: 1, 0.3, 0.3); metrics use the main head. Unlabelled
    rows (label -100) are ignored.

    Args:
        model: a zoo name (see ``kd_lightning.models.MODELS``) or an ``nn.Module``.
        num_classes: number of classes (linked from the DataModule by the CLI).
        model_kwargs: extra arguments of the zoo builder.
        pretrained: start from torchvision's ImageNet weights (fine-tuning; needs internet once).
        checkpoint: start from these weights (a Lightning .ckpt or a state_dict file).
        channels_last: run the network and 4-D images in ``torch.channels_last`` memory format (faster
            convolutions on recent GPUs under mixed precision); checkpoints are unchanged.
        compile_model: ``torch.compile`` the network for the training/validation/test steps: ``true`` (the
            default inductor backend) or a dict of ``torch.compile`` arguments (e.g. ``{mode: max-autotune}``).
            Checkpoint keys are unchanged (no ``_orig_mod.``) and ``module.model`` stays the plain network.
    """

    def __init__(self, model: str | nn.Module = "resnet18", num_classes: int | None = None,
                 model_kwargs: dict[str, Any] | None = None, pretrained: bool = False,
                 checkpoint: str | None = None, head_weights: list[float] | None = None,
                 label_smoothing: float = 0.0,
                 optimizer: Literal["sgd", "adamw", "adam"] = "sgd", lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = False,
                 lr_scheduler: Literal["none", "cosine", "step", "multistep"] = "cosine", warmup_epochs: int = 0,
                 step_size: int = 30, milestones: Sequence[int] = (), gamma: float = 0.1,
                 channels_last: bool = False, compile_model: bool | dict[str, Any] = False) -> None:
        super().__init__(num_classes, optimizer, lr, momentum, weight_decay, nesterov, lr_scheduler,
                         warmup_epochs, step_size, milestones, gamma)
        self._set_gpu_paths(channels_last, compile_model, "compile_model")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model = model if isinstance(model, nn.Module) else load_model(
            model, num_classes, checkpoint=checkpoint, pretrained=pretrained, **(model_kwargs or {}))
        self.head_weights = head_weights
        self.label_smoothing = label_smoothing
        self.metrics = self._make_metrics(teacher=False)

    def trainable_module(self) -> nn.Module:
        return self.model

    def named_networks(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def forward(self, x: Tensor) -> Tensor:
        return as_heads(self.model(x))[0]

    def _loss(self, heads: list[Tensor], y: Tensor) -> Tensor:
        weights = self.head_weights or [1.0] + [0.3] * (len(heads) - 1)
        if self.label_smoothing and y.ndim == 1:
            return sum(w * nn.functional.cross_entropy(h.float(), y, ignore_index=IGNORE_INDEX,
                                                       label_smoothing=self.label_smoothing)
                       for w, h in zip(weights, heads))
        return sum(w * hard_loss(h, y, IGNORE_INDEX) for w, h in zip(weights, heads))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.prepare_input(batch[0]), batch[1]
        loss = self._loss(as_heads(self.run_trainable(x)), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y = self.prepare_input(batch[0]), batch[1]
        heads = as_heads(self.run_trainable(x))
        self.log(f"{stage}/loss", self._loss(heads, y), sync_dist=True)
        self.metrics[stage]["acc"].update(heads[0], y)
        return heads[0]

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")


class DistillationModule(_TrainableModule):
    r"""Knowledge distillation: a frozen teacher teaches a trainable student.

    The loss is a weighted sum of ``terms`` (:mod:`kd_lightning.distillers`: Hinton KD, FitNets hints, attention
    transfer, DKD, cross-entropy, ...): ``loss = sum_i weight_i * term_i``. Without ``terms``, ``temperature`` and
    ``alpha`` mean one Hinton term and the hard term (Hinton et al., 2015):
    ``loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, exactly as
    :func:`kd_lightning.losses.distillation_loss`.

    Terms that tap layers (``student_layers``/``teacher_layers``, names as in ``named_modules()``, e.g.
    ``stages.1`` or ``features.4``) get those layers' outputs from forward hooks during the same forward passes
    that give the logits. Unknown layer names are an error at construction, listing the valid names. Adapters
    (a hint's 1x1 conv + BN) are built from a dry run on a zero batch of the data's input shape
    (:meth:`build_terms`, called at setup), trained in their own parameter group, saved in checkpoints and
    restored on resume; they live in ``terms``, never in ``student``, so exports of the student exclude them.

    The teacher is frozen (``requires_grad_(False)``), kept in eval mode for the whole fit (``train()`` cannot
    switch it back), run under ``torch.no_grad()``, left out of the optimizer and **left out of checkpoints**:
    ``state_dict()`` holds the student only, and on resume the teacher is rebuilt from its own weights.
    ``temperature`` and ``alpha`` are attributes that callbacks may change during training (they read and write
    the Hinton term's temperature and the two terms' weights); with ``terms``, schedule a term's float by its
    dotted name, e.g. ``terms.kd.temperature`` or ``terms.hint.weight``.

    Logs ``train/loss``, ``train/loss_<name>`` for each term's weighted value (they add up to the loss) and
    ``train/temperature`` when a term has one; without ``terms`` also ``train/{kd,ce}`` (unweighted, as before);
    ``val/`` and ``test/`` the same losses and ``{acc,teacher_acc,agreement,kl}``
    where ``acc`` is the student's top-1, ``agreement`` the fraction of rows where student and teacher top-1
    agree and ``kl`` the mean KL(teacher || student) at T=1 (comparable across runs whatever their temperature).

    Args:
        student: zoo name or ``nn.Module``.
        teacher: zoo name or ``nn.Module`` (used as given: load its weights yourself).
        num_classes: number of classes (linked from the DataModule by the CLI); when the teacher is given as an
            ``nn.Module`` it may be left out: the width of the teacher's last linear layer.
        teacher_checkpoint: the teacher's weights: a ClassifierModule/DistillationModule .ckpt or a state_dict.
        teacher_pretrained: torchvision's ImageNet weights for the teacher (1000 classes only).
        teacher_weights: weights of the teacher's heads in the soft term, e.g. ``[1, 0.3, 0.3]`` for GoogLeNet.
        terms: the loss terms (``class_path``/``init_args`` in YAML, :class:`~kd_lightning.distillers.DistillationTerm`
            modules from Python), each with its own ``weight`` and a unique ``name``. ``None``: one Hinton term
            (``temperature``, weight ``alpha``) and cross-entropy (weight ``1 - alpha``). Terms given as objects
            (from Python) are not saved as hyperparameters: pass them again to ``load_from_checkpoint``.
        temperature: Hinton KD's temperature when ``terms`` is not given (default 4).
        alpha: the soft term's weight when ``terms`` is not given (default 0.9).
        teacher_precision: ``"32"`` (default): the teacher runs as everything else does (under the trainer's
            ``precision``). ``"bf16"`` / ``"16"``: the teacher's forward pass runs under ``torch.autocast`` in
            bfloat16 / float16 on the input's device, whatever the trainer's precision, and its logits come back
            as float32, so the loss terms stay in float32 (its tapped features stay in the low precision; the
            feature losses cast them to float32). Saves time and memory for a large teacher. ``"16"`` on a CPU
            uses CPU float16 autocast (slow; a torch without it warns and runs the teacher in float32); prefer
            ``"bf16"`` there.
        channels_last: run student, teacher and 4-D images in ``torch.channels_last`` memory format (faster
            convolutions on recent GPUs under mixed precision). Only during a trainer's run: checkpoints, exports
            and ``module.student`` outside the trainer are unchanged.
        compile_student: ``torch.compile`` the student (never the teacher) for the training/validation/test
            steps: ``true`` (the default inductor backend) or a dict of ``torch.compile`` arguments (e.g.
            ``{mode: max-autotune}``). ``module.student`` stays the plain network that exports and evaluation use,
            checkpoint keys are unchanged (no ``_orig_mod.``) and checkpoints of non-compiled runs load as before.
    """

    def __init__(self, student: str | nn.Module = "flowers_cnn", teacher: str | nn.Module = "resnet18",
                 num_classes: int | None = None, temperature: float | None = None, alpha: float | None = None,
                 teacher_checkpoint: str | None = None, teacher_pretrained: bool = False,
                 student_kwargs: dict[str, Any] | None = None, teacher_kwargs: dict[str, Any] | None = None,
                 teacher_weights: list[float] | None = None,
                 optimizer: Literal["sgd", "adamw", "adam"] = "sgd", lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = False,
                 lr_scheduler: Literal["none", "cosine", "step", "multistep"] = "cosine", warmup_epochs: int = 0,
                 step_size: int = 30, milestones: Sequence[int] = (), gamma: float = 0.1,
                 terms: list[DistillationTerm] | None = None,
                 teacher_precision: Literal["32", "bf16", "16"] = "32", channels_last: bool = False,
                 compile_student: bool | dict[str, Any] = False) -> None:
        if num_classes is None and isinstance(teacher, nn.Module):
            # from Python, networks given as modules: the class count is the teacher's head width
            num_classes = head_width(teacher)
            student_width = head_width(student) if isinstance(student, nn.Module) else None
            if num_classes is not None and student_width is not None and student_width != num_classes:
                raise ValueError(f"The student's head gives {student_width} class scores but the teacher's gives "
                                 f"{num_classes}: teacher and student must agree on the class count.")
        super().__init__(num_classes, optimizer, lr, momentum, weight_decay, nesterov, lr_scheduler,
                         warmup_epochs, step_size, milestones, gamma)
        if terms is not None:
            given = [name for name, value in (("temperature", temperature), ("alpha", alpha),
                                              ("teacher_weights", teacher_weights)) if value is not None]
            if given:
                raise ValueError(f"DistillationModule: {', '.join(given)} apply only without `terms`; with terms, "
                                 "set them on the term (e.g. HintonKD's temperature and teacher_weights, and each "
                                 "term's weight).")
            if not terms:
                raise ValueError("DistillationModule: terms is an empty list; give at least one loss term.")
            bad = [t for t in terms if not isinstance(t, DistillationTerm)]
            if bad:
                raise ValueError(f"DistillationModule: every term must be a kd_lightning.distillers."
                                 f"DistillationTerm, got {', '.join(type(t).__name__ for t in bad)}.")
            names = [t.name for t in terms]
            if len(set(names)) != len(names):
                raise ValueError(f"DistillationModule: term names must be unique (they name the log keys "
                                 f"loss_<name>), got {names}; give one of them another `name`.")
        else:
            temperature = 4.0 if temperature is None else temperature
            alpha = 0.9 if alpha is None else alpha
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {temperature}.")
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        teacher_precision = str(teacher_precision)  # YAML may give 32 or 16 as a number
        if teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(f"teacher_precision must be one of {', '.join(map(repr, TEACHER_PRECISIONS))} "
                             f"(float32, bfloat16 or float16 autocast of the teacher), got {teacher_precision!r}.")
        self._teacher_dtype = TEACHER_PRECISIONS[teacher_precision]
        self._set_gpu_paths(channels_last, compile_student, "compile_student")
        if teacher_pretrained and num_classes != 1000:
            raise ValueError(
                f"teacher_pretrained=True gives an ImageNet teacher with 1000 classes, but the data has {num_classes}."
                " Fine-tune the teacher first (ClassifierModule with pretrained: true, e.g. experiments/flowers/"
                "teacher.yaml) and pass its checkpoint as teacher_checkpoint.")
        self.save_hyperparameters(ignore=[k for k, v in (("student", student), ("teacher", teacher))
                                          if isinstance(v, nn.Module)] or None)
        if any(isinstance(t, nn.Module) for t in self.hparams.get("terms") or ()):
            # term objects passed from Python (not a YAML config): they are rebuilt by the caller, not pickled
            del self.hparams["terms"]
        self.student = student if isinstance(student, nn.Module) else load_model(
            student, num_classes, **(student_kwargs or {}))
        self.teacher = teacher if isinstance(teacher, nn.Module) else load_model(
            teacher, num_classes, checkpoint=teacher_checkpoint, pretrained=teacher_pretrained,
            **(teacher_kwargs or {}))
        self.teacher.requires_grad_(False).eval()
        # DDP must neither broadcast nor reduce the frozen teacher (every rank builds the same one): ignoring it
        # also spares the per-step broadcast of its BatchNorm buffers. torch's only way, pinned by
        # tests/test_pinned_internals.py.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f"teacher.{name}" for name in self.teacher.state_dict()])
        self._legacy = terms is None
        if terms is None:
            terms = legacy_terms(float(temperature), float(alpha), teacher_weights)
        self.teacher_weights = teacher_weights
        for term in terms:
            check_layer_names(self.student, term.student_layers, "student", term.name)
            check_layer_names(self.teacher, term.teacher_layers, "teacher", term.name)
        self.terms = nn.ModuleDict({term.name: term for term in terms})
        self._student_layers = list(dict.fromkeys(n for t in terms for n in t.student_layers))
        self._teacher_layers = list(dict.fromkeys(n for t in terms for n in t.teacher_layers))
        self._input_shape: tuple[int, ...] | None = None
        self._teacher_fingerprint: str | None = None
        # student-vs-teacher statistics, computed here and rendered by KLDivergenceLogger (see track_/request_)
        self.distillation_stats: DistillationStats | None = None
        self.last_step_stats: Tensor | None = None
        self._step_stats_due = False
        self.metrics = self._make_metrics(teacher=True)

    # -- terms ------------------------------------------------------------------------------------------------
    def _temperature_term(self) -> DistillationTerm | None:
        return next((t for t in self.terms.values() if hasattr(t, "temperature")), None)

    @property
    def temperature(self) -> float:
        """The temperature of the first term that has one (Hinton KD, DKD); 1.0 when none has."""
        term = self._temperature_term()
        return 1.0 if term is None else float(term.temperature)

    @temperature.setter
    def temperature(self, value: float) -> None:
        term = self._temperature_term()
        if term is None:
            raise AttributeError("No distillation term of this module has a temperature.")
        term.temperature = float(value)

    @property
    def alpha(self) -> float:
        """Without ``terms``: the soft term's weight (the hard term's is ``1 - alpha``)."""
        if not self._legacy:
            raise AttributeError("alpha applies to temperature/alpha configs only; with terms, schedule a term's "
                                 "weight, e.g. terms.kd.weight.")
        return self.terms["kd"].weight

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not self._legacy:
            raise AttributeError("alpha applies to temperature/alpha configs only; with terms, set a term's weight.")
        self.terms["kd"].weight = float(value)
        self.terms["ce"].weight = 1.0 - float(value)

    def schedulable_floats(self) -> list[str]:
        """Dotted names of the float attributes a scheduler may drive (``terms.<name>.<attribute>``)."""
        names = ["temperature", "alpha"] if self._legacy else ([] if self._temperature_term() is None
                                                                 else ["temperature"])
        for term_name, term in self.terms.items():
            names += [f"terms.{term_name}.{k}" for k, v in vars(term).items()
                      if not k.startswith("_") and isinstance(v, float)]
        return names

    def build_terms(self, input_shape: Sequence[int]) -> None:
        """Build the terms' adapters from a dry run of both networks (eval mode, no gradient, BatchNorm
        statistics untouched) on a zero batch of ``input_shape`` (channels, height, width). Idempotent."""
        self._input_shape = tuple(int(d) for d in input_shape)
        unbuilt = [t for t in self.terms.values() if not t.built]
        if not unbuilt:
            return
        student_features: dict[str, Tensor] = {}
        teacher_features: dict[str, Tensor] = {}
        was_training = self.student.training
        self.student.eval()
        try:
            param = next(self.student.parameters(), None)
            device = None if param is None else param.device
            x = torch.zeros(2, *self._input_shape, device=device)
            with torch.no_grad(), capture_features(self.student, self._student_layers, student_features), \
                    capture_features(self.teacher, self._teacher_layers, teacher_features):
                self.teacher(x)
                self.student(x)
        finally:
            self.student.train(was_training)
        for term in unbuilt:
            term.build(student_features, teacher_features)
            term.to(device)

    def extra_param_groups(self) -> list[dict[str, Any]]:
        unbuilt = [t.name for t in self.terms.values() if not t.built]
        if unbuilt:
            raise ValueError(f"The distillation term(s) {unbuilt} have adapters that are not built yet: use a "
                             "DataModule with an `input_shape`, or call module.build_terms(input_shape) first.")
        params = [p for p in self.terms.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        super().check_input_shape(input_shape)
        self.build_terms(input_shape)

    # -- student-vs-teacher statistics: computed here, rendered by KLDivergenceLogger --------------------------
    def track_distillation_stats(self, per_sample: bool = True) -> None:
        """Accumulate :class:`~kd_lightning.metrics.DistillationStats` over each validation epoch (in
        ``distillation_stats``; the reader computes and resets it at the epoch's end)."""
        self.distillation_stats = DistillationStats(self.num_classes, per_sample=per_sample)

    def request_step_statistics(self) -> None:
        """Have the next training step store :func:`~kd_lightning.metrics.step_statistics` of its logits in
        ``last_step_stats`` (a callback asks only on the steps it logs: the other steps pay nothing)."""
        self._step_stats_due = True

    # -- the teacher stays frozen, in eval mode, and out of checkpoints --------------------------------------
    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        self.teacher.eval()  # Dropout off and BatchNorm statistics fixed, whatever the trainer asks
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix + "teacher.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # Checkpoints hold no teacher: keep the teacher we built, and stay strict about everything else.
        state_dict = dict(state_dict)
        for key, value in self.teacher.state_dict(prefix="teacher.").items():
            state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def teacher_fingerprint(self) -> str:
        """sha256 of the teacher's weights and buffers: checkpoints record which teacher trained the student."""
        if self._teacher_fingerprint is None:  # the teacher is frozen: compute once
            digest = hashlib.sha256()
            for key, value in sorted(self.teacher.state_dict().items()):
                digest.update(key.encode())
                digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            self._teacher_fingerprint = digest.hexdigest()
        return self._teacher_fingerprint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["teacher_fingerprint"] = self.teacher_fingerprint()
        if self._input_shape is not None:
            checkpoint["distillation_input_shape"] = list(self._input_shape)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # adapters must exist before their weights are loaded (load_from_checkpoint, or a resume without setup)
        shape = checkpoint.get("distillation_input_shape")
        if shape is not None and not all(t.built for t in self.terms.values()):
            self.build_terms(shape)
        saved = checkpoint.get("teacher_fingerprint")
        if saved is not None and saved != self.teacher_fingerprint():
            rank_zero_warn(
                "The teacher rebuilt for this checkpoint is not the one the student was trained with (teacher "
                f"weights fingerprint {self.teacher_fingerprint()[:12]} != {saved[:12]}; teacher_checkpoint="
                f"{self.hparams.get('teacher_checkpoint')!r}, resolved from {os.getcwd()!r}). Was the teacher "
                "retrained or the path changed? Resuming would distil from another teacher, and teacher_acc, "
                "agreement and kl will differ.")

    def trainable_module(self) -> nn.Module:
        return self.student

    def named_networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def forward(self, x: Tensor) -> Tensor:
        """The student's logits: what ships."""
        return as_heads(self.student(x))[0]

    def teacher_autocast(self, x: Tensor) -> ContextManager[Any]:
        """The autocast of the teacher's forward pass on ``x`` (``teacher_precision``); none for ``"32"``."""
        if self._teacher_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self._teacher_dtype)

    def teacher_logits(self, x: Tensor) -> list[Tensor]:
        """The teacher's heads on ``x`` (main first). Offline KD replaces this with logits read from the batch.
        With a low ``teacher_precision`` they are cast back to float32: the loss terms see float32 logits."""
        with torch.no_grad(), self.teacher_autocast(x):
            heads = as_heads(self.teacher(x))
        if self._teacher_dtype is None:
            return heads  # "32": exactly as before, whatever the trainer's precision
        return [head.float() for head in heads]

    # -- steps ------------------------------------------------------------------------------------------------
    def _forward_both(self, batch: Any) -> StepOutputs:
        """One forward pass of each network on the batch (:mod:`kd_lightning.data.batch`); the tapped layers'
        outputs come from hooks in those same passes. A batch with cached ``teacher_logits`` skips the teacher's
        pass unless a term taps teacher layers."""
        b = as_batch(batch)
        x = self.prepare_input(b.images)
        student_features: dict[str, Tensor] = {}
        teacher_features: dict[str, Tensor] = {}
        with ExitStack() as stack:
            if self._teacher_layers:
                stack.enter_context(capture_features(self.teacher, self._teacher_layers, teacher_features))
            if self._student_layers:
                stack.enter_context(capture_features(self.student, self._student_layers, student_features))
            if b.teacher_logits is not None and not self._teacher_layers:
                teacher_heads = [b.teacher_logits.detach()]  # offline distillation: logits read from the batch
            else:
                teacher_heads = self.teacher_logits(x)
            student_logits = as_heads(self.run_trainable(x))[0]  # (B, K)
        return StepOutputs(student_logits, teacher_heads, b.targets, student_features, teacher_features,
                           epoch=self.current_epoch, index=b.index)

    def compute_losses(self, out: StepOutputs) -> dict[str, Tensor]:
        """``{"loss", "loss_<name>"...}``: each term's values times its weight, and their sum; without ``terms``
        also the unweighted ``kd`` and ``ce`` of before."""
        losses: dict[str, Tensor] = {}
        total: Tensor | None = None
        for term in self.terms.values():
            for name, value in term(out).items():
                weighted = term.weight * value
                losses[f"loss_{name}"] = weighted
                if self._legacy:
                    losses[name] = value
                total = weighted if total is None else total + weighted
        assert total is not None
        return {"loss": total, **losses}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        out = self._forward_both(batch)  # images (B, C, H, W); targets (B,) or (B, K) soft labels
        losses = self.compute_losses(out)
        self.log("train/loss", losses["loss"], prog_bar=True)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train/{name}", value)
        if self._temperature_term() is not None:
            self.log("train/temperature", self.temperature)
        if self._step_stats_due:
            self._step_stats_due = False
            self.last_step_stats = step_statistics(out.student_logits.detach(), out.teacher_logits[0],
                                                   self.temperature)
        # the logits go out for whoever runs the step by hand; no callback depends on them
        return {"loss": losses["loss"], "student_logits": out.student_logits.detach(),
                "teacher_logits": out.teacher_logits[0]}

    def _eval_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        out = self._forward_both(batch)
        y = out.targets
        student_logits, teacher_logits = out.student_logits, out.teacher_logits[0]
        losses = self.compute_losses(out)
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, sync_dist=True)
        metrics = self.metrics[stage]
        metrics["acc"].update(student_logits, y)
        metrics["teacher_acc"].update(teacher_logits, y)
        metrics["agreement"].update(student_logits, teacher_logits.argmax(-1))
        metrics["kl"].update(kl_divergence(student_logits, teacher_logits, 1.0, reduction="none"))
        stats = self.distillation_stats
        if stage == "val" and stats is not None and not (self._trainer is not None and self.trainer.sanity_checking):
            if stats.device != student_logits.device:
                stats.to(student_logits.device)
            stats.update(student_logits.detach(), teacher_logits, y, self.temperature)
        return {"student_logits": student_logits, "teacher_logits": teacher_logits}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")
