"""``kd-lightning``: LightningCLI for experiment configs, plus the embedded quickstart.

    kd-lightning fit --config experiments/digits/base.yaml --config experiments/digits/kd.yaml
    kd-lightning test --config ... --ckpt_path logs/.../checkpoints/best.ckpt
    kd-lightning fit --config ... --ckpt_path logs/.../checkpoints/last.ckpt   # resume, same log version
    kd-lightning quickstart
    kd-lightning evaluate --config ... --teacher CKPT --students CKPT ... --out DIR   # see kd_lightning/evaluate.py
    kd-lightning export --config ... --student CKPT --out DIR                       # see kd_lightning/export.py

Configs use ``class_path``/``init_args``; several ``--config`` files merge left to right, and the resolved
config is saved as ``config.yaml`` beside the run's TensorBoard logs. ``num_classes`` is linked from the
DataModule into the model, so a config never writes it twice.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# imported so that `--data.help`, `--model.help` and `trainer.callbacks` know kd_lightning's classes by name
import kd_lightning.callbacks  # noqa: F401
import kd_lightning.data  # noqa: F401
import kd_lightning.module  # noqa: F401
from kd_lightning.callbacks.last_checkpoint import RUN_KEY, LastCheckpoint, slurm_job_id

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # hp_metric is replaced by the modules' own hp/* metrics (TensorBoard's HPARAMS tab)
        "init_args": {"save_dir": "logs", "name": "kd", "default_hp_metric": False},
    },
}


class KDLightningCLI(LightningCLI):
    """LightningCLI with kd_lightning's defaults: TensorBoard under ``logs/``, a checkpoint of the best
    ``val/acc`` (settable as ``checkpoint.*``), ``last.ckpt`` as the latest state (:class:`LastCheckpoint`,
    settable as ``last_checkpoint.*``), resuming into the same log version, SLURM requeue, and model, data and
    checkpoint checks before anything is written."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
                             "checkpoint.filename": "best"})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")

    def _parse_ckpt_path(self) -> None:
        # Pinned to LightningCLI 2.6's private hook (tests/test_pinned_internals.py and test_resume.py break if it
        # goes): Lightning reads the --ckpt_path checkpoint here and lets its saved hyperparameters replace the
        # config's model, silently. First: a clear error for a file that is not a readable checkpoint, or one of
        # another module class or other networks than the config asks for; only then Lightning's merge.
        self._resume_from: dict[str, Any] | None = None
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            try:
                self._resume_from = _read_checkpoint(ckpt_path)
                check_checkpoint_matches_config(self._resume_from, self.config[self.config.subcommand].get("model"),
                                                ckpt_path)
            except ValueError as err:
                _exit_with_error(err)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Choose the log version (a resumed run continues its own; a SLURM job logs to ``slurm_<job id>``).
        Config edits only: nothing is written before the checks are done."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if self.subcommand != "fit":
            return
        logger = _logger_init_args(config)
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
        elif ckpt_path is None and logger is not None and logger.get("version") is None and _in_slurm_job():
            # One log folder per SLURM job, so that the requeued job (same id) finds its own last.ckpt.
            logger["version"] = f"slurm_{slurm_job_id()}"
        if _in_slurm_job() and logger is not None and config.trainer.get("default_root_dir") is None:
            # Lightning's requeue checkpoint (hpc_ckpt_<n>.ckpt) goes to default_root_dir: the run's folder,
            # not the working directory that other runs share.
            version = logger.get("version")
            if version is not None:
                config.trainer.default_root_dir = os.path.join(logger.get("save_dir") or ".",
                                                               logger.get("name") or "", _version_folder(version))

    def instantiate_classes(self) -> None:
        # jsonargparse wraps a constructor's error in a long union-validation report: show just the cause.
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - re-raised unless it is one of our clear input errors
            cause = _root_cause(err)
            if isinstance(cause, (ValueError, FileNotFoundError)) and cause is not err:
                _exit_with_error(cause)
            raise

    def _check_model_fits_data(self) -> None:
        # Before the trainer runs, so a mismatch writes nothing under logs/.
        input_shape = getattr(self.datamodule, "input_shape", None)
        if input_shape is not None and hasattr(self.model, "check_input_shape"):
            self.model.check_input_shape(input_shape)
        if self.subcommand == "fit":  # callbacks that check their settings against the model in setup
            for callback in self.trainer.callbacks:
                if hasattr(callback, "check_settings"):  # checks without side effects (TeacherCache)
                    callback.check_settings(self.model, self.datamodule)
                elif getattr(callback, "checks_settings_at_setup", False):
                    callback.setup(self.trainer, self.model, "fit")
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
        checkpoint = _read_checkpoint(path)
        if (checkpoint.get(RUN_KEY) or {}).get("slurm_job_id") != slurm_job_id():
            return  # a fixed checkpoint folder holding another job's run: never resume someone else's state
        check_checkpoint_fits(checkpoint, self.model, path)
        print(f"kd-lightning: requeued SLURM job {slurm_job_id()}: resuming from {path}", file=sys.stderr)
        config["ckpt_path"] = path

    def before_fit(self) -> None:
        try:
            self._check_model_fits_data()
            self._resume_requeued_slurm_job()
        except ValueError as err:
            _exit_with_error(err)

    def before_validate(self) -> None:
        try:
            self._check_model_fits_data()
        except ValueError as err:
            _exit_with_error(err)

    before_test = before_validate


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


