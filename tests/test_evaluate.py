"""kd-lightning evaluate: metrics on networks with known outputs, cost fields, the command line end to end on
real digits checkpoints, and bad input."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning import DistillationModule
from kd_lightning.data import DigitsDataModule
from kd_lightning.commands.evaluate import evaluate_models, main
from kd_lightning.metrics import entropy
from kd_lightning.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits" / "base.yaml")
K = 10


class FixedLogits(nn.Module):
    """Gives row ``i`` of ``table`` for an input whose value is ``i``: a network with known outputs."""

    def __init__(self, probs: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", probs.log())

    def forward(self, x: Tensor) -> Tensor:
        return self.table[x[:, 0].long()]


def peaked(top: int, p_top: float, second: int | None = None, p_second: float = 0.0) -> Tensor:
    """A distribution over K classes: ``p_top`` on ``top``, ``p_second`` on ``second``, the rest spread evenly."""
    rest = K - 1 - (second is not None)
    p = torch.full((K,), (1 - p_top - p_second) / rest)
    p[top] = p_top
    if second is not None:
        p[second] = p_second
    return p


LABELS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3])  # the last row is unlabelled below (-100) and must be skipped
# teacher: right with 0.99 on images 0-6; wrong on image 7 (class 1 with 0.62, the true class 7 second: top-5 right)
TEACHER = torch.stack([peaked(i, 0.99) for i in range(7)] + [peaked(1, 0.62, second=7, p_second=0.3),
                                                             peaked(9, 0.99)])
# student: always 0.9 sure; right on images 0-5, wrong on 6 (says 2, teacher says 6) and 7 (says 1, as the teacher)
STUDENT = torch.stack([peaked(i, 0.9) for i in range(6)] + [peaked(2, 0.9), peaked(1, 0.9), peaked(0, 0.9)])


def known_loader(batch_size: int = 3) -> DataLoader:
    x = torch.arange(len(LABELS), dtype=torch.float32).unsqueeze(1)  # (N, 1): the row index
    y = LABELS.clone()
    y[-1] = -100
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_known_outputs_give_the_hand_computed_metrics():
    rows = evaluate_models({"teacher": FixedLogits(TEACHER), "student": FixedLogits(STUDENT)}, known_loader(), K,
                           teacher_name="teacher", latency_repeats=3, latency_warmup=1)
    teacher, student = rows
    assert [r["model"] for r in rows] == ["teacher", "student"] and teacher["images"] == 8
    assert (teacher["role"], student["role"]) == ("teacher", "student")
    assert teacher["top1"] == pytest.approx(7 / 8) and teacher["top5"] == pytest.approx(1.0)
    assert student["top1"] == pytest.approx(6 / 8)
    assert teacher["agreement"] is None and student["agreement"] == pytest.approx(7 / 8)  # only image 6 differs
    # ECE: all student confidences 0.9 fall in one bin with accuracy 0.75
    assert student["ece"] == pytest.approx(0.9 - 0.75, abs=1e-5)
    # teacher: 7 images at 0.99, all right (bin accuracy 1), and 1 at 0.62, wrong (bin accuracy 0)
    assert teacher["ece"] == pytest.approx(7 / 8 * (1 - 0.99) + 1 / 8 * 0.62, abs=1e-5)
    # every student row: 0.9 on one class and 0.1/9 on each of the other nine
    assert student["entropy"] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1 / 9)), abs=1e-5)
    confusion = torch.tensor(student["confusion"])
    assert confusion.sum() == 8 and confusion[6, 2] == 1 and confusion[7, 1] == 1 and confusion.trace() == 6


def test_no_teacher_means_no_agreement_and_few_classes_no_top5():
    probs = torch.stack([peaked(i % 5, 0.5) for i in range(8)])[:, :5].softmax(-1)
    loader = DataLoader(TensorDataset(torch.arange(8.0).unsqueeze(1), torch.arange(8) % 5), batch_size=4)
    (row,) = evaluate_models({"net": FixedLogits(probs)}, loader, 5, latency_repeats=1, latency_warmup=0)
    assert row["agreement"] is None and row["top5"] is None and row["role"] == ""
    assert row["top1"] == pytest.approx(1.0)


def test_entropy_of_one_hot_and_uniform():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert entropy(probs.log()).tolist() == pytest.approx([0.0, math.log(4)])  # logits: -inf for p = 0


def test_cost_fields_of_real_networks():
    teacher, student = build_model("mlp", K, hidden=[256, 256]), build_model("mlp", K, hidden=[32])
    loader = DataLoader(TensorDataset(torch.rand(40, 1, 8, 8), torch.randint(0, K, (40,))), batch_size=16)
    threads = torch.get_num_threads()
    rows = evaluate_models({"teacher": teacher, "student": student}, loader, K, teacher_name="teacher",
                           latency_batch_sizes=(1, 8), latency_repeats=5, latency_warmup=1, threads=1)
    assert torch.get_num_threads() == threads  # restored after the latency measurement
    t, s = rows
    assert s["params"] == 64 * 32 + 32 + 32 * K + K and t["params"] > 30 * s["params"]
    assert s["flops"] == 2 * (64 * 32 + 32 * K)  # 2 FLOPs per multiply-accumulate of each Linear layer
    assert t["size_kb"] > s["size_kb"] > s["params"] * 4 / 1024
    assert all(r["latency_b1_us"] > 0 and r["latency_b8_us"] > 0 and r["latency_threads"] == 1 for r in rows)
    assert "latency_b32_us" not in s


def test_wrong_output_width_is_reported():
    loader = DataLoader(TensorDataset(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match=r"gives outputs of shape \(4, 5\), expected \(batch, 10\)"):
        evaluate_models({"five": build_model("mlp", 5, hidden=[8])}, loader, 10)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_lightning", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_command_line_end_to_end(digits_checkpoints, tmp_path):
    ckpts = digits_checkpoints
    out, tensorboard = tmp_path / "eval", tmp_path / "tb"
    result = _cli(tmp_path, "evaluate", f"--config={DIGITS}", f"--teacher={ckpts.teacher}", "--students",
                  f"kd={ckpts.kd}", f"scratch={ckpts.scratch}", f"plain={ckpts.student_state_dict}",
                  "--arch", "plain=mlp {hidden: [16]}", f"--out={out}", f"--tensorboard={tensorboard}",
                  "--repeats=3", "--warmup=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| kd |" in result.stdout and "latency b=32" in result.stdout

    saved = json.loads((out / "results.json").read_text())
    assert saved["class_names"] == [str(d) for d in range(10)]
    rows = {r["model"]: r for r in saved["results"]}
    assert list(rows) == ["teacher", "kd", "scratch", "plain"]
    assert rows["teacher"]["agreement"] is None and 0 <= rows["kd"]["agreement"] <= 1
    assert rows["plain"]["top1"] == rows["kd"]["top1"]  # the same weights, read from a state_dict
    assert rows["teacher"]["params"] == 64 * 64 + 64 + 64 * 10 + 10 and rows["kd"]["flops"] == 2 * (64 * 16 + 16 * 10)
    assert all(r["latency_b1_us"] > 0 and r["latency_b32_us"] > 0 and r["size_kb"] > 0 for r in rows.values())

    # the same numbers as Lightning's own test loop on the KD checkpoint (student, teacher and their agreement)
    module = DistillationModule.load_from_checkpoint(ckpts.kd)
    logged = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, DigitsDataModule(), verbose=False)[0]
    assert rows["kd"]["top1"] == pytest.approx(logged["test/acc"])
    assert rows["teacher"]["top1"] == pytest.approx(logged["test/teacher_acc"])
    assert rows["kd"]["agreement"] == pytest.approx(logged["test/agreement"])

    with open(out / "results.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["teacher", "kd", "scratch", "plain"]
    assert "| scratch |" in (out / "results.md").read_text()
    with open(out / "confusion_kd.csv") as f:
        table = list(csv.reader(f))
    assert len(table) == 11 and sum(int(v) for row in table[1:] for v in row[1:]) == rows["kd"]["images"]
    assert (out / "confusion_teacher.png").read_bytes()[:4] == b"\x89PNG"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tensorboard.rglob("events.out.tfevents.*")).parent)).Reload()
    assert "evaluate/confusion/kd" in events.Tags()["images"]
    assert events.Scalars("evaluate/kd/top1")[0].value == pytest.approx(rows["kd"]["top1"])


def _fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_checkpoint_of_another_architecture(digits_checkpoints, tmp_path, capsys):
    err = _fails(capsys, f"--config={DIGITS}", f"--students=kd={digits_checkpoints.kd}", "--arch",
                 "kd=digits_cnn", f"--out={tmp_path / 'eval'}")
    assert err.startswith("kd-lightning: error: ") and err.count("\n") == 1
    assert "holds 'mlp' {'hidden': [16]} with 10 classes" in err and "asked for 'digits_cnn' {}" in err
    assert not (tmp_path / "eval").exists()


def test_checkpoint_of_another_class_count(tmp_path, capsys):
    torch.save(build_model("mlp", 5, hidden=[16]).state_dict(), tmp_path / "five.pt")
    err = _fails(capsys, f"--config={DIGITS}", f"--students=five={tmp_path / 'five.pt'}", "--arch",
                 "five=mlp {hidden: [16]}", f"--out={tmp_path / 'eval'}")
    assert "holds a network with 5 classes" in err and "the data has 10 classes" in err
    assert not (tmp_path / "eval").exists()


def test_plain_state_dict_needs_an_architecture(digits_checkpoints, tmp_path, capsys):
    err = _fails(capsys, f"--config={DIGITS}", f"--students={digits_checkpoints.student_state_dict}",
                 f"--out={tmp_path / 'eval'}")
    assert "is a plain state_dict" in err and "--arch" in err


@pytest.mark.parametrize("args,message", [
    (["--students=missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
    (["--students", "a=x.ckpt", "a=y.ckpt"], "Model names must differ"),
    (["--students=kd=x.ckpt", "--arch", "other=mlp"], "--arch names ['other']"),
    (["--students=kd=x.ckpt", "--arch", "kd=mlp {hidden: [16"], "Cannot read the architecture"),
])
def test_bad_arguments(tmp_path, capsys, args, message):
    assert message in _fails(capsys, f"--config={DIGITS}", *args, f"--out={tmp_path / 'eval'}")


def test_models_are_required(tmp_path, capsys):
    assert "give --teacher and/or --students" in _fails(capsys, f"--config={DIGITS}", f"--out={tmp_path}")


def test_a_runs_saved_config_is_accepted(digits_checkpoints, tmp_path, capsys, monkeypatch):
    """The config.yaml that `kd-lightning fit` saves beside a run has every LightningCLI section: all are read, only
    data is used."""
    from kd_lightning.commands.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={DIGITS}", f"--config={ROOT / 'experiments' / 'digits' / 'kd.yaml'}",
                  "--print_config"])
    saved = tmp_path / "config.yaml"
    saved.write_text(capsys.readouterr().out)

    def built(*args, **kwargs):
        raise AssertionError("evaluate built a class of the config's other sections")

    monkeypatch.setattr(DistillationModule, "__init__", built)  # the config's model section
    monkeypatch.setattr(TensorBoardLogger, "__init__", built)  # its trainer.logger
    rows = main([f"--config={saved}", f"--students={digits_checkpoints.kd}", f"--out={tmp_path / 'eval'}",
                 "--repeats=1", "--warmup=0", "--latency-batch-sizes", "1"])
    assert [r["model"] for r in rows] == ["student"] and rows[0]["images"] == 359
