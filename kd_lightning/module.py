"""The LightningModules: :class:`DistillationModule` (a frozen teacher teaches a trainable student) and
:class:`ClassifierModule` (one network on hard labels: a teacher). Both are the same training path: the step is
:class:`kd_lightning.core.Distiller`'s, the optimizer is the run's :class:`~kd_lightning.optim.OptimizerRecipe`, and
this file adds what Lightning needs around them (logging, metrics, checkpoints, seeding, GPU settings), once.
A scratch student is a ``DistillationModule`` without a teacher, so it is the KD student's network by construction.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.compiled import CompiledNetwork
from kd_lightning.core import Distiller, head_width
from kd_lightning.data.batch import as_batch
from kd_lightning.distillers import CrossEntropy, DistillationTerm, shorthand_terms
from kd_lightning.hparams import comparable_hparams
from kd_lightning.labels import UNLABELLED
from kd_lightning.metrics import DistillationStats, step_statistics
from kd_lightning.models.loading import load_model
from kd_lightning.optim import OptimizerRecipe
from kd_lightning.log_steps import is_read_step
from kd_lightning.seeding import derive_seed, run_seed, seed_step

Terms = Mapping[str, DistillationTerm] | Sequence[DistillationTerm]


class _TrainingModule(Distiller, LightningModule):
    """The one LightningModule behind both public classes; they differ only in their constructors."""

    def __init__(self, network: nn.Module, terms: Terms, teacher: nn.Module | None, num_classes: int | None,
                 optim: OptimizerRecipe | Mapping[str, Any] | None, teacher_precision: str, channels_last: bool,
                 compile_value: bool | Mapping[str, Any] | None, compile_arg: str) -> None:
        _check_num_classes(num_classes)
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {channels_last!r}.")
        super().__init__(network, terms, teacher, teacher_precision)
        self.num_classes = num_classes
        self.optim = OptimizerRecipe.of(optim)
        self._channels_last = channels_last
        self._compiled = CompiledNetwork(compile_value, compile_arg)
        self._step_stats_due = False
        self.last_step_stats: Tensor | None = None  # step_statistics of the last step a callback asked for
        self._stats_settings = {"detailed": False, "per_sample": False}
        self.metrics = self._make_metrics()
        self.best_val_acc: float | None = None  # the best val/acc so far, logged as val/acc_best (HPARAMS)

    # -- GPU paths: channels_last memory format, torch.compile ------------------------------------------------------
    def _prepare(self, batch: Any) -> Any:
        if self._channels_last:
            b = as_batch(batch)
            if b.images.ndim == 4:
                return b._replace(images=b.images.contiguous(memory_format=torch.channels_last))
        return batch

    def run_network(self, x: Tensor) -> Any:
        """The network's output in the steps: through its ``torch.compile`` wrapper when compilation is on, else
        the plain network (which ``forward``, exports and evaluation use)."""
        return self._compiled(self.network, x)

    # -- optimization --------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return self.optim.build(self.trainable_parameters(), self.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout and any other draw of the step come from a generator seeded by the step's position (see
        # kd_lightning.seeding): a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
        seed_step(derive_seed(run_seed(), "step", self.global_rank, self.current_epoch, batch_idx), self.device)

    # -- steps ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        out = self.step(self._prepare(batch), self.current_epoch, self.run_network)
        losses = self.losses(out)
        if self._trainer is None or is_read_step(self.trainer):  # other steps' values would be overwritten unseen
            self.log("train/loss", losses["loss"], prog_bar=True)
            logged = {f"train/{name}": value for name, value in losses.items() if name != "loss"}
            temperatures = self.temperatures()
            if len(set(temperatures.values())) == 1:
                self.log("train/temperature", next(iter(temperatures.values())), prog_bar=True)
            else:
                logged.update({f"train/temperature_{name}": value for name, value in temperatures.items()})
            self.log_dict(logged)
        student_logits = out.student_logits.detach()
        if self._step_stats_due and out.teacher_logits:
            self._step_stats_due = False
            self.last_step_stats = step_statistics(student_logits, out.teacher_logits[0],
                                                   self.common_temperature() or 1.0)
        # the logits go out for whoever runs the step by hand; no callback depends on them
        return {"loss": losses["loss"], "student_logits": student_logits,
                **({"teacher_logits": out.teacher_logits[0]} if out.teacher_logits else {})}

    def _eval_step(self, batch: Any, stage: str) -> None:
        out = self.step(self._prepare(batch), self.current_epoch, self.run_network)
        self.log_dict({f"{stage}/{k}": v for k, v in self.losses(out).items()}, sync_dist=True)
        metrics = self.metrics[stage]
        metrics["acc"].update(out.student_logits, out.targets)
        if out.teacher_logits:
            teacher = out.teacher_logits[0]
            metrics["teacher_acc"].update(teacher, out.targets)
            if not (stage == "val" and self.trainer.sanity_checking):
                metrics["stats"].update(out.student_logits.detach(), teacher, out.targets, self.common_temperature())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"logits", "targets"}`` of the network, with ``"teacher_logits"`` when there is a teacher."""
        b = as_batch(self._prepare(batch))
        out = {"logits": self.run_network(b.images), "targets": b.targets}
        out["logits"] = out["logits"] if isinstance(out["logits"], Tensor) else out["logits"][0]
        if self.teacher is not None:
            out["teacher_logits"] = self.teacher_logits(b.images)[0]
        return out

    # -- metrics -------------------------------------------------------------------------------------------------
    def _make_metrics(self) -> nn.ModuleDict:
        def stage(detailed: bool, per_sample: bool) -> nn.ModuleDict:
            metrics: dict[str, nn.Module] = {
                "acc": MulticlassAccuracy(self.num_classes, average="micro", ignore_index=UNLABELLED)}
            if self.teacher is not None:
                metrics["teacher_acc"] = MulticlassAccuracy(self.num_classes, average="micro", ignore_index=UNLABELLED)
                metrics["stats"] = DistillationStats(self.num_classes, detailed=detailed, per_sample=per_sample)
            return nn.ModuleDict(metrics)

        return nn.ModuleDict({"val": stage(**self._stats_settings), "test": stage(False, False)})

    def track_distillation_stats(self, per_sample: bool = True) -> None:
        """Keep the detailed validation statistics (:class:`~kd_lightning.metrics.DistillationStats`) for a callback
        to render: it reads them with :meth:`distillation_results` in its ``on_validation_epoch_end``."""
        if self.teacher is None:
            raise ValueError("There is no teacher in this run: its student-vs-teacher statistics do not exist.")
        self._stats_settings = {"detailed": True, "per_sample": per_sample}
        device = self.metrics["val"]["acc"].device
        self.metrics["val"]["stats"] = DistillationStats(self.num_classes, detailed=True,
                                                         per_sample=per_sample).to(device)

    def distillation_results(self, stage: str = "val") -> dict[str, Tensor] | None:
        """The epoch's student-vs-teacher statistics (reduced across ranks, computed once: torchmetrics caches the
        result until the module resets it at the epoch's end), or None when nothing was measured."""
        stats = self.metrics[stage]["stats"] if "stats" in self.metrics[stage] else None
        return stats.compute() if stats is not None and stats.update_called else None

    def request_step_statistics(self) -> None:
        """Have the next training step store :func:`~kd_lightning.metrics.step_statistics` of its logits in
        ``last_step_stats`` (a callback asks only on the steps it logs: the other steps pay nothing)."""
        self._step_stats_due = True

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics = self.metrics[stage]
        if not metrics["acc"].update_called:
            return
        values = {name: metrics[name].compute() for name in ("acc", "teacher_acc") if name in metrics}
        results = self.distillation_results(stage)
        if results is not None:
            values.update(agreement=results["agreement"], kl=results["kl_T1"])
        if stage == "val" and not self.trainer.sanity_checking:
            self.best_val_acc = max(self.best_val_acc or 0.0, float(values["acc"]))
            values["acc_best"] = torch.tensor(self.best_val_acc)
        # already reduced by torchmetrics; sync_dist only re-averages equal values and keeps Lightning quiet. The
        # progress bar shows the student's accuracy and, with a teacher, how far it is from it.
        shown = ("acc", "kl")
        for prog_bar in (True, False):
            self.log_dict({f"{stage}/{name}": value for name, value in values.items() if (name in shown) == prog_bar},
                          sync_dist=True, prog_bar=prog_bar)
        for metric in metrics.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def on_fit_start(self) -> None:
        # TensorBoard's HPARAMS tab: the settings that tell runs apart, and the metrics to compare them by. Written
        # directly (as TensorBoardLogger does inside): no fake metric points at step 0.
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                names = ["val/acc", "val/acc_best", "test/acc"]
                if self.teacher is not None:
                    names += ["val/teacher_acc", "val/agreement", "val/kl"]
                writer = logger.experiment.file_writer  # SummaryWriter's event file writer (public attribute)
                params = comparable_hparams(self.trainer)
                for summary in hparams_summary(params, {name: math.nan for name in names}):
                    writer.add_summary(summary)

    # -- setup: shapes, memory format ----------------------------------------------------------------------------
    def check_input_shape(self, input_shape: Sequence[int], num_classes: int | None = None) -> None:
        super().check_input_shape(input_shape, self.num_classes if num_classes is None else num_classes)

    def check_data(self, datamodule: Any) -> None:
        """The data against the networks and terms, before anything runs: the input shape and class count, and
        the dataset indices a memory-bank term (CRD) reads."""
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is not None:
            self.check_input_shape(input_shape)
        needing = self.index_terms()
        if needing and datamodule is not None and not getattr(datamodule, "return_index", False):
            raise ValueError(f"The term(s) {needing} read each training row's dataset index, but the data does not "
                             "give it: set data.init_args.return_index: true.")

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        self.check_data(datamodule)
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is not None:
            self.example_input_array = torch.zeros(1, *input_shape)  # in/out sizes and FLOPs in ModelSummary
        labels = getattr(datamodule, "train_row_labels", None)
        if stage == "fit" and self.index_terms() and labels is not None:
            self.bind_train_rows(labels)
        if self._channels_last:
            # For the trainer's run only (undone in teardown): the 4-D weights change layout, not value, so
            # state_dict() is the same and a module out of a trainer is in the default layout.
            self.to(memory_format=torch.channels_last)

    def teardown(self, stage: str) -> None:
        if self._channels_last:
            self.to(memory_format=torch.contiguous_format)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_acc"] = self.best_val_acc
        if self.teacher is not None:
            checkpoint["teacher_fingerprint"] = self.teacher_fingerprint()
        if self._input_shape is not None:
            checkpoint["distillation_input_shape"] = list(self._input_shape)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_val_acc = checkpoint.get("best_val_acc")
        # adapters must exist before their weights are loaded (load_from_checkpoint, or a resume without setup)
        shape = checkpoint.get("distillation_input_shape")
        if shape is not None and not all(t.built for t in self.terms.values()):
            self.build_terms(shape)
        saved = checkpoint.get("teacher_fingerprint")
        if saved is not None and self.teacher is not None and saved != self.teacher_fingerprint():
            rank_zero_warn(
                "The teacher rebuilt for this checkpoint is not the one the student was trained with (teacher weights "
                f"fingerprint {self.teacher_fingerprint()[:12]} != {saved[:12]}; teacher_checkpoint="
                f"{self.hparams.get('teacher_checkpoint')!r}). Was the teacher retrained or the path changed? "
                "Resuming would distil from another teacher, and teacher_acc, agreement and kl will differ.")


