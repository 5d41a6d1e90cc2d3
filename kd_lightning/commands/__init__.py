"""The ``kd-lightning`` command: Lightning's ``fit | validate | test | predict`` on experiment configs (LightningCLI),
and kd_lightning's own commands. Each command module has a ``main(argv)``; bad input ends every one of them with one
line ``kd-lightning: error: ...`` and exit status 2 (:mod:`kd_lightning.commands.errors`).
"""

from __future__ import annotations

import importlib
import os
import sys

# LightningCLI's subcommands on experiment configs, and kd-lightning's own: name -> what it does
LIGHTNING_COMMANDS = {
    "fit": "train a run from its configs: --config experiments/digits/base.yaml --config experiments/digits/kd.yaml",
    "validate": "the validation split's metrics of a checkpoint (--ckpt_path)",
    "test": "the test split's metrics of a checkpoint (--ckpt_path)",
    "predict": "a checkpoint's predictions (and its teacher's, --prediction.teacher true) in predictions.csv",
}
# kd-lightning's own commands: name -> (module with a main(argv), what it does)
COMMANDS = {
    "study": ("kd_lightning.commands.study", "many runs and seeds from one study YAML, with one results table"),
    "tune": ("kd_lightning.commands.tune.command", "a hyperparameter search on validation (Optuna), best.yaml and figures"),
    "quickstart": ("kd_lightning.commands.quickstart", "the digits study: teacher, KD and scratch students (1-2 min)"),
    "evaluate": ("kd_lightning.commands.evaluate", "teacher and students side by side: accuracy, calibration, cost"),
    "export": ("kd_lightning.commands.export", "the student alone as ONNX / TorchScript, checked against PyTorch"),
}


def overview() -> str:
    """``kd-lightning --help``: every command, one line each."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *COMMANDS]))
    lines = ["usage: kd-lightning COMMAND [OPTIONS]   (kd-lightning COMMAND --help: the command's options)", "",
             "Knowledge distillation on PyTorch Lightning: experiments from YAML, one command each.", "",
             "Runs from configs (LightningCLI: configs merge left to right, any key overridable):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "Studies and students:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Every command takes --threads N (CPU threads). Bad input ends with one line "
              "'kd-lightning: error: ...' (exit status 2) before anything is written."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``kd-lightning ARGS`` (``argv``: the arguments after the program name; None: the command line's)."""
    try:
        _dispatch(argv)
    except BrokenPipeError:  # the reader of our output left (``kd-lightning study S --status | head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(141)  # 128 + SIGPIPE, as a shell pipeline reports it


def _dispatch(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return
    if args and args[0] in COMMANDS:
        importlib.import_module(COMMANDS[args[0]][0]).main(args[1:])
        return
    from kd_lightning.commands.cli import cli_main

    cli_main(argv)  # None: LightningCLI reads the command line itself
