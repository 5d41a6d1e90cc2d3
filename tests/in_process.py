"""``kd-lightning ARGS`` run inside the test process, as the command line runs it: the same entry point
(:func:`kd_lightning.commands.main`), its output and exit status captured like a subprocess's, minus the seconds a
new Python process spends importing torch and Lightning. Tests that need a real process (signals, kill -9, DDP,
the installed script itself) still start one."""

from __future__ import annotations

import contextlib
import io
import os
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch


def run_cli(cwd: str | Path, *args: str) -> SimpleNamespace:
    """``returncode``, ``stdout`` and ``stderr`` of ``kd-lightning *args`` run in ``cwd`` (restored after, with the
    thread count)."""
    from kd_lightning.commands import main

    out, err = io.StringIO(), io.StringIO()
    before, threads = os.getcwd(), torch.get_num_threads()
    code = 0
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # noqa: BLE001 - reported as a subprocess would: a traceback and status 1
        err.write(traceback.format_exc())
        code = 1
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
