"""``kd-lightning fit | validate | test | predict``: LightningCLI on experiment configs.

    kd-lightning fit --config experiments/digits/base.yaml --config experiments/digits/kd.yaml
    kd-lightning test --config ... --ckpt_path logs/digits/kd/version_0/checkpoints/best.ckpt
    kd-lightning fit --config ... --ckpt_path logs/digits/kd/version_0/checkpoints/last.ckpt   # resume

Configs use ``class_path``/``init_args``; several ``--config`` files merge left to right. Besides Lightning's
sections (``trainer``, ``model``, ``data``, ``seed_everything``, ``ckpt_path``) a config has:

* ``optim``: the optimizer and LR schedule (:class:`kd_lightning.optim.OptimizerRecipe`), linked into the model;
* ``name``: the run's name: it logs to ``<save_dir>/<name>/version_<n>/`` (TensorBoard events, ``config.yaml``,
  ``checkpoints/best.ckpt`` and ``last.ckpt``);
* ``teacher_run``: the name of the run that trained the teacher: a KD run without ``teacher_checkpoint`` distils
  from that run's newest ``best.ckpt``;
* ``checkpoint`` (the best ``val/acc``, Lightning's ModelCheckpoint) and ``last_checkpoint`` (``last.ckpt``);
* ``prediction``: where ``predict`` writes ``predictions.csv`` (:class:`~kd_lightning.callbacks.PredictionWriter`);
* ``threads``: PyTorch's CPU threads (default: 1 for networks under a million parameters on a CPU, where more
  threads only synchronise; PyTorch's own choice otherwise).

``num_classes`` is linked from the DataModule into the model, so a config never writes it twice.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from typing import Any, Optional

import torch
from torch.nn.parameter import UninitializedParameter

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# imported so that `--data.help`, `--model.help` and `trainer.callbacks` know kd_lightning's classes by name
import kd_lightning.callbacks  # noqa: F401
import kd_lightning.data  # noqa: F401
import kd_lightning.module  # noqa: F401
from kd_lightning.callbacks.last_checkpoint import RUN_KEY, LastCheckpoint, slurm_job_id
from kd_lightning.callbacks.prediction_writer import PredictionWriter
from kd_lightning.checkpoints import (NETWORK_PREFIXES, architecture_settings, check_state_fits, is_lightning_checkpoint,
                                     read_checkpoint)
from kd_lightning.commands.config_errors import explain
from kd_lightning.commands.errors import INPUT_ERRORS, exit_with_error, plain_value, root_cause
from kd_lightning.exceptions import InputError
from kd_lightning.optim import OptimizerRecipe

SMALL_NETWORKS = 1_000_000  # parameters, teacher and student together: below it a CPU run uses one thread
DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's choice in this process, for the runs that are not small

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # hp_metric is replaced by the modules' own HPARAMS metrics
        "init_args": {"save_dir": "logs", "name": "kd", "default_hp_metric": False},
    },
}


# The trainer settings that name hardware, and values that build on any machine (for checking runs only)
CPU_TRAINER = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"}


class KDLightningCLI(LightningCLI):
    """LightningCLI with kd_lightning's sections and defaults (see the module docstring), resuming into the same
    log version, SLURM requeue, and model, data and checkpoint checks before anything is written."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_class_arguments(OptimizerRecipe, "optim", help="the optimizer and LR schedule of the run")
        # the model receives the recipe as a plain dict, so that checkpoints and hparams.yaml hold no objects
        parser.link_arguments("optim", "model.init_args.optim", compute_fn=OptimizerRecipe.as_dict,
                              apply_on="instantiate")
        parser.add_argument("--name", type=Optional[str], default=None,
                            help="the run's name: logs, config.yaml and checkpoints go to "
                                 "<save_dir>/<name>/version_<n>/ (default: the logger's name)")
        parser.add_argument("--teacher_run", type=Optional[str], default=None,
                            help="the name of the teacher's run: without model.init_args.teacher_checkpoint, a KD "
                                 "run distils from its newest best.ckpt (<save_dir>/<teacher_run>/*/checkpoints/)")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
                             "checkpoint.filename": "best"})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.add_argument("--threads", type=Optional[int], default=None,
                            help="PyTorch's CPU threads (default: 1 for networks under a million parameters on a "
                                 "CPU, PyTorch's choice otherwise)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # jsonargparse prints its usage and a report on every Union member; say instead, in one line, which key is
        # wrong and the closest valid names (config_errors.explain)
        subcommands = getattr(parser, "_subcommands_action", None)
        parsers = {None: parser, **(subcommands._name_parser_map if subcommands is not None else {})}
        for each in parsers.values():
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
            subcommand = next((a for a in argv if a in parsers), None)
            exit_with_error(explain(str(err), parsers[subcommand]))

    def _parse_ckpt_path(self) -> None:
        # Pinned to LightningCLI 2.6's private hook (tests/test_pinned_internals.py and test_resume.py break if it
        # goes): Lightning reads the --ckpt_path checkpoint here and lets its saved hyperparameters replace the
        # config's model, silently. First: a clear error for a file that is not a readable checkpoint, or one of
        # another module class or other networks than the config asks for; only then Lightning's merge.
        self._resume_from: dict[str, Any] | None = None
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            try:
                checkpoint = read_checkpoint(ckpt_path, "--ckpt_path")
                if not is_lightning_checkpoint(checkpoint):
                    raise ValueError(f"--ckpt_path {ckpt_path!r} is not a Lightning checkpoint (no 'state_dict' "
                                     "entry); a plain state_dict file can be a teacher_checkpoint, but not a run to "
                                     "resume or test.")
                check_checkpoint_matches_config(checkpoint, self.config[self.config.subcommand].get("model"),
                                                ckpt_path)
                self._resume_from = checkpoint
            except INPUT_ERRORS as err:
                exit_with_error(err)
        try:
            super()._parse_ckpt_path()
        except ArgumentError as err:  # the checkpoint's saved hyperparameters do not fit the config's model
            exit_with_error(f"--ckpt_path {ckpt_path!r} was written by another model than the config's: "
                            f"{explain(str(err))} Use the config the checkpoint was trained with.")

    def before_instantiate_classes(self) -> None:
        """Apply the run's name, find the teacher of ``teacher_run`` and choose the log version (a resumed run
        continues its own; a SLURM job logs to ``slurm_<job id>``). Config edits only: nothing is written."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = _logger_init_args(config)
        if config.get("name") and logger is not None:
            logger["name"] = config["name"]
        try:
            resolve_teacher_run(config, logger)
        except INPUT_ERRORS as err:
            exit_with_error(err)
        if self.subcommand != "fit":
            return
        if self._resume_from is not None:  # a resumed run writes into its own checkpoint folder, as it should
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if self._resume_from is not None and logger is not None:
            # Continue the run's own log version (one TensorBoard curve), unless the config names another.
            run = self._resume_from.get(RUN_KEY) or {}
            saved_dir = run.get("log_dir")
            place = os.path.join(logger.get("save_dir") or ".", logger.get("name") or "")
            if logger.get("version") is None and saved_dir and run.get("logger_version") is not None and \
                    os.path.normpath(os.path.dirname(saved_dir)) == os.path.normpath(place):
                logger["version"] = run["logger_version"]
            version = logger.get("version")
            if version is not None and saved_dir and "purge_step" in logger and logger.get("purge_step") is None \
                    and os.path.normpath(os.path.join(place, _version_folder(version))) == os.path.normpath(saved_dir):
                # TensorBoard drops what the stopped run logged after its checkpoint: no doubled points
                logger["purge_step"] = self._resume_from.get("global_step")
        elif config.get("ckpt_path") is None and logger is not None and logger.get("version") is None \
                and _in_slurm_job():
            # One log folder per SLURM job, so that the requeued job (same id) finds its own last.ckpt.
            logger["version"] = f"slurm_{slurm_job_id()}"
        if _in_slurm_job() and logger is not None and config.trainer.get("default_root_dir") is None:
            # Lightning's requeue checkpoint (hpc_ckpt_<n>.ckpt) goes to default_root_dir: the run's folder,
            # not the working directory that other runs share.
            version = logger.get("version")
            if version is not None:
                config.trainer.default_root_dir = os.path.join(logger.get("save_dir") or ".",
                                                               logger.get("name") or "", _version_folder(version))

    def __init__(self, *args: Any, trainer_on_cpu: bool = False, **kwargs: Any) -> None:
        # trainer_on_cpu: build the trainer on the CPU, the config keeping its hardware settings: to check runs
        # that will train elsewhere (SLURM jobs, submitted from a login node without their GPUs)
        self._trainer_on_cpu = trainer_on_cpu
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        hardware = {key: config.trainer.get(key) for key in CPU_TRAINER} if self._trainer_on_cpu else {}
        for key, value in CPU_TRAINER.items() if hardware else ():
            config.trainer[key] = value
        # jsonargparse wraps a constructor's error in a long union-validation report: show just the cause.
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:  # the Trainer's: e.g. a GPU config on a machine without one
            exit_with_error(explain_trainer_error(err, self.config[self.subcommand] if self.subcommand else
                                                  self.config))
        except Exception as err:  # noqa: BLE001 - re-raised unless it is one of our clear input errors
            cause = root_cause(err)
            if isinstance(cause, INPUT_ERRORS) and cause is not err:
                exit_with_error(cause)
            raise
        finally:
            for key, value in hardware.items():  # the run's identity is the config's, not the check's
                config.trainer[key] = value

    def _choose_threads(self) -> None:
        """``threads`` as given, else one thread for small networks on a CPU (more only synchronise)."""
        threads = self.config[self.subcommand].get("threads")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}.")
        if threads is None:  # set either way: runs of a study share this process
            sizes = [p.numel() for p in self.model.parameters() if not isinstance(p, UninitializedParameter)]
            small = sum(sizes) < SMALL_NETWORKS  # lazy layers (sized by the first batch) left out
            threads = 1 if small and self.trainer.strategy.root_device.type == "cpu" else DEFAULT_THREADS
        torch.set_num_threads(threads)

    def _check_model_fits_data(self) -> None:
        # Before the trainer runs, so a mismatch writes nothing under logs/.
        if hasattr(self.model, "check_data"):
            self.model.check_data(self.datamodule)
        for callback in self.trainer.callbacks:  # settings against the model and data, without side effects
            check = getattr(callback, "check_settings", None)
            if callable(check):
                check(self.model, self.datamodule, self.subcommand)
        if self._resume_from is not None:
            check_checkpoint_fits(self._resume_from, self.model, self.config[self.subcommand]["ckpt_path"])

    def _resume_requeued_slurm_job(self) -> None:
        """A requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) resumes from its own ``last.ckpt``: no flag needed."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is not None or not _in_slurm_job():
            return
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
            return
        last = [cb for cb in self.trainer.callbacks if isinstance(cb, LastCheckpoint)]
        path = last[0].checkpoint_path(self.trainer) if last else None
        if path is None or not os.path.isfile(path):
            return  # nothing of ours: Lightning's own hpc_ckpt in default_root_dir, if any, is used
        checkpoint = read_checkpoint(path, "last.ckpt")
        if (checkpoint.get(RUN_KEY) or {}).get("slurm_job_id") != slurm_job_id():
            return  # a fixed checkpoint folder holding another job's run: never resume someone else's state
        check_checkpoint_fits(checkpoint, self.model, path)
        print(f"kd-lightning: requeued SLURM job {slurm_job_id()}: resuming from {path}", file=sys.stderr)
        config["ckpt_path"] = path

    def before_fit(self) -> None:
        try:
            self._choose_threads()
            self._check_model_fits_data()
            self._resume_requeued_slurm_job()
        except INPUT_ERRORS as err:
            exit_with_error(err)

    def before_validate(self) -> None:
        try:
            self._choose_threads()
            self._check_model_fits_data()
        except INPUT_ERRORS as err:
            exit_with_error(err)

    before_test = before_validate
    before_predict = before_validate

    def after_fit(self) -> None:
        print_summary(self.trainer, "fit")

    def after_test(self) -> None:
        print_summary(self.trainer, "test")

    def after_predict(self) -> None:
        print_summary(self.trainer, "predict")


