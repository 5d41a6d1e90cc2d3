"""How every ``kd-lightning`` command reports bad input: one line ``kd-lightning: error: ...`` and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn

INPUT_ERRORS = (ValueError, FileNotFoundError)  # what our checks raise for bad input


def exit_with_error(err: BaseException | str) -> NoReturn:
    """Print ``kd-lightning: error: <err>`` (on one line) to stderr and exit with status 2."""
    print(f"kd-lightning: error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)


def root_cause(err: BaseException) -> BaseException:
    """The deepest ValueError/FileNotFoundError in the ``__cause__`` chain (our message), else ``err``."""
    found = err
    while err.__cause__ is not None:
        err = err.__cause__
        if isinstance(err, INPUT_ERRORS):
            found = err
    return found


def run_reporting_errors(command: Callable[[], Any]) -> Any:
    """Run ``command``; a ValueError/FileNotFoundError (bad input) becomes one error line and exit status 2."""
    try:
        return command()
    except INPUT_ERRORS as err:
        exit_with_error(err)


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


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown option, a bad choice) as the one error line of every command instead
    of the usage text and a second line."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(f"{self.prog}: {message} (see {self.prog} --help)")
