"""The ``kd-lightning`` command: Lightning's ``fit | validate | test | predict`` on experiment configs (LightningCLI),
and kd_lightning's own commands. Each command module has a ``main(argv)``; bad input ends every one of them with one
line ``kd-lightning: error: ...`` and exit status 2 (:mod:`kd_lightning.commands.errors`).
"""

from __future__ import annotations

import importlib
import sys

# kd-lightning's own commands beside LightningCLI's: name -> (module with a main(argv), what it does)
COMMANDS = {
    "study": ("kd_lightning.commands.study", "many runs and seeds from one study YAML, with one results table"),
    "quickstart": ("kd_lightning.commands.quickstart", "the digits study: teacher, KD and scratch students (1-2 min)"),
    "evaluate": ("kd_lightning.commands.evaluate", "teacher and students side by side: accuracy, calibration, cost"),
    "export": ("kd_lightning.commands.export", "the student alone as ONNX / TorchScript, checked against PyTorch"),
}


def main(argv: list[str] | None = None) -> None:
    """``kd-lightning ARGS`` (``argv``: the arguments after the program name; None: the command line's)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        importlib.import_module(COMMANDS[args[0]][0]).main(args[1:])
        return
    from kd_lightning.commands.cli import cli_main

    cli_main(argv)  # None: LightningCLI reads the command line itself