def explain_trainer_error(err: Exception, config: Any) -> str:
    """The Trainer's configuration error in one line; a GPU asked for on a machine without one says what to set."""
    message = " ".join(str(err).split())
    accelerator = str((config.get("trainer") or {}).get("accelerator", ""))
    if "gpu backend" in message.lower() or (accelerator in ("gpu", "cuda") and not torch.cuda.is_available()):
        return (f"this config asks for trainer.accelerator {accelerator!r}, but no GPU is available here "
                f"({message}); on a CPU add --trainer.accelerator cpu --trainer.devices 1 (and "
                "--trainer.precision 32-true for a mixed-precision config).")
    return f"the trainer settings are not valid here: {message}"


def print_summary(trainer: Any, stage: str) -> None:
    """What a finished command leaves, on rank 0: best val/acc and its step, test acc, the files, TensorBoard."""
    log_dir = trainer.log_dir  # on every rank: Lightning broadcasts it under DDP
    if not trainer.is_global_zero or trainer.interrupted:
        return
    lines = []
    best = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
    if stage == "fit" and best is not None and best.best_model_score is not None:
        step = read_checkpoint(best.best_model_path, "best.ckpt").get("global_step") if best.best_model_path else None
        lines.append(f"best {best.monitor} {100 * float(best.best_model_score):.2f}%"
                     + (f" at step {step}" if step is not None else "") + f": {best.best_model_path}")
    last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint) and c.last_saved_path), None)
    if stage == "fit" and last is not None:
        lines.append(f"latest state (resume with --ckpt_path): {last.last_saved_path}")
    if stage == "test" and "test/acc" in trainer.callback_metrics:
        lines.append(f"test/acc {100 * float(trainer.callback_metrics['test/acc']):.2f}%")
    writer = next((c for c in trainer.callbacks if isinstance(c, PredictionWriter) and c.written), None)
    if stage == "predict" and writer is not None:
        lines.append(f"predictions: {writer.written}")
    if log_dir and stage != "predict":
        lines.append(f"TensorBoard: tensorboard --logdir {os.path.dirname(log_dir.rstrip(os.sep))}")
    if lines:
        print("\n".join(f"kd-lightning: {line}" for line in lines))


