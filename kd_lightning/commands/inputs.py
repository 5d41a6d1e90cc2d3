"""What ``kd-lightning evaluate`` and ``kd-lightning export`` share: the data from an experiment's config files
and trained networks named on the command line.

* **Data**: ``--config experiments/digits/base.yaml`` (several merge left to right; a run's saved
  ``config.yaml`` works too), or ``--data.class_path``/``--data.init_args.*``. Only the ``data`` section is used;
  the run's other sections (``trainer``, ``model``, ...) are read and ignored, so configs load unchanged.
* **Networks**: ``[NAME=]CHECKPOINT``. A ``.ckpt`` written by ``kd-lightning fit`` records its architecture in
  its ``hyper_parameters``, so it needs no more; a plain state_dict file needs ``--arch``, e.g.
  ``--arch 'mlp {hidden: [32]}'``: a zoo name and, optionally, the builder's arguments as a YAML mapping.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule
from torch import nn

import kd_lightning.data  # noqa: F401 - so that `--data.help` and configs know kd_lightning's DataModules by name
from kd_lightning.checkpoints import Architecture, checkpoint_architecture, read_checkpoint
from kd_lightning.commands.errors import root_cause
from kd_lightning.models.loading import load_model

# top-level sections of a LightningCLI config other than `data`: accepted so that an experiment's files (or a
# run's saved config.yaml) can be passed as they are, and not used
_OTHER_CONFIG_SECTIONS = ("seed_everything", "trainer", "model", "optim", "name", "teacher_run", "checkpoint",
                          "last_checkpoint", "prediction", "ckpt_path", "weights_only")  # (threads: each command's own)
_ARCHITECTURE = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*)\s*(?P<kwargs>\{.*\})?\s*$", re.DOTALL)


def data_parser(prog: str, description: str | None) -> ArgumentParser:
    """A parser with ``--config`` and the ``data`` section of kd_lightning's experiment configs."""
    parser = ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="an experiment config (e.g. experiments/digits/base.yaml); only its data section is "
                             "used. Several merge left to right.")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True,
                                  help="the DataModule whose evaluation split is used")
    for section in _OTHER_CONFIG_SECTIONS:
        parser.add_argument(f"--{section}", type=Optional[Any], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the split to evaluate on (default: test)")
    return parser


def instantiate_data(parser: ArgumentParser, cfg: Namespace) -> LightningDataModule:
    """The DataModule of ``cfg``, set up for its ``--split``; it must know ``num_classes``."""
    data_only = cfg.clone()
    for section in _OTHER_CONFIG_SECTIONS:  # never instantiated: a config's trainer.logger would build a logger
        data_only[section] = None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    try:
        data = instantiate(data_only).data
    except Exception as err:  # jsonargparse wraps a constructor's error (a missing data folder) in its own
        cause = root_cause(err)
        if isinstance(cause, (ValueError, FileNotFoundError)) and cause is not err:
            raise cause from err
        raise
    if not isinstance(getattr(data, "num_classes", None), int):
        raise ValueError(f"{type(data).__name__} does not say its num_classes: kd-lightning evaluate/export need a "
                         "DataModule with a num_classes attribute (every kd_lightning.data DataModule has one).")
    data.setup(cfg.split if cfg.split == "test" else "validate")
    return data


def split_loader(data: LightningDataModule, split: str) -> Any:
    """The DataLoader of ``split`` ("test" or "val")."""
    return data.test_dataloader() if split == "test" else data.val_dataloader()


def parse_named_path(spec: str, default_name: str) -> tuple[str, str]:
    """``"kd=logs/x/best.ckpt"`` -> ``("kd", "logs/x/best.ckpt")``; ``"logs/x/best.ckpt"`` -> default name.

    Only a prefix without a path separator counts as a name, so paths that contain ``=`` still work."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        return name, path
    return default_name, spec


def parse_architecture(spec: str) -> Architecture:
    """``"mlp {hidden: [32]}"`` -> ``Architecture("mlp", {"hidden": [32]})``: a zoo name, optionally followed
    by its builder's arguments as a YAML mapping."""
    match = _ARCHITECTURE.match(spec)
    kwargs: Any = {}
    if match and match["kwargs"]:
        try:
            kwargs = yaml.safe_load(match["kwargs"])
        except yaml.YAMLError:
            kwargs = None
    if not match or not isinstance(kwargs, dict):
        raise ValueError(f"Cannot read the architecture {spec!r}: write a zoo name, optionally followed by its "
                         "arguments as a YAML mapping, e.g. 'mlp {hidden: [32]}' or 'resnet20'.")
    return Architecture(match["name"], kwargs)


def load_trained(path: str, num_classes: int, arch: Architecture | None = None) -> nn.Module:
    """The network in checkpoint ``path``, built for ``num_classes`` classes, in eval mode.

    Its architecture is ``arch`` if given, else the one the checkpoint's ``hyper_parameters`` record. Weights load
    strictly (:func:`kd_lightning.models.loading.load_model`): a checkpoint of another architecture or class count
    raises a ValueError that names what the checkpoint holds and what was asked for.
    """
    blob = read_checkpoint(path, "checkpoint")
    held = checkpoint_architecture(blob)
    wanted = arch or held
    if wanted is None:
        raise ValueError(f"{path!r} is a plain state_dict, which does not record its architecture: name it with "
                         "--arch, e.g. --arch 'mlp {hidden: [32]}' (a zoo name and its arguments).")
    try:
        return load_model(wanted.name, num_classes, checkpoint=path, **wanted.kwargs).eval()
    except ValueError as err:
        if held is None or arch is None:
            raise
        reason = str(err).rstrip(".") + ("" if str(err).rstrip().endswith("?") else ".")
        raise ValueError(f"{reason} The checkpoint holds {held} (its hyper_parameters); asked for {arch} with "
                         f"{num_classes} classes.") from err




def output_folder(path: str, flag: str = "--out") -> str:
    """Create the output folder ``path`` (and its missing parents) and check that a file can be written in it: a
    clear error naming the flag otherwise, with nothing left behind. Called before any work, so that a bad folder
    is not found after minutes of evaluation, or blamed on the network."""
    folder = os.path.abspath(path)
    created = next((p for p in [*reversed(Path(folder).parents), Path(folder)] if not p.exists()), None)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise ValueError(f"{flag} {path!r} cannot be written ({err.strerror or type(err).__name__}: "
                         f"{err.filename or folder}). Choose a folder you can write to.") from None
    return path
