"""Every bad input a researcher meets on day one gives one clear line, and leaves nothing under logs/ or data/.

Each row: what is wrong, the command line (run in a fresh folder, as ``kd-lightning`` runs it), and words the one
line must contain: the problem and what would be valid.
"""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from in_process import run_cli

from kd_lightning.models import build_model

ROOT = Path(__file__).resolve().parents[1]
X = ROOT / "experiments"
DIGITS = [f"--config={X / 'digits/base.yaml'}"]
KD = [*DIGITS, f"--config={X / 'digits/kd.yaml'}"]
KD_RANDOM_TEACHER = [*KD, "--teacher_run=null"]  # a KD run whose teacher has random weights: no teacher to train
SCRATCH = [*DIGITS, f"--config={X / 'digits/scratch.yaml'}"]
FLOWERS = [f"--config={X / 'flowers/base.yaml'}", f"--config={X / 'flowers/kd.yaml'}", "--teacher_run=null"]
CIFAR100 = [f"--config={X / 'cifar100/base.yaml'}", f"--config={X / 'cifar100/kd.yaml'}", "--teacher_run=null"]
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]


def _garbage(folder: Path) -> str:
    (folder / "garbage.ckpt").write_bytes(b"\x80\x02 not a checkpoint, or one cut short")
    return "garbage.ckpt"


def _five_classes(folder: Path) -> str:
    torch.save(build_model("mlp", 5, hidden=[256, 256], dropout=0.2).state_dict(), folder / "five.pt")
    return "five.pt"


def _file(folder: Path) -> str:
    (folder / "a_file").write_text("")
    return "a_file/out"


def _terms(folder: Path, term: str) -> str:
    (folder / "terms.yaml").write_text(f"model:\n  init_args:\n    terms:\n      kd: {term}\n")
    return f"--config={folder / 'terms.yaml'}"


def _callback(folder: Path, callback: str) -> str:
    (folder / "callback.yaml").write_text(f"trainer:\n  callbacks:\n    - {callback}\n")
    return f"--config={folder / 'callback.yaml'}"


def _study(folder: Path, runs: str) -> str:
    (folder / "study.yaml").write_text(f"base: [{X / 'digits/base.yaml'}]\nseeds: [0]\nruns:\n{runs}")
    return str(folder / "study.yaml")