def quiet_lightning_notices() -> None:
    """Silence what every run printed and no user acts on: Lightning's LitLogger tip and torch's LeafSpec
    deprecation (raised inside Lightning)."""
    class NoTip(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in str(record.msg).lower()

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, NoTip) for f in rank_zero.filters):
        rank_zero.addFilter(NoTip())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def resolve_teacher_run(config: Any, logger: Any) -> None:
    """Set ``model.init_args.teacher_checkpoint`` from ``teacher_run`` (the newest ``best.ckpt`` of that run) when
    the model has a teacher to load and no checkpoint is given."""
    init_args = (config.get("model") or {}).get("init_args") if hasattr(config.get("model"), "get") else None
    teacher_run = config.get("teacher_run")
    if not teacher_run or init_args is None or "teacher_checkpoint" not in init_args:
        return
    if init_args.get("teacher") is None or init_args.get("teacher_checkpoint") is not None \
            or init_args.get("teacher_pretrained"):
        return
    save_dir = (logger.get("save_dir") if logger is not None else None) or "logs"
    found = glob.glob(os.path.join(glob.escape(os.path.join(save_dir, teacher_run)), "*", "checkpoints", "best.ckpt"))
    if not found:
        raise FileNotFoundError(
            f"teacher_run {teacher_run!r}: no trained teacher yet (no {os.path.join(save_dir, teacher_run)}/*/"
            f"checkpoints/best.ckpt, resolved from {os.getcwd()!r}). Train it first (kd-lightning fit with the "
            "folder's teacher.yaml), or give --model.init_args.teacher_checkpoint PATH.")
    init_args["teacher_checkpoint"] = max(found, key=os.path.getmtime)


