"""How close do kd_lightning's distillation steps come to the bounds set by their networks? One interleaved run.

Online KD costs one teacher forward (no grad) plus one student training step per batch, so its throughput is
bounded by ``c = 1 / (1/a + 1/b)``; offline KD from a teacher cache costs the student step alone. On the same
models, batch and in-memory batches (no data loading), in ``--rounds`` interleaved rounds (every measurement once
per round, the median reported, so that a load change on the machine hits all of them alike):

a. teacher inference alone (no grad);  b. a student training step alone (forward, CE, backward, optimizer);
c. the online bound ``1 / (1/a + 1/b)``;  d. a plain PyTorch KD loop (teacher forward + student step with
``distillation_loss``);  e. ``DistillationModule`` under ``lightning.Trainer`` with TensorBoard and
``KLDivergenceLogger`` on;  f. the same, trained from cached teacher logits (batches that carry ``teacher_logits``,
as ``TeacherCache`` serves them: no teacher forward).

Then the ratios e/c, e/d and f/b (each the median over rounds of the ratio measured within one round, so that a
load change on the machine between rounds cancels) and the process's peak memory, for each of ``--image-sizes``
(128 and 64 px by default: at 64 px a step is short and the per-step overhead of the loop shows, as it does on a GPU). With
``--data`` (an image folder, e.g. the shared flowers photos) it also times the training loader of offline KD
(``FlowersDataModule`` with a teacher cache, and with ``decoded_cache``) at the first size: it must deliver at least
twice the images/s of the step it feeds (f).

    python benchmarks/kd_step_throughput.py                         # resnet18 -> the article's student, 128 and 64 px
    python benchmarks/kd_step_throughput.py --data ../shared/data/flowers5
    python benchmarks/kd_step_throughput.py --image-sizes 64 --student flowers_cnn
    python benchmarks/kd_step_throughput.py --device cuda --precision bf16 --channels-last   # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kd_lightning import DistillationModule
from kd_lightning.callbacks import KLDivergenceLogger
from kd_lightning.losses import distillation_loss
from kd_lightning.models import build_model

Batch = tuple[torch.Tensor, ...]


def timed(fn: Callable[[Batch], None], batches: list[Batch], device: torch.device, warmup: int = 3) -> float:
    """Images/s of ``fn`` over ``batches`` after ``warmup`` untimed batches."""
    for batch in batches[:warmup]:
        fn(batch)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    sync(device)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock(L.Callback):
    """Times the training steps only (Trainer setup and teardown are not per-image costs)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.times = warmup, device, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        sync(self.device)
        self.times.append(time.perf_counter())

    def images_per_second(self, batch_size: int) -> float:
        steps = len(self.times) - 1 - self.warmup
        return steps * batch_size / (self.times[-1] - self.times[self.warmup])


def lightning_ips(args, teacher: torch.nn.Module, batches: list[Batch], device: torch.device, log_dir: str) -> float:
    """``DistillationModule`` under the Trainer, TensorBoard and KLDivergenceLogger on (e; f when the batches
    carry cached teacher logits)."""
    torch.manual_seed(0)
    module = DistillationModule(student=student_network(args), teacher=teacher, num_classes=args.num_classes,
                                optim=dict(lr=0.01, lr_scheduler="none"), channels_last=args.channels_last)
    clock = Clock(warmup=3, device=device)
    precision = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}[args.precision]
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, precision=precision,
                        logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name="bench"),
                        log_every_n_steps=10, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[clock, KLDivergenceLogger(log_every_n_steps=10)])
    # the very batches a-d use, already collated (batch_size=None): no per-sample collation cost that b does not pay
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return clock.images_per_second(args.batch_size)


def student_network(args) -> torch.nn.Module:
    kwargs = {"image_size": args.image_size} if args.student == "flowers_article_cnn" else {}
    return build_model(args.student, args.num_classes, **kwargs)


