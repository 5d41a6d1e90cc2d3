"""Is decoding the bottleneck? Train-loader images/s alone vs the training step's images/s, in one run.

    python benchmarks/loader_throughput.py --config experiments/flowers/base.yaml \
        --config experiments/flowers/kd.yaml --model.init_args.teacher_checkpoint null

Arguments after the script's own (``--batches``, ``--steps``, ``--workers``) are those of ``kd-lightning fit``
(configs and overrides); the DataModule and the LightningModule are built from them exactly as for training
(teacher weights do not matter for speed, hence ``teacher_checkpoint null``). Three numbers:

1. **loader**: images/s of ``train_dataloader()`` alone (decode + per-image transforms + collate), for each
   ``--workers`` value;
2. **step**: images/s of ``Trainer.fit`` on batches already in memory (forward, loss, backward, optimizer: no
   decoding at all);
3. **fit**: images/s of ``Trainer.fit`` on the real DataModule (what a run sees).

The loader/step ratio says how much headroom decoding has: above 1 it can keep up (with workers it runs in
parallel with the step; with ``num_workers=0`` the two times add up, which ``fit`` shows).

``--decoded-cache DIR`` also times the loader of the same DataModule with ``decoded_cache: DIR`` (images decoded
once into a memory-mapped file, :mod:`kd_lightning.data.decoded`; built first when needed, not timed), prints
the decoded/JPEG ratio, and runs ``step`` and ``fit`` on it:

    python benchmarks/loader_throughput.py --decoded-cache /tmp/dc --workers 0 1 \
        --config experiments/flowers/base.yaml --config experiments/flowers/scratch.yaml
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader


class _StepTimer(Callback):
    """Wall time of training batches ``skip`` .. end (the first ones warm up allocators and threads)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.end, self.batches = skip, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.batches += 1
            self.end = time.perf_counter()


def loader_rate(loader: DataLoader, batches: int, skip: int = 2) -> float:
    it = iter(loader)
    for _ in range(skip):  # worker start-up
        next(it)
    start, images = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        images += batch[0].shape[0]
    return images / (time.perf_counter() - start)


def fit_rate(module, steps: int, batch_size: int, **fit_kwargs) -> float:
    skip = 2
    timer = _StepTimer(skip)
    trainer = Trainer(max_steps=steps + skip, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                      num_sanity_val_steps=0)
    trainer.fit(module, **fit_kwargs)
    return timer.batches * batch_size / (timer.end - timer.start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30, help="batches timed for the loader")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="num_workers values to time the loader with (default: the config's)")
    parser.add_argument("--decoded-cache", metavar="DIR", default=None,
                        help="also time the loader reading from a decoded-image cache in DIR (built when needed)")
    args, cli_args = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*in eval mode at the start of training.*")

    from kd_lightning.commands.cli import cli_main

    cli = cli_main(cli_args, run=False)
    dm, module = cli.datamodule, cli.model
    dm.setup("fit")
    bs = dm.batch_size
    print(f"data: {type(dm).__name__} input {dm.input_shape}, batch {bs}, {len(dm.train_set)} training rows; "
          f"model: {type(module).__name__}; torch threads: {torch.get_num_threads()}")

    source = "JPEG files"
    worker_counts = args.workers if args.workers is not None else [dm.num_workers]
    rates = {}
    for workers in worker_counts:
        dm.num_workers, dm.persistent_workers = workers, False
        rates[workers] = loader_rate(dm.train_dataloader(), args.batches)
        print(f"loader alone, num_workers={workers}: {rates[workers]:8.1f} images/s")
    if args.decoded_cache is not None:
        jpeg, source = rates, "decoded cache"
        dm = cli_main([*cli_args, "--data.init_args.decoded_cache", args.decoded_cache], run=False).datamodule
        dm.prepare_data()  # builds the cache when it is missing or stale (not timed)
        dm.setup("fit")
        rates = {}
        for workers in worker_counts:
            dm.num_workers, dm.persistent_workers = workers, False
            rates[workers] = loader_rate(dm.train_dataloader(), args.batches)
            print(f"loader alone, decoded cache, num_workers={workers}: {rates[workers]:8.1f} images/s "
                  f"({rates[workers] / jpeg[workers]:.1f}x the JPEG loader)")

    dm.num_workers = 0
    batches = [next(iter(dm.train_dataloader())) for _ in range(4)]
    cached = DataLoader(batches * (args.steps + 4), batch_size=None)  # the same few batches, no decoding
    step = fit_rate(module, args.steps, bs, train_dataloaders=cached)
    print(f"training step (batches in memory):  {step:8.1f} images/s")

    best_workers = max(rates, key=rates.get)
    dm.num_workers = best_workers
    fit = fit_rate(module, args.steps, bs, datamodule=dm)
    print(f"fit on the DataModule ({source}, num_workers={best_workers}): {fit:8.1f} images/s")
    for workers, rate in rates.items():
        print(f"ratio loader/step ({source}, num_workers={workers}): {rate / step:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
