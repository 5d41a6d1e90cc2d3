"""``kd-lightning evaluate``: a teacher and its students side by side on a held-out split.

    kd-lightning evaluate --config experiments/digits/base.yaml \\
        --teacher logs/digits/teacher/checkpoints/best.ckpt \\
        --students kd=logs/digits/kd/version_0/checkpoints/best.ckpt \\
                   scratch=logs/digits/scratch/version_0/checkpoints/best.ckpt \\
        --out logs/digits/evaluate

For every network: top-1 (and top-5 with more than 5 classes), expected calibration error, mean prediction
entropy, agreement with the teacher, the confusion matrix, and what it costs to ship: parameters, size on disk,
FLOPs per image and CPU latency at batch 1 and 32. Written to ``--out`` as ``results.md``, ``results.csv``,
``results.json`` and ``confusion_<name>.{png,csv}``; ``--tensorboard DIR`` also logs them to TensorBoard.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix

from kd_lightning.commands.inputs import (
    data_parser,
    instantiate_data,
    load_trained,
    output_folder,
    parse_architecture,
    parse_named_path,
    split_loader,
)
from kd_lightning.commands.errors import run_reporting_errors
from kd_lightning.measure import count_parameters, flops_per_image, latency_us, size_on_disk_kb
from kd_lightning.checkpoints import Architecture
from kd_lightning.core import as_heads
from kd_lightning.labels import labelled_mask
from kd_lightning.metrics import entropy

ECE_BINS = 15  # the usual choice since Guo et al. (2017)
RESULT_FIELDS = ("model", "role", "images", "top1", "top5", "ece", "entropy", "agreement", "params", "size_kb",
                 "flops", "latency_threads")  # then latency_b<N>_us per batch size; confusion only in the JSON


def _quality_metrics(num_classes: int, with_teacher: bool) -> dict[str, Metric]:
    metrics: dict[str, Metric] = {
        "top1": MulticlassAccuracy(num_classes, average="micro"),
        "ece": MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1"),
        "entropy": MeanMetric(),
        "confusion": MulticlassConfusionMatrix(num_classes),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    if with_teacher:
        metrics["agreement"] = MulticlassAccuracy(num_classes, average="micro")
    return metrics


def evaluate_models(models: Mapping[str, nn.Module], dataloader: Iterable[Sequence[Tensor]], num_classes: int,
                    teacher_name: str | None = None, latency_batch_sizes: Sequence[int] = (1, 32),
                    latency_repeats: int = 50, latency_warmup: int = 5, threads: int = 1) -> list[dict[str, Any]]:
    r"""Evaluate ``models`` (name -> network giving logits, or heads with the main one first) on ``dataloader``
    batches ``(x, y, ...)`` of class indices, on the CPU. Returns one dict per model, in the order given:

    * ``top1``, ``top5`` (``None`` for 5 classes or fewer): the share of images whose label is the top (top-5)
      prediction;
    * ``ece``: expected calibration error over 15 equal-width confidence bins :math:`B_b`,
      :math:`\sum_b \frac{|B_b|}{N} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|` (torchmetrics, L1);
    * ``entropy``: mean :math:`-\sum_k p_k \log p_k` of the predicted distribution, in nats;
    * ``agreement``: the share of images where its top-1 equals the teacher's (``None`` for the teacher, or when
      ``teacher_name`` is ``None``);
    * ``confusion``: ``confusion[i][j]`` images of true class ``i`` predicted as ``j``;
    * ``params``, ``size_kb`` (saved state_dict), ``flops`` (one image, see
      :func:`kd_lightning.measure.flops_per_image`), ``latency_b<N>_us``: the median of ``latency_repeats`` timed
      forward passes on a random batch of ``N`` after ``latency_warmup`` untimed ones, on ``threads`` CPU threads.

    Rows labelled ``-100`` (unlabelled) are skipped; every network sees the same images.
    """
    if teacher_name is not None and teacher_name not in models:
        raise ValueError(f"teacher_name {teacher_name!r} is not one of the models {list(models)}.")
    if not models:
        raise ValueError("No models to evaluate.")
    for net in models.values():
        net.eval()
    metrics = {name: _quality_metrics(num_classes, teacher_name is not None and name != teacher_name)
               for name in models}
    images, input_shape = 0, None
    with torch.inference_mode():
        for batch in dataloader:
            x, y = batch[0], batch[1]
            if y.ndim != 1:
                raise ValueError(f"Evaluation needs class-index labels (B,), got labels of shape {tuple(y.shape)}.")
            labelled = labelled_mask(y)
            x, y = x[labelled], y[labelled]
            if len(y) == 0:
                continue
            input_shape = tuple(x.shape[1:])
            images += len(y)
            logits = {name: _main_logits(net(x), name, num_classes).float() for name, net in models.items()}
            teacher_top1 = logits[teacher_name].argmax(-1) if teacher_name is not None else None
            for name, model_metrics in metrics.items():
                p = logits[name].softmax(-1)
                for key, metric in model_metrics.items():
                    if key == "entropy":
                        metric.update(entropy(logits[name]))
                    elif key == "agreement":
                        metric.update(p, teacher_top1)
                    else:
                        metric.update(p, y)
    if input_shape is None:
        raise ValueError("The evaluation split has no labelled images.")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for name, net in models.items():
            values = {key: metric.compute() for key, metric in metrics[name].items()}
            row: dict[str, Any] = {
                "model": name,
                "role": "teacher" if name == teacher_name else "student" if teacher_name is not None else "",
                "images": images,
                "top1": values["top1"].item(),
                "top5": values["top5"].item() if "top5" in values else None,
                "ece": values["ece"].item(),
                "entropy": values["entropy"].item(),
                "agreement": values["agreement"].item() if "agreement" in values else None,
                "params": count_parameters(net),
                "size_kb": size_on_disk_kb(net),
                "flops": flops_per_image(net, input_shape),
                "latency_threads": threads,
            }
            for batch_size in latency_batch_sizes:
                row[f"latency_b{batch_size}_us"] = latency_us(net, input_shape, batch_size, latency_repeats,
                                                              latency_warmup)
            row["confusion"] = values["confusion"].tolist()
            rows.append(row)
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def _main_logits(output: Tensor | Sequence[Tensor], name: str, num_classes: int) -> Tensor:
    logits = as_heads(output)[0]
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"Model {name!r} gives outputs of shape {tuple(logits.shape)}, expected "
                         f"(batch, {num_classes}) class scores for the data's {num_classes} classes.")
    return logits


# -- reports ------------------------------------------------------------------------------------------------
def _si(value: float) -> str:
    """1234567 -> '1.23 M' (FLOPs)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"


