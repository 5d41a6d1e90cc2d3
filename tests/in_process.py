"""``kd-lightning ARGS`` run inside the test process, as the command line runs it: the same entry point
(:func:`kd_lightning.commands.main`), its output and exit status captured like a subprocess's, minus the seconds a
new Python process spends importing torch and Lightning. Tests that need a real process (signals, kill -9, DDP,
the installed script itself) still start one."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
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


def fork_cli(cwd: str | Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> SimpleNamespace:
    """``kd-lightning *args`` in a forked child of this process: a real process (signals, ``kill -9`` and exit
    statuses as for a subprocess: ``returncode`` is ``-signal`` when one ended it) that starts in milliseconds,
    torch and Lightning being imported already. Output is captured through files."""
    import signal
    import tempfile
    import time

    from kd_lightning.commands import main

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns to pytest
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
                # logging as a new process has it (earlier tests may have changed levels and handlers)
                logging.getLogger().handlers = []
                for name in ("lightning.pytorch", "lightning.fabric"):
                    lightning_logger = logging.getLogger(name)
                    lightning_logger.setLevel(logging.INFO)
                    lightning_logger.handlers = [logging.StreamHandler(sys.stderr)]
                    lightning_logger.propagate = False
                os.chdir(cwd)
                os.environ.update(env or {})
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                main([str(a) for a in args])
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported as a subprocess would
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"kd-lightning {' '.join(map(str, args))} ran past {timeout} s")
            time.sleep(0.05)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.seek(0)
        err.seek(0)
        return SimpleNamespace(returncode=code, stdout=out.read(), stderr=err.read())
