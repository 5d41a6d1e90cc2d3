"""What each distillation method costs per training step, relative to Hinton KD, measured in one interleaved run.

Every method is built from its run file in ``--folder`` (default ``experiments/cifar10``: ResNet-56 teacher ->
ResNet-20 student, 32 px) exactly as ``kd-lightning fit`` builds it (``cli_main(run=False)``, the teacher with
random weights: its values do not change the cost), then timed on the same in-memory batches (no data loading):
a training step is the teacher's forward (no grad) and the taps, the student's forward, every term, backward and
the optimizer step. Each round times every method once (``--steps`` steps after warm-up); the ratio to Hinton KD
is the median over ``--rounds`` of the ratio within a round, so a load change on the machine cancels. Also: the
extra parameters a method trains (adapters, embeddings) and the bytes of its buffers (CRD's memory bank, sized
for the folder's training set).

    python benchmarks/method_step_cost.py                       # CPU, batch 64, every method of experiments/cifar10
    python benchmarks/method_step_cost.py --methods kd crd vid --rounds 3
    python benchmarks/method_step_cost.py --folder experiments/cifar100 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from kd_lightning.commands.cli import cli_main

SKIP = {"base.yaml", "teacher.yaml", "paper.yaml"}


def method_files(folder: Path, names: list[str] | None) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.glob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        if path.name in SKIP or "runs" in config or "name" not in config:
            continue
        files[path.stem] = path
    if names:
        unknown = [n for n in names if n not in files]
        if unknown:
            raise SystemExit(f"--methods: no run file for {unknown} in {folder}; valid: {', '.join(files)}")
        files = {n: files[n] for n in names}
    return files


def build(folder: Path, path: Path, device: torch.device, train_rows: int, image_size: int):
    module = cli_main([f"--config={folder / 'base.yaml'}", f"--config={path}", "--teacher_run=null",
                       "--trainer.logger=false", "--trainer.accelerator=cpu"], run=False).model
    module.build_terms((3, image_size, image_size))  # adapters and embeddings, from the features' shapes
    module = module.to(device).train()
    if module.index_terms():  # CRD: a bank of the folder's training-set size
        module.bind_train_rows(torch.arange(train_rows) % module.num_classes)
    optimizer = torch.optim.SGD([p for g in module.trainable_parameters() for p in g["params"]], lr=0.01,
                                momentum=0.9)
    return module, optimizer


def run_steps(module, optimizer, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        out = module.step(batch)
        loss = module.losses(out)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if batches[0][0].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="experiments/cifar10")
    parser.add_argument("--methods", nargs="*", help="run-file names (default: every method of the folder)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-rows", type=int, default=4500, help="training-set size for CRD's bank")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    folder, device = Path(args.folder), torch.device(args.device)
    files = method_files(folder, args.methods)
    if "kd" not in files:
        files = {"kd": folder / "kd.yaml", **files}
    built = {name: build(folder, path, device, args.train_rows, args.image_size) for name, path in files.items()}
    print(f"{len(built)} methods built", file=sys.stderr, flush=True)
    num_classes = built["kd"][0].num_classes
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device),
                torch.randint(0, num_classes, (args.batch_size,), generator=gen).to(device),
                torch.randint(0, args.train_rows, (args.batch_size,), generator=gen).to(device))
               for _ in range(args.steps)]
    for module, optimizer in built.values():  # warm-up (and CRD's normalising constants)
        run_steps(module, optimizer, batches[:2])
    times: dict[str, list[float]] = {name: [] for name in built}
    for round_ in range(args.rounds):
        for name, (module, optimizer) in built.items():
            times[name].append(run_steps(module, optimizer, batches))
        print(f"round {round_ + 1}/{args.rounds} timed", file=sys.stderr, flush=True)
    print(f"device {device}, batch {args.batch_size}, {args.image_size} px, {args.steps} steps x {args.rounds} "
          f"rounds, threads {torch.get_num_threads()}; folder {folder}")
    print(f"{'method':<12} {'ms/step':>8} {'x Hinton KD':>12} {'trained extra':>14} {'buffers':>10}")
    for name, (module, _) in built.items():
        ratio = statistics.median(t / k for t, k in zip(times[name], times["kd"]))
        ms = 1000 * statistics.median(times[name]) / args.steps
        extra = sum(p.numel() for p in module.terms.parameters())
        buffers = sum(b.numel() * b.element_size() for b in module.terms.buffers())
        print(f"{name:<12} {ms:8.1f} {ratio:12.2f} {extra:14,d} {buffers / 2**20:9.1f}M")


if __name__ == "__main__":
    main()