def _duration(us: float) -> str:
    return f"{us / 1e6:.2f} s" if us >= 1e6 else f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.0f} µs"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def latency_batch_sizes_of(row: Mapping[str, Any]) -> list[int]:
    return [int(key[len("latency_b"):-len("_us")]) for key in row if key.startswith("latency_b")
            and key.endswith("_us")]


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results as a markdown table, with a note on how latency and ECE were measured."""
    batch_sizes = latency_batch_sizes_of(rows[0])
    header = ["model", "top-1 (%)", "top-5 (%)", "ECE", "entropy (nats)", "agreement (%)", "params",
              "size on disk", "FLOPs / image", *[f"latency b={n}" for n in batch_sizes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        teacher_unnamed = r["role"] == "teacher" and "teacher" not in r["model"].lower()
        name = f"{r['model']} (teacher)" if teacher_unnamed else r["model"]
        cells = [name, _percent(r["top1"]), _percent(r["top5"]), f"{r['ece']:.3f}", f"{r['entropy']:.3f}",
                 _percent(r["agreement"]), f"{r['params']:,}", f"{r['size_kb']:.1f} KB", _si(r["flops"]),
                 *[_duration(r[f"latency_b{n}_us"]) for n in batch_sizes]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{rows[0]['images']} images. ECE: {ECE_BINS} equal-width confidence bins. Agreement: share of "
                 "images where the model's top-1 equals the teacher's. Latency: median CPU wall time of one forward "
                 f"pass on a batch of the given size, {rows[0]['latency_threads']} thread(s).")
    return "\n".join(lines)


def confusion_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Any:
    """A matplotlib Figure of the confusion matrix: colour is the row-normalised rate (per true class), each cell
    shows its count; rows are true classes, columns predictions."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend needed

    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    k = len(class_names)
    size = min(4 + 0.35 * k, 16)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    if k <= 40:  # beyond that, labels and counts are unreadable anyway
        ax.set_xticks(range(k), class_names, rotation=90 if max(map(len, class_names)) > 3 else 0)
        ax.set_yticks(range(k), class_names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _title(row: Mapping[str, Any]) -> str:
    return f"{row['model']}: top-1 {100 * row['top1']:.1f}%, {row['images']} images"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str, class_names: Sequence[str],
                 heading: str = "") -> str:
    """Write ``results.{md,csv,json}`` and ``confusion_<model>.{csv,png}`` to ``out_dir``; returns the table."""
    os.makedirs(out_dir, exist_ok=True)
    table = to_markdown(rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"{heading}\n\n{table}\n" if heading else f"{table}\n")
    flat = [{k: v for k, v in r.items() if k != "confusion"} for r in rows]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"class_names": list(class_names), "results": list(rows)}, f, indent=1)
    for r in rows:
        stem = os.path.join(out_dir, f"confusion_{_safe_name(r['model'])}")
        with open(f"{stem}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *class_names])
            writer.writerows([name, *counts] for name, counts in zip(class_names, r["confusion"]))
        confusion_figure(r["confusion"], class_names, _title(r)).savefig(f"{stem}.png", dpi=120)
    return table


def log_to_tensorboard(rows: Sequence[Mapping[str, Any]], logger: TensorBoardLogger,
                       class_names: Sequence[str]) -> None:
    """Scalars ``evaluate/<model>/<metric>``, the confusion matrices as images ``evaluate/confusion/<model>``
    and the table as text ``evaluate/results``."""
    for r in rows:
        logger.log_metrics({f"evaluate/{r['model']}/{key}": float(value) for key, value in r.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool)})
        logger.experiment.add_figure(f"evaluate/confusion/{r['model']}",
                                     confusion_figure(r["confusion"], class_names, _title(r)))
    logger.experiment.add_text("evaluate/results", to_markdown(rows))
    logger.finalize("success")