class DistillationModule(_TrainingModule):
    r"""Knowledge distillation: a frozen teacher teaches a trainable student; without a teacher, the same student
    trained on the labels alone (the fair scratch baseline).

    The loss is a weighted sum of ``terms`` (:mod:`kd_lightning.distillers`: Hinton KD, FitNets hints, attention
    transfer, DKD, cross-entropy, ...), a mapping from each term's name to the term. ``temperature``/``alpha`` are
    the shorthand of Hinton et al. (2015), translated once into ``{"kd": HintonKD(alpha, T), "ce":
    CrossEntropy(1 - alpha)}``: ``loss = alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE(s, y)``.
    Without terms or shorthand: that loss at T = 4, alpha = 0.9 with a teacher, cross-entropy alone without.

    Logs ``train/loss``, ``train/loss_<name>`` per term (weighted: they add up to the loss), ``train/temperature``;
    ``val/`` and ``test/`` the same losses and ``acc``, with a teacher also ``teacher_acc``, ``agreement`` (share of
    rows with the same top-1 as the teacher) and ``kl`` (mean KL(teacher || student) at T = 1).

    Args:
        student: zoo name or ``nn.Module``; ``student_kwargs`` go to the zoo builder.
        teacher: zoo name or ``nn.Module`` (used as given), or None: no teacher (a scratch run).
        num_classes: linked from the DataModule by the CLI; from Python, the teacher module's head width by default.
        teacher_checkpoint: the teacher's weights: a kd_lightning ``.ckpt`` or a state_dict file.
        teacher_pretrained: torchvision's ImageNet weights for the teacher (1000 classes only).
        terms: the loss terms (see :mod:`kd_lightning.distillers`); from Python, term objects (not saved as
            hyperparameters: pass them again to ``load_from_checkpoint``).
        temperature, alpha, teacher_weights: the Hinton shorthand (only without ``terms``).
        optim: the optimizer and LR schedule (:class:`~kd_lightning.optim.OptimizerRecipe`; the ``optim:`` section).
        teacher_precision: ``"32"``, ``"bf16"`` or ``"16"``: autocast of the teacher alone; its logits come back
            as float32, so the loss terms stay in float32.
        channels_last: student, teacher and 4-D images in ``torch.channels_last`` memory format during a trainer's
            run (checkpoints, exports and ``module.student`` are unchanged).
        compile_student: ``torch.compile`` the student (never the teacher) for the steps: ``true`` or a dict of
            ``torch.compile`` arguments; ``module.student`` stays plain and checkpoint keys have no ``_orig_mod.``.
    """

    def __init__(self, student: str | nn.Module = "flowers_cnn", teacher: str | nn.Module | None = None,
                 num_classes: int | None = None, student_kwargs: dict[str, Any] | None = None,
                 teacher_kwargs: dict[str, Any] | None = None, teacher_checkpoint: str | None = None,
                 teacher_pretrained: bool = False,
                 terms: dict[str, DistillationTerm] | list[DistillationTerm] | None = None,
                 temperature: float | None = None, alpha: float | None = None,
                 teacher_weights: list[float] | None = None, optim: OptimizerRecipe | dict[str, Any] | None = None,
                 teacher_precision: str = "32", channels_last: bool = False,
                 compile_student: bool | dict[str, Any] = False) -> None:
        if num_classes is None and isinstance(teacher, nn.Module):
            num_classes = head_width(teacher)
            student_width = head_width(student) if isinstance(student, nn.Module) else None
            if num_classes is not None and student_width is not None and student_width != num_classes:
                raise ValueError(f"The student's head gives {student_width} class scores but the teacher's gives "
                                 f"{num_classes}: teacher and student must agree on the class count.")
        _check_num_classes(num_classes)
        shorthand = {k: v for k, v in (("temperature", temperature), ("alpha", alpha),
                                       ("teacher_weights", teacher_weights)) if v is not None}
        if terms is not None and shorthand:
            raise ValueError(f"DistillationModule: {', '.join(shorthand)} is the shorthand for terms "
                             "{kd: HintonKD, ce: CrossEntropy}; with `terms`, set it on the term instead, e.g. "
                             "model.init_args.terms.kd.init_args.temperature.")
        if teacher_pretrained and num_classes != 1000:
            raise ValueError(
                f"teacher_pretrained=True gives an ImageNet teacher with 1000 classes, but the data has {num_classes}."
                " Fine-tune the teacher first (ClassifierModule with pretrained: true) and pass its checkpoint as "
                "teacher_checkpoint.")
        if terms is not None:
            loss_terms = terms
        else:  # a local of its own: save_hyperparameters reads the arguments as given from this frame
            loss_terms = shorthand_terms(**shorthand) if teacher is not None else {"ce": CrossEntropy()}
        student_net = student if isinstance(student, nn.Module) else load_model(
            student, num_classes, **(student_kwargs or {}))
        teacher_net = teacher if not isinstance(teacher, str) else load_model(
            teacher, num_classes, checkpoint=teacher_checkpoint, pretrained=teacher_pretrained,
            role="teacher_checkpoint", **(teacher_kwargs or {}))
        recipe = OptimizerRecipe.of(optim)
        optim = recipe.as_dict()  # checkpoints keep the recipe as a plain dict: weights_only loading reads no objects
        super().__init__(student_net, loss_terms, teacher_net, num_classes, recipe, teacher_precision, channels_last,
                         compile_student, "compile_student")
        self.save_hyperparameters(ignore=[k for k, v in (("student", student), ("teacher", teacher))
                                          if isinstance(v, nn.Module)] or None)
        if any(isinstance(t, nn.Module) for t in _values(self.hparams.get("terms"))):
            del self.hparams["terms"]  # term objects from Python are rebuilt by the caller, not pickled