def _version_folder(version: int | str) -> str:
    """The folder a logger version names (Lightning's loggers: ``version_<n>`` for an int)."""
    return version if isinstance(version, str) else f"version_{version}"


def _in_slurm_job() -> bool:
    return SLURMEnvironment.detect() and slurm_job_id() is not None


def _logger_init_args(config: Any) -> Any:
    """The ``init_args`` of the configured logger when it is one with save_dir/name/version, else None."""
    logger = config.trainer.get("logger")
    if logger is None or isinstance(logger, (bool, list)) or not hasattr(logger, "get"):
        return None
    init_args = logger.get("init_args")
    if init_args is None or "version" not in init_args or "save_dir" not in init_args:
        return None
    return init_args


def check_checkpoint_matches_config(checkpoint: dict[str, Any], model_config: Any, path: str) -> None:
    """A clear error when the checkpoint's saved hyperparameters name another module class, or other networks,
    than the config's ``model`` section (LightningCLI would otherwise switch to the checkpoint's silently)."""
    saved = checkpoint.get("hyper_parameters") or {}
    if not saved or model_config is None or not hasattr(model_config, "get"):
        return  # nothing to compare: the weights' shapes are checked once the model is built
    saved_class, config_class = saved.get("_class_path"), model_config.get("class_path")
    if not saved_class and config_class:  # saved from Python: the weights' prefix says which module class wrote it
        held = {k.split(".", 1)[0] for k in checkpoint["state_dict"]} & set(NETWORK_PREFIXES)
        wanted = getattr(_import_class(config_class), "network_attr", None)
        if wanted is not None and len(held) == 1 and held != {wanted}:
            raise ValueError(f"--ckpt_path {path!r} holds a {NETWORK_PREFIXES[held.pop()]}, but the config trains a "
                             f"{config_class.rsplit('.', 1)[-1]}. Resume or test with the config the checkpoint was "
                             "trained with.")
    if saved_class and config_class and saved_class.rsplit(".", 1)[-1] != config_class.rsplit(".", 1)[-1]:
        raise ValueError(f"--ckpt_path {path!r} holds a {saved_class.rsplit('.', 1)[-1]} run, but the config trains "
                         f"a {config_class.rsplit('.', 1)[-1]} ({config_class}). Resume or test with the config the "
                         "checkpoint was trained with.")
    init_args = model_config.get("init_args") or {}
    differ = [f"{key}: {value!r} in the checkpoint, {plain_value(init_args.get(key))!r} in the config"
              for key, value in architecture_settings(saved).items()
              if key in init_args and plain_value(init_args.get(key)) != plain_value(value)]
    if differ:
        raise ValueError(f"--ckpt_path {path!r} was trained with another architecture than the config asks for "
                         f"({'; '.join(differ)}). Use the model settings of the run that wrote the checkpoint.")