# (id, arguments given the folder and the trained digits checkpoints, words the error line must contain)
CASES = [
    ("misspelt-model-key", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--model.init_args.temprature=2"],
     "unknown key 'model.init_args.temprature'", "closest valid names: temperature"),
    ("misspelt-term-key", lambda d, c: ["fit", *KD_RANDOM_TEACHER,
                                        "--model.init_args.terms.kd.init_args.temprature=2"],
     "HintonKD has no argument 'temprature'", "temperature"),
    ("misspelt-trainer-key", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--trainer.max_epoch=3"],
     "unknown key 'trainer.max_epoch'", "trainer.max_epochs"),
    ("wrong-type", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--trainer.max_epochs=abc"],
     "'trainer.max_epochs' cannot be 'abc'", "expected int"),
    ("unknown-model", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--model.init_args.student=resnet99"],
     "Unknown model name 'resnet99'", "resnet18"),
    ("bad-model-argument", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--model.init_args.student_kwargs={hiden: [32]}"],
     "Cannot build model 'mlp' with arguments {'hiden': [32]}", "hiden"),
    ("moved-optimizer-key", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--model.init_args.optimizer=adam"],
     "a section of their own", "optim: {optimizer"),
    ("unknown-optimizer", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--optim.optimizer=adagrad"],
     "optim.optimizer", "sgd"),
    ("shorthand-with-terms", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--model.init_args.temperature=2"],
     "temperature is the shorthand", "terms.kd.init_args.temperature"),
    ("alpha-out-of-range", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--model.init_args.terms=null",
                                         "--model.init_args.alpha=2"], "alpha must be in [0, 1]", "2"),
    ("negative-weight", lambda d, c: ["fit", *KD_RANDOM_TEACHER, _terms(
        d, "{class_path: kd_lightning.distillers.HintonKD, init_args: {weight: -1}}")],
     "weight must be a number >= 0", "-1"),
    ("unknown-tapped-layer", lambda d, c: ["fit", *KD_RANDOM_TEACHER, _terms(
        d, "{class_path: kd_lightning.distillers.Hint, init_args: {student_layer: layer3, teacher_layer: net.1}}")],
     "taps the student layer(s) ['layer3']", "Valid layer names: net"),
    ("unknown-callback-layer", lambda d, c: ["fit", *SCRATCH, _callback(
        d, "{class_path: kd_lightning.callbacks.ProgressiveUnfreezing, init_args: {unfreeze_at: {layer1: 2}}}")],
     "has no module 'layer1'", "net.1"),
    ("schedule-of-alpha", lambda d, c: ["fit", *KD_RANDOM_TEACHER, _callback(
        d, "{class_path: kd_lightning.callbacks.ScalarScheduler, init_args: {attribute: alpha, start: 0.5}}")],
     "no attribute 'alpha'", "terms.kd.weight"),
    ("missing-teacher-checkpoint", lambda d, c: ["fit", *KD, "--model.init_args.teacher_checkpoint=missing.ckpt"],
     "teacher_checkpoint 'missing.ckpt' does not exist", "torch.save"),
    ("truncated-teacher-checkpoint", lambda d, c: ["fit", *KD, f"--model.init_args.teacher_checkpoint={_garbage(d)}"],
     "teacher_checkpoint 'garbage.ckpt' cannot be read as a checkpoint", "truncated"),
    ("teacher-of-other-classes", lambda d, c: ["fit", *KD, f"--model.init_args.teacher_checkpoint={_five_classes(d)}"],
     "5 classes", "data has 10 classes"),
    ("teacher-never-trained", lambda d, c: ["fit", *KD], "teacher_run 'digits/teacher': no trained teacher yet",
     "teacher.yaml"),
    ("missing-ckpt-path", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--ckpt_path=missing.ckpt"],
     "--ckpt_path 'missing.ckpt' does not exist", "last.ckpt"),
    ("truncated-ckpt-path", lambda d, c: ["test", *KD_RANDOM_TEACHER, f"--ckpt_path={_garbage(d)}"],
     "cannot be read as a checkpoint", "truncated"),
    ("ckpt-of-another-module", lambda d, c: ["test", *KD_RANDOM_TEACHER, f"--ckpt_path={c.teacher}"],
     "holds a ClassifierModule", "the config trains a DistillationModule"),
    ("missing-data-folder", lambda d, c: ["fit", *FLOWERS, "--data.init_args.root=nowhere"],
     "the data folder 'nowhere' does not exist", "Expected layout"),
    ("gpu-config-on-a-cpu", lambda d, c: ["fit", *CIFAR100], "no GPU is available here", "--trainer.accelerator cpu"),
    ("download-without-internet", lambda d, c: ["fit", *CIFAR100, *CPU], "the download into 'data/cifar100' failed",
     "data.init_args.root"),
    ("zero-threads", lambda d, c: ["fit", *KD_RANDOM_TEACHER, "--threads=0"], "threads must be >= 1", "0"),
    ("predict-teacher-of-a-scratch-run", lambda d, c: ["predict", *SCRATCH, "--prediction.teacher=true"],
     "has no teacher", "prediction.teacher false"),
    ("evaluate-truncated-student", lambda d, c: ["evaluate", *DIGITS, f"--students=kd={_garbage(d)}", "--out=eval"],
     "'garbage.ckpt' cannot be read as a checkpoint", "truncated"),
    ("evaluate-out-not-writable", lambda d, c: ["evaluate", *DIGITS, f"--students=kd={c.kd}", f"--out={_file(d)}"],
     "--out 'a_file/out' cannot be written", "Choose a folder"),
    ("export-out-not-writable", lambda d, c: ["export", *DIGITS, f"--student=kd={c.kd}", f"--out={_file(d)}"],
     "--out 'a_file/out' cannot be written", "Choose a folder"),
    ("export-missing-student", lambda d, c: ["export", *DIGITS, "--student=nothing.ckpt", "--out=export"],
     "'nothing.ckpt' does not exist", "torch.save"),
    ("study-unknown-key", lambda d, c: ["study", _study(d, "  kd:\n    configz: [kd.yaml]\n")],
     "unknown key 'configz'", "configs"),
    ("study-misspelt-override", lambda d, c: ["study", _study(
        d, f"  kd:\n    configs: [{X / 'digits/scratch.yaml'}]\n    overrides: {{optim.lrr: 0.1}}\n")],
     "unknown key 'optim.lrr'", "optim.lr"),
]


@pytest.fixture
def no_internet(monkeypatch):
    """torchvision's downloads fail as they do without internet (and nothing may try the real network)."""
    import torchvision.datasets.utils as tv_utils

    def refuse(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", refuse)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, digits_checkpoints, no_internet):
    name, make_args, *words = case
    result = run_cli(tmp_path, *make_args(tmp_path, digits_checkpoints))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("kd-lightning: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert "?." not in errors[0]  # no sentence glued to another's question mark
    assert not (tmp_path / "logs").exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "eval").exists() and not (tmp_path / "export").exists()


def test_there_are_at_least_27_cases():
    assert len(CASES) >= 27


def test_output_read_by_a_pipe_that_closes_early_ends_quietly(tmp_path):
    """``kd-lightning ... | head``: when the reader leaves, the command stops with the pipeline's status (141), not a
    BrokenPipeError traceback."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "kd_lightning", "--help"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader left before the command wrote anything
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and "Traceback" not in err, err