class ClassifierModule(_TrainingModule):
    """One network on hard labels (a teacher): the distillation path without a teacher, its loss a cross-entropy term.

    Args:
        model: a zoo name (``kd_lightning.models.MODELS``) or an ``nn.Module``; ``model_kwargs`` go to the builder.
        pretrained: start from torchvision's ImageNet weights (fine-tuning; needs internet once).
        checkpoint: start from these weights (a kd_lightning .ckpt or a state_dict file).
        head_weights: a multi-head network's loss ``sum_i head_weights[i] * CE(head_i)`` (GoogLeNet with its
            auxiliary heads: ``[1, 0.3, 0.3]``); None: the main head alone.
        label_smoothing: of the cross-entropy on class-index labels.
        optim, channels_last, compile_model: as in :class:`DistillationModule`.
    """

    network_attr = "model"

    def __init__(self, model: str | nn.Module = "resnet18", num_classes: int | None = None,
                 model_kwargs: dict[str, Any] | None = None, pretrained: bool = False, checkpoint: str | None = None,
                 head_weights: list[float] | None = None, label_smoothing: float = 0.0,
                 optim: OptimizerRecipe | dict[str, Any] | None = None, channels_last: bool = False,
                 compile_model: bool | dict[str, Any] = False) -> None:
        if not isinstance(model, nn.Module):
            _check_num_classes(num_classes)
        network = model if isinstance(model, nn.Module) else load_model(
            model, num_classes, checkpoint=checkpoint, pretrained=pretrained, role="checkpoint", **(model_kwargs or {}))
        terms = {"ce": CrossEntropy(head_weights=head_weights, label_smoothing=label_smoothing)}
        recipe = OptimizerRecipe.of(optim)
        optim = recipe.as_dict()  # checkpoints keep the recipe as a plain dict: weights_only loading reads no objects
        super().__init__(network, terms, None, num_classes, recipe, "32", channels_last, compile_model,
                         "compile_model")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is None or num_classes < 1:
        raise ValueError("num_classes is required (a positive int); under `kd-lightning` it comes from the "
                         f"DataModule's num_classes. Got {num_classes!r}.")


def _values(terms: Any) -> list[Any]:
    return list(terms.values()) if isinstance(terms, Mapping) else list(terms or ())