def loader_ips(args, teacher: torch.nn.Module, decoded: bool, batches: int = 40) -> float:
    """Images/s of offline KD's training loader on the image folder ``--data``: each row's view of the epoch made
    from its seed, with its cached logits (the cache filled from the teacher on the first run, not timed)."""
    from kd_lightning.callbacks import TeacherCache
    from kd_lightning.data import FlowersDataModule

    work = Path(args.work)
    dm = FlowersDataModule(args.data, image_size=args.image_size, val_fraction=0.15, test_fraction=0.15,
                           batch_size=args.batch_size, num_workers=args.workers,
                           decoded_cache=str(work / "decoded") if decoded else None)
    dm.prepare_data()
    dm.setup("fit")
    module = DistillationModule(student=student_network(args), teacher=teacher, num_classes=dm.num_classes)
    TeacherCache(str(work / "teacher_cache"), views=2).attach(module, dm)  # built on the first call, not timed
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):  # worker start-up is not a per-image cost
        next(it)
    start, seen = time.perf_counter(), 0
    for batch in range(batches):
        try:
            seen += len(next(it)[0])
        except StopIteration:
            it = iter(loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="flowers_article_cnn")
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32",
                        help="autocast of a-d and the Trainer precision of e-f (bf16/16: mixed)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--data", default=None, help="an image folder: also time offline KD's training loader")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes (with --data)")
    parser.add_argument("--work", default=None, help="where the loader's caches go (default: a temporary folder)")
    parser.add_argument("--show-rounds", action="store_true", help="print every round's a-f, not only the medians")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    device = torch.device(args.device)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)) \
        if args.precision != "32" else (lambda: torch.autocast(device.type, enabled=False))

    print(f"{args.teacher} teacher -> {args.student} student, batch {args.batch_size}, {args.device}, precision "
          f"{args.precision}{', channels_last' if args.channels_last else ''}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x {args.rounds} interleaved rounds (medians)")
    with tempfile.TemporaryDirectory() as log_dir:
        args.work = args.work or str(Path(log_dir) / "work")
        for position, size in enumerate(args.image_sizes):
            args.image_size = size
            measure(args, device, memory, autocast, log_dir, loaders=bool(args.data) and position == 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = f", GPU peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
    print(f"peak memory: process RSS {peak:.0f} MiB{gpu_peak}")


def measure(args, device: torch.device, memory: torch.memory_format, autocast: Callable, log_dir: str,
            loaders: bool) -> None:
    """a-f at ``args.image_size``, printed as one block of the table."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    cpu_batches = [(torch.randn(shape, generator=gen), torch.randint(0, args.num_classes, (args.batch_size,),
                                                                     generator=gen)) for _ in range(args.steps + 3)]
    teacher = build_model(args.teacher, args.num_classes).eval().requires_grad_(False).to(device, memory_format=memory)
    student = student_network(args).train().to(device, memory_format=memory)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    batches = [(x.to(device).contiguous(memory_format=memory), y.to(device)) for x, y in cpu_batches]
    with torch.no_grad(), autocast():
        cached = [(x, y, torch.arange(len(y)), teacher(x.to(device).contiguous(memory_format=memory)).float().cpu())
                  for x, y in cpu_batches]

    def teacher_forward(batch: Batch) -> None:
        with torch.no_grad(), autocast():
            teacher(batch[0])

    def student_step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = student(batch[0])
        F.cross_entropy(logits.float(), batch[1]).backward()
        opt.step()

    def plain_kd_step(batch: Batch) -> None:
        with torch.no_grad(), autocast():
            t = teacher(batch[0])
        opt.zero_grad(set_to_none=True)
        with autocast():
            s = student(batch[0])
        distillation_loss(s.float(), t.float(), batch[1], 4.0, 0.9)["loss"].backward()
        opt.step()

    results: dict[str, list[float]] = {k: [] for k in "abdef"}
    for _ in range(args.rounds):
        results["a"].append(timed(teacher_forward, batches, device))
        results["b"].append(timed(student_step, batches, device))
        results["d"].append(timed(plain_kd_step, batches, device))
        results["e"].append(lightning_ips(args, teacher, cpu_batches, device, log_dir))
        results["f"].append(lightning_ips(args, teacher, cached, device, log_dir))
    a, b, d, e, f = (statistics.median(results[k]) for k in "abdef")
    c = 1.0 / (1.0 / a + 1.0 / b)
    px = f"{args.image_size} px"
    if args.show_rounds:
        for k in "abdef":
            print(f"  {px:>6}  {k}  rounds: " + ", ".join(f"{v:.1f}" for v in results[k]))

    def ratio(num: str, den: str) -> float:
        """The median over rounds of num/den measured in the same round: a load change on the machine between
        rounds cancels (c of a round is that round's bound)."""
        per_round = dict(results)
        per_round["c"] = [1.0 / (1.0 / x + 1.0 / y) for x, y in zip(results["a"], results["b"])]
        return statistics.median(n / m for n, m in zip(per_round[num], per_round[den]))

    print(f"  {px:>6}  a  teacher inference                 {a:8.1f} img/s")
    print(f"  {px:>6}  b  student training step             {b:8.1f} img/s")
    print(f"  {px:>6}  c  online KD bound 1/(1/a+1/b)       {c:8.1f} img/s")
    print(f"  {px:>6}  d  plain PyTorch KD loop             {d:8.1f} img/s   d/c = {ratio('d', 'c'):.2f}")
    print(f"  {px:>6}  e  DistillationModule (TB + KL log)  {e:8.1f} img/s   e/c = {ratio('e', 'c'):.2f}   "
          f"e/d = {ratio('e', 'd'):.2f}")
    print(f"  {px:>6}  f  DistillationModule from cache     {f:8.1f} img/s   f/b = {ratio('f', 'b'):.2f}   "
          f"f/e = {ratio('f', 'e'):.2f}")
    if loaders:
        teacher_cpu = teacher.to("cpu", memory_format=torch.contiguous_format)
        for name, decoded in (("JPEG files", False), ("decoded cache", True)):
            ips = loader_ips(args, teacher_cpu, decoded=decoded)
            print(f"  {px:>6}  loader, offline KD, {name:13s}   {ips:8.1f} img/s   loader/f = {ips / f:.2f} "
                  f"({args.workers} worker{'s' if args.workers != 1 else ''})")


if __name__ == "__main__":
    main()
