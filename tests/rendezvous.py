"""A callback for tests of parallel workers: each process's first fit waits at its start until ``peers`` processes
have arrived (a file per process in ``folder``), so that every worker is known to take a trial at the same time
however late it started. Named in a config as ``rendezvous.Rendezvous`` with ``tests/`` on ``PYTHONPATH``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Rendezvous(Callback):
    def __init__(self, folder: str, peers: int = 2, timeout_s: float = 120.0) -> None:
        self.folder, self.peers, self.timeout_s = Path(folder), peers, timeout_s

    def on_train_start(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self.folder / str(os.getpid())
        if mine.exists():
            return  # this process waited once already
        mine.touch()
        deadline = time.time() + self.timeout_s
        while len(list(self.folder.iterdir())) < self.peers and time.time() < deadline:
            time.sleep(0.05)
