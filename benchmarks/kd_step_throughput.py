"""How close does DistillationModule's training step come to the bound set by its two networks?

Online KD costs one teacher forward (no grad) plus one student training step per batch, so its throughput is
bounded by ``1 / (1/teacher_inference + 1/student_step)`` images/s. This script measures, in one run and on the
same in-memory batches (no data loading):

1. teacher inference alone, 2. a student training step alone (forward, CE, backward, SGD step),
3. a plain PyTorch KD loop (teacher forward + student step with ``distillation_loss``),
4. ``DistillationModule`` under ``lightning.Trainer`` (logging on, progress bar and checkpointing off),

and prints images/s and each KD loop's ratio to the bound.

    python benchmarks/kd_step_throughput.py                       # resnet18 -> flowers_cnn, 128 px, batch 32
    python benchmarks/kd_step_throughput.py --teacher resnet20 --student resnet8x4 --image-size 32
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import DistillationModule
from kd_lightning.losses import distillation_loss
from kd_lightning.models import build_model


def images_per_second(fn, batches: list[tuple[torch.Tensor, torch.Tensor]], warmup: int = 3) -> float:
    for x, y in batches[:warmup]:
        fn(x, y)
    start = time.perf_counter()
    for x, y in batches:
        fn(x, y)
    return sum(len(x) for x, _ in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="flowers_cnn")
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [(torch.randn(shape, generator=gen), torch.randint(0, args.num_classes, (args.batch_size,),
                                                                 generator=gen)) for _ in range(args.steps)]
    teacher = build_model(args.teacher, args.num_classes).eval().requires_grad_(False)
    student = build_model(args.student, args.num_classes).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def teacher_forward(x, y):
        with torch.no_grad():
            teacher(x)

    def student_step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(student(x), y).backward()
        opt.step()

    def plain_kd_step(x, y):
        with torch.no_grad():
            t = teacher(x)
        opt.zero_grad(set_to_none=True)
        distillation_loss(student(x), t, y, 4.0, 0.9)["loss"].backward()
        opt.step()

    teacher_ips = images_per_second(teacher_forward, batches)
    student_ips = images_per_second(student_step, batches)
    bound = 1.0 / (1.0 / teacher_ips + 1.0 / student_ips)
    plain_ips = images_per_second(plain_kd_step, batches)

    module = DistillationModule(student=args.student, teacher=teacher, num_classes=args.num_classes, lr=0.01,
                                lr_scheduler="none")
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])),
                        batch_size=args.batch_size)
    times: list[float] = []

    class Clock(L.Callback):  # time the steps only: Trainer setup and teardown are not per-image costs
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            times.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            times.append(time.perf_counter())

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Clock()])
    trainer.fit(module, loader)
    warm = 3  # as for the other measurements
    lightning_ips = (len(times) - 1 - warm) * args.batch_size / (times[-1] - times[warm])

    print(f"{args.teacher} teacher -> {args.student} student, batch {args.batch_size}, {args.image_size} px, "
          f"{torch.get_num_threads()} threads, {args.steps} steps")
    print(f"  teacher inference        {teacher_ips:8.1f} img/s")
    print(f"  student training step    {student_ips:8.1f} img/s")
    print(f"  online KD bound          {bound:8.1f} img/s")
    print(f"  plain PyTorch KD loop    {plain_ips:8.1f} img/s   {plain_ips / bound:.2f} of the bound")
    print(f"  DistillationModule       {lightning_ips:8.1f} img/s   {lightning_ips / bound:.2f} of the bound")


if __name__ == "__main__":
    main()