def _read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (memory-mapped, tensors only), or a clear error saying what is wrong."""
    if not os.path.isfile(path):
        raise ValueError(f"--ckpt_path {path!r} does not exist (resolved from {os.getcwd()!r}). Pass a .ckpt "
                          "written by `kd-lightning fit`: logs/<name>/version_<n>/checkpoints/last.ckpt to resume, "
                          "best.ckpt to evaluate the best epoch.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any reason the file cannot be read is the same input error
        raise ValueError(f"--ckpt_path {path!r} cannot be read as a checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}). Is it truncated, or not a .ckpt "
                          "written by Lightning?") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"--ckpt_path {path!r} is not a Lightning checkpoint (no 'state_dict' entry); a plain "
                          "state_dict file can be a teacher_checkpoint, but not a run to resume or test.")
    return checkpoint


# the hyperparameters that decide the trained networks' shapes, per module class
_ARCHITECTURE_ARGS = ("model", "model_kwargs", "student", "student_kwargs")


def check_checkpoint_matches_config(checkpoint: dict[str, Any], model_config: Any, path: str) -> None:
    """A clear error when the checkpoint's saved hyperparameters name another module class, or other networks,
    than the config's ``model`` section (LightningCLI would otherwise switch to the checkpoint's silently)."""
    saved = checkpoint.get("hyper_parameters") or {}
    if not saved or model_config is None or not hasattr(model_config, "get"):
        return  # nothing to compare: the weights' shapes are checked once the model is built
    saved_class, config_class = saved.get("_class_path"), model_config.get("class_path")
    if saved_class and config_class and saved_class.rsplit(".", 1)[-1] != config_class.rsplit(".", 1)[-1]:
        raise ValueError(f"--ckpt_path {path!r} holds a {saved_class.rsplit('.', 1)[-1]} run, but the config trains "
                         f"a {config_class.rsplit('.', 1)[-1]} ({config_class}). Resume or test with the config the "
                         "checkpoint was trained with.")
    init_args = model_config.get("init_args") or {}
    differ = [f"{key}: {saved[key]!r} in the checkpoint, {plain_value(init_args.get(key))!r} in the config"
              for key in _ARCHITECTURE_ARGS
              if key in saved and key in init_args and plain_value(init_args.get(key)) != plain_value(saved[key])]
    if differ:
        raise ValueError(f"--ckpt_path {path!r} was trained with another architecture than the config asks for "
                         f"({'; '.join(differ)}). Use the model settings of the run that wrote the checkpoint.")


def plain_value(value: Any) -> Any:
    """jsonargparse Namespaces and tuples as plain dicts and lists, as YAML gives them back: to compare a config's
    values with saved hyperparameters or a signature's defaults (``(0.25, 1.0)`` equals ``[0.25, 1.0]``)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def check_checkpoint_fits(checkpoint: dict[str, Any], model: Any, path: str) -> None:
    """A clear error when ``checkpoint`` was written by another module class or for other networks than
    ``model``'s (Lightning would fail later with a long key listing, after logs were written)."""
    saved = checkpoint["state_dict"]
    own = model.state_dict()
    saved_roots, own_roots = {k.split(".", 1)[0] for k in saved}, {k.split(".", 1)[0] for k in own}
    holder = {"model": "ClassifierModule (a teacher or scratch run: model.* weights)",
              "student": "DistillationModule (a KD run: student.* weights)"}
    if saved_roots != own_roots:
        found = " / ".join(holder.get(r, f"{r}.*") for r in sorted(saved_roots)) or "no weights"
        wanted = " / ".join(holder.get(r, f"{r}.*") for r in sorted(own_roots))
        raise ValueError(f"--ckpt_path {path!r} holds a {found}, but the config trains a {type(model).__name__}: "
                         f"{wanted}. Resume or test with the config the checkpoint was trained with.")
    differ = [f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} in the config"
              for k, v in own.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if differ or missing or extra:
        details = "; ".join(differ[:3] + ([f"missing {missing[:3]}"] if missing else [])
                            + ([f"unexpected {extra[:3]}"] if extra else []))
        raise ValueError(f"--ckpt_path {path!r} was trained with another {'/'.join(sorted(own_roots))} "
                         f"architecture than the config builds ({details}). Check the model name and its "
                         "*_kwargs against the run that wrote the checkpoint.")


def _root_cause(err: BaseException) -> BaseException:
    """The deepest ValueError/FileNotFoundError in the ``__cause__`` chain (our message), else ``err``."""
    found = err
    while err.__cause__ is not None:
        err = err.__cause__
        if isinstance(err, (ValueError, FileNotFoundError)):
            found = err
    return found


def _exit_with_error(err: BaseException) -> None:
    print(f"kd-lightning: error: {err}", file=sys.stderr)
    sys.exit(2)


def cli_main(args: list[str] | None = None, run: bool = True) -> KDLightningCLI:
    """Build the CLI (and run the subcommand); ``args`` as on the command line, e.g. for tests."""
    from lightning.pytorch import LightningDataModule, LightningModule

    return KDLightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0, args=args, run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__, "allow_abbrev": False},
    )


# kd-lightning's own subcommands beside LightningCLI's fit/validate/test/predict: module with a main(argv)
_COMMANDS = {"quickstart": "kd_lightning.quickstart", "study": "kd_lightning.study",
             "evaluate": "kd_lightning.evaluate", "export": "kd_lightning.export"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in _COMMANDS:
        importlib.import_module(_COMMANDS[sys.argv[1]]).main(sys.argv[2:])
        return
    cli_main()


if __name__ == "__main__":
    main()