def _import_class(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_checkpoint_fits(checkpoint: dict[str, Any], model: Any, path: str) -> None:
    """A clear error when ``checkpoint`` was written by another module class or for other networks than
    ``model``'s (Lightning would fail later with a long key listing, after logs were written)."""
    check_state_fits(checkpoint["state_dict"], model.state_dict(), f"--ckpt_path {path!r}",
                     f"a {type(model).__name__}")


def cli_main(args: list[str] | None = None, run: bool = True, callbacks: list[Any] | None = None,
             trainer_on_cpu: bool = False) -> KDLightningCLI:
    """Build the CLI (and run the subcommand); ``args`` as on the command line, e.g. for tests. ``callbacks``: added
    to the trainer's, outside the config (what a study adds to watch a run: not a setting of the run).
    ``trainer_on_cpu`` (with ``run=False``): build the trainer on the CPU whatever the config's hardware, to check a
    run that will train on another machine; ``cli.config`` keeps the config's hardware settings."""
    from lightning.pytorch import LightningDataModule, LightningModule

    quiet_lightning_notices()
    defaults = {**TRAINER_DEFAULTS, **({"callbacks": list(callbacks)} if callbacks else {})}
    try:
        return KDLightningCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            trainer_defaults=defaults, seed_everything_default=0, args=args, run=run, trainer_on_cpu=trainer_on_cpu,
            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
            parser_kwargs={"description": __doc__, "allow_abbrev": False},
        )
    except InputError as err:  # bad input only a run finds (a download that fails): one line, nothing written
        exit_with_error(err)


def main(argv: list[str] | None = None) -> None:
    cli_main(argv)