# -- command line ---------------------------------------------------------------------------------------------
def _architectures(specs: Sequence[str]) -> dict[str, Architecture]:
    archs = {}
    for spec in specs:
        name, sep, arch = spec.partition("=")
        if not sep:
            raise ValueError(f"--arch {spec!r}: write NAME=ARCHITECTURE, e.g. kd='mlp {{hidden: [32]}}', where NAME "
                             "is the name given to --teacher or --students.")
        archs[name] = parse_architecture(arch)
    return archs


def _run(argv: list[str] | None) -> list[dict[str, Any]]:
    parser = data_parser("kd-lightning evaluate", __doc__)
    parser.add_argument("--teacher", default=None,
                        help="[NAME=]CHECKPOINT of the teacher (default name: teacher); students are compared "
                             "with it (agreement)")
    parser.add_argument("--students", nargs="+", default=[],
                        help="[NAME=]CHECKPOINT of each student (default names: student, student_2, ...)")
    parser.add_argument("--arch", nargs="+", default=[],
                        help="NAME=ARCHITECTURE for a plain state_dict, e.g. small='mlp {hidden: [32]}' "
                             "(a .ckpt of kd-lightning fit records its own)")
    parser.add_argument("--out", required=True, help="folder for results.{md,csv,json} and confusion matrices")
    parser.add_argument("--tensorboard", default=None, help="also log to TensorBoard under this folder")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement")
    parser.add_argument("--latency-batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=50, help="timed forward passes per latency figure")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes before them")
    cfg = parser.parse_args(argv)
    cfg.threads = 1 if cfg.threads is None else cfg.threads  # a run's saved config.yaml says threads: null
    if cfg.teacher is None and not cfg.students:
        parser.error("give --teacher and/or --students")
    if cfg.threads < 1 or cfg.repeats < 1 or cfg.warmup < 0 or min(cfg.latency_batch_sizes) < 1:
        parser.error("--threads, --repeats and --latency-batch-sizes must be >= 1, --warmup >= 0")

    specs = ([parse_named_path(cfg.teacher, "teacher")] if cfg.teacher else []) + [
        parse_named_path(s, "student" if i == 0 else f"student_{i + 1}") for i, s in enumerate(cfg.students)]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must differ, got {names}: name them as NAME=CHECKPOINT.")
    archs = _architectures(cfg.arch)
    if unknown := sorted(set(archs) - set(names)):
        raise ValueError(f"--arch names {unknown}, which are not among the models {names}.")

    start = time.perf_counter()
    data = instantiate_data(parser, cfg)
    num_classes = data.num_classes
    class_names = [str(c) for c in getattr(data, "class_names", None) or range(num_classes)]
    models = {name: load_trained(path, num_classes, archs.get(name)) for name, path in specs}
    output_folder(cfg.out)  # the inputs are good: now the outputs' folders, before the work
    if cfg.tensorboard:
        output_folder(cfg.tensorboard, "--tensorboard")
    rows = evaluate_models(models, split_loader(data, cfg.split), num_classes,
                           teacher_name=names[0] if cfg.teacher else None,
                           latency_batch_sizes=cfg.latency_batch_sizes, latency_repeats=cfg.repeats,
                           latency_warmup=cfg.warmup, threads=cfg.threads)
    heading = f"{type(data).__name__}, {cfg.split} split: " + ", ".join(f"{n} = {p}" for n, p in specs)
    table = write_report(rows, cfg.out, class_names, heading)
    if cfg.tensorboard:
        log_to_tensorboard(rows, TensorBoardLogger(cfg.tensorboard, name="evaluate", default_hp_metric=False),
                           class_names)
    print(f"{heading}\n\n{table}\n")
    print(f"Wrote {cfg.out}/results.md, results.csv, results.json and confusion_<model>.{{png,csv}} "
          f"({time.perf_counter() - start:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``kd-lightning evaluate``; bad input exits with one ``kd-lightning: error: ...`` line (status 2)."""
    return run_reporting_errors(lambda: _run(argv))


if __name__ == "__main__":
    main()
