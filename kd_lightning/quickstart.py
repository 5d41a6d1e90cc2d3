"""The classic three-run study on scikit-learn's bundled digits (1,797 real 8x8 images; no download).

For each seed: train a teacher, distill a student from it, and train the same student from scratch with the
same data, optimizer and number of optimizer steps; then report test accuracy (mean ± std over seeds),
parameters, size on disk and CPU latency per image. Two blocks:

* **all labels** -- every run sees every training label;
* **10% labels** -- the students see the same 10% of the training labels (stratified, seeded). The scratch
  student trains on those labelled rows alone; the KD student also sees the other 90% of the training images as
  unlabelled rows, learning the teacher's predictions there (a transfer set). The teacher is trained on all
  labels (``--teacher-labels all``, the default) or on the same 10% only (``--teacher-labels same``).

All runs of a block take the same number of optimizer steps: ``epochs`` passes over the whole training set at
``batch_size`` (runs on the labelled rows alone simply cycle them more often).

    kd-lightning quickstart            # or: python -m kd_lightning.quickstart
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from kd_lightning.data import DigitsDataModule
from kd_lightning.measure import count_parameters, latency_us, size_on_disk_kb
from kd_lightning.module import ClassifierModule, DistillationModule

TEACHER = {"model": "mlp", "model_kwargs": {"hidden": [256, 256], "dropout": 0.2}}
STUDENT = {"model": "mlp", "model_kwargs": {"hidden": [32]}}
OPTIMIZER = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "lr_scheduler": "cosine"}
KD = {"temperature": 4.0, "alpha": 0.9}
BLOCKS = {"all labels": 1.0, "10% labels": 0.1}


@dataclass
class RunResult:
    block: str
    run: str
    seed: int
    test_acc: float
    params: int
    size_kb: float
    latency_us: float


def _trainer(max_steps: int, log_dir: str, name: str) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", devices=1,
                     logger=TensorBoardLogger(log_dir, name=name, version="", default_hp_metric=False),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     check_val_every_n_epoch=10, log_every_n_steps=10, num_sanity_val_steps=0)


def _measure(block: str, run: str, seed: int, net: torch.nn.Module, acc: float,
             input_shape: tuple[int, ...]) -> RunResult:
    # best of 300 single-image passes: the stable statistic on a shared machine (noise only ever adds time)
    return RunResult(block, run, seed, acc, count_parameters(net), size_on_disk_kb(net),
                     latency_us(net, input_shape, statistic=min))


def run_seed(seed: int, blocks: dict[str, float], epochs: int, batch_size: int, log_dir: str,
             teacher_labels: str = "all") -> list[RunResult]:
    """One seed: a teacher, then a KD and a scratch student for each labelled fraction.

    ``teacher_labels="all"``: one teacher trained on all labels teaches every block (it knows more than the
    students' labels); ``"same"``: each block trains its own teacher on that block's labelled rows only.
    """

    def data(labelled_fraction: float = 1.0, use_unlabelled: bool = True) -> DigitsDataModule:
        return DigitsDataModule(batch_size=batch_size, labelled_fraction=labelled_fraction,
                                use_unlabelled=use_unlabelled, split_seed=seed)

    probe = data()
    probe.setup()
    steps = epochs * len(probe.train_dataloader())  # the same optimizer steps for every run
    input_shape = probe.input_shape

    def fit_and_test(module: L.LightningModule, dm: DigitsDataModule, name: str) -> float:
        L.seed_everything(seed, verbose=False)
        trainer = _trainer(steps, log_dir, f"{name}/seed_{seed}")
        trainer.fit(module, dm)
        return trainer.test(module, dm, verbose=False)[0]["test/acc"]

    def train_teacher(fraction: float, name: str) -> tuple[ClassifierModule, RunResult]:
        L.seed_everything(seed, verbose=False)
        teacher = ClassifierModule(num_classes=10, **TEACHER, **OPTIMIZER)
        acc = fit_and_test(teacher, data(fraction, use_unlabelled=False), name)
        label = "teacher (all labels)" if fraction == 1.0 else "teacher (same labels)"
        return teacher, _measure("", label, seed, teacher.model, acc, input_shape)

    shared = train_teacher(1.0, "teacher") if teacher_labels == "all" else None
    results = []
    for block, fraction in blocks.items():
        tag = block.replace("% ", "pct_").replace(" ", "_")
        teacher, teacher_result = shared or train_teacher(fraction, f"{tag}/teacher")
        results.append(replace(teacher_result, block=block))

        L.seed_everything(seed, verbose=False)
        kd = DistillationModule(student=STUDENT["model"], student_kwargs=STUDENT["model_kwargs"],
                                teacher=teacher.model, num_classes=10, **KD, **OPTIMIZER)
        acc = fit_and_test(kd, data(fraction, use_unlabelled=True), f"{tag}/kd_student")
        results.append(_measure(block, "KD student", seed, kd.student, acc, input_shape))

        # the fair baseline: the same student, labelled rows only, same steps, optimizer and data pipeline
        L.seed_everything(seed, verbose=False)
        scratch = ClassifierModule(num_classes=10, **STUDENT, **OPTIMIZER)
        acc = fit_and_test(scratch, data(fraction, use_unlabelled=False), f"{tag}/scratch_student")
        results.append(_measure(block, "scratch student", seed, scratch.model, acc, input_shape))
    return results


def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    rows = []
    for block in dict.fromkeys(r.block for r in results):
        for run in dict.fromkeys(r.run for r in results if r.block == block):
            rs = [r for r in results if r.block == block and r.run == run]
            accs = [100 * r.test_acc for r in rs]
            rows.append({
                "block": block, "run": run, "seeds": len(rs),
                "test_acc_mean": statistics.mean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "params": rs[0].params, "size_kb": rs[0].size_kb,
                "latency_us": min(r.latency_us for r in rs),
            })
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| labels | run | test acc (%) | params | size on disk | CPU latency / image |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['run']} | {r['test_acc_mean']:.1f} ± {r['test_acc_std']:.1f} "
                     f"| {r['params']:,} | {r['size_kb']:.1f} KB | {r['latency_us']:.0f} µs |")
    lines.append("\nTest accuracy: mean ± sample std over seeds (n = seeds); latency: best of 300 single-image "
                 "forward passes on one CPU thread.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="kd-lightning quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="passes over the whole training set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks", nargs="+", choices=list(BLOCKS), default=list(BLOCKS))
    parser.add_argument("--teacher-labels", choices=["all", "same"], default="all",
                        help="teacher trained on all labels (default), or on each block's labelled rows only")
    parser.add_argument("--out", default="logs/quickstart", help="folder for the table and TensorBoard runs")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")

    torch.set_num_threads(1)  # these networks are tiny: extra threads only add synchronisation (and stall on a busy CPU)
    start = time.perf_counter()
    results: list[RunResult] = []
    # tiny runs trigger many advisory messages and warnings from Lightning; the table is what matters here
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in args.seeds:
            seed_results = run_seed(seed, {b: BLOCKS[b] for b in args.blocks}, args.epochs, args.batch_size,
                                    args.out, args.teacher_labels)
            results += seed_results
            print(f"[{time.perf_counter() - start:5.1f}s] seed {seed}: " + "; ".join(
                f"{r.block}: {r.run} {100 * r.test_acc:.1f}%" for r in seed_results), flush=True)
    rows = summarize(results)
    table = to_markdown(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Digits quickstart, {len(args.seeds)} seeds, {args.epochs} epochs\n\n{table}\n")
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nDigits (1,797 real 8x8 images): teacher vs KD student vs scratch student, "
          f"{len(args.seeds)} seeds, same optimizer steps per block\n\n{table}\n")
    print(f"Wrote {args.out}/results.md and results.csv; TensorBoard: tensorboard --logdir {args.out}"
          f"  ({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
