"""``kd-lightning``: LightningCLI for experiment configs, plus the embedded quickstart.

    kd-lightning fit --config experiments/digits/base.yaml --config experiments/digits/kd.yaml
    kd-lightning test --config ... --ckpt_path logs/.../checkpoints/last.ckpt
    kd-lightning quickstart

Configs use ``class_path``/``init_args``; several ``--config`` files merge left to right, and the resolved
config is saved as ``config.yaml`` beside the run's TensorBoard logs. ``num_classes`` is linked from the
DataModule into the model, so a config never writes it twice.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# imported so that `--data.help`, `--model.help` and `trainer.callbacks` know kd_lightning's classes by name
import kd_lightning.callbacks  # noqa: F401
import kd_lightning.data  # noqa: F401
import kd_lightning.module  # noqa: F401

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # hp_metric is replaced by the modules' own hp/* metrics (TensorBoard's HPARAMS tab)
        "init_args": {"save_dir": "logs", "name": "kd", "default_hp_metric": False},
    },
}


class KDLightningCLI(LightningCLI):
    """LightningCLI with kd_lightning's defaults: TensorBoard under ``logs/``, a checkpoint of the best
    ``val/acc`` plus ``last.ckpt`` (settable as ``checkpoint.*``), and model/data checks before training."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best"})

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
        if self.subcommand == "fit":  # kd_lightning callbacks check their settings against the model in setup
            for callback in self.trainer.callbacks:
                if type(callback).__module__.startswith("kd_lightning."):
                    callback.setup(self.trainer, self.model, "fit")

    def before_fit(self) -> None:
        try:
            self._check_model_fits_data()
        except ValueError as err:
            _exit_with_error(err)

    before_validate = before_fit
    before_test = before_fit


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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "quickstart":
        from kd_lightning.quickstart import main as quickstart_main

        quickstart_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "study":
        from kd_lightning.study import main as study_main

        study_main(sys.argv[2:])
        return
    cli_main()


if __name__ == "__main__":
    main()
