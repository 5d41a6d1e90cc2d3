"""Every experiment config runs: ``fast_dev_run`` of each YAML in experiments/ on CPU with tiny generated data,
plus one real teacher -> KD -> test pipeline through the ``kd-lightning`` command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from in_process import run_cli
import torch
import yaml
from PIL import Image

from kd_lightning.commands.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


# Overlays that make sense after some run files only (default: after every run file of their folder).
OVERLAY_TARGETS = {"flowers_transfer/teacher_cache.yaml": ["kd.yaml"],  # offline KD needs a teacher's logits
                   "flowers_transfer/function_matching.yaml": ["kd.yaml"],  # offline function matching, too
                   "flowers_transfer/function_matching_all_labels.yaml": ["kd.yaml"],  # ... with all labels
                   "flowers_transfer/teacher_same_labels.yaml": ["teacher.yaml"]}  # a variant of the teacher


def _is_run_file(path: Path) -> bool:
    """A run file names its run (``name``) and is merged over its folder's base.yaml alone; overlays
    (paper.yaml, teacher_cache.yaml, ...) are merged after a run file."""
    config = yaml.safe_load(path.read_text()) or {}
    return "name" in config and str(path.relative_to(EXPERIMENTS)) not in OVERLAY_TARGETS


def _is_study_file(path: Path) -> bool:
    """A study (``kd-lightning study``) lists runs of other configs, a tune file (``kd-lightning tune``) searches
    one; tests/test_study.py and tests/test_tune.py check those."""
    data = yaml.safe_load(path.read_text()) or {}
    return "runs" in data or "tune" in data


def _config_files() -> list[Path]:
    return [p for p in EXPERIMENTS.rglob("*.yaml") if p.name != "base.yaml" and not _is_study_file(p)]


def _run_files() -> list[Path]:
    return sorted(p for p in _config_files() if _is_run_file(p))


def _overlay_files() -> list[Path]:
    return sorted(p for p in _config_files() if not _is_run_file(p))


def _write_images(folder: Path, n: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg")


def tiny_data_args(data_class_path: str, tmp_path: Path, init_args: dict | None = None) -> list[str]:
    """CLI overrides that point a config's DataModule at tiny generated data (nothing is downloaded)."""
    loader = ["--data.init_args.num_workers=0", "--data.init_args.persistent_workers=false"]
    name = data_class_path.rsplit(".", 1)[-1]
    if name == "DigitsDataModule":  # bundled with scikit-learn
        return []
    if name == "FlowersDataModule":
        root = tmp_path / "flowers"
        for k, cls in enumerate(["daisy", "dandelion", "rose", "sunflower", "tulip"]):
            _write_images(root / cls, 8, 24, seed=k)
        return [f"--data.init_args.root={root}", "--data.init_args.dataset=folder",
                "--data.init_args.download=false", "--data.init_args.batch_size=4", *loader]
    if name == "CIFARDataModule":
        root = tmp_path / "cifar"
        classes, per_class = (100, 5) if (init_args or {}).get("dataset") == "cifar100" else (10, 6)
        for k in range(classes):
            _write_images(root / "train" / f"c{k:03d}", per_class, 32, seed=k)
            _write_images(root / "test" / f"c{k:03d}", 2, 32, seed=1000 + k)
        return [f"--data.init_args.root={root}", "--data.init_args.source=folder",
                "--data.init_args.download=false", "--data.init_args.batch_size=4",
                "--data.init_args.val_fraction=0.2", *loader]
    raise AssertionError(f"tests/test_experiments.py has no tiny data for {data_class_path}: add it here.")


def _merge(base: dict, update: dict) -> dict:
    """Nested dict merge, as the CLI merges several --config files."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _fast_dev_run(configs: list[Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a config writes stays in tmp_path
    merged: dict = {}
    for config in configs:
        merged = _merge(merged, yaml.safe_load(config.read_text()) or {})
    args = ["fit", *[f"--config={c}" for c in configs], "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
            "--trainer.enable_progress_bar=false", *tiny_data_args(merged["data"]["class_path"], tmp_path,
                                                                 merged["data"].get("init_args"))]
    args.append("--teacher_run=null")  # a KD run gets a random-weight teacher
    cli_main(args)


@pytest.mark.parametrize("run_file", _run_files(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_experiment_config_fast_dev_run(run_file, tmp_path, monkeypatch):
    _fast_dev_run([run_file.parent / "base.yaml", run_file], tmp_path, monkeypatch)


@pytest.mark.parametrize("overlay", _overlay_files(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_overlay_config_fast_dev_run(overlay, tmp_path, monkeypatch):
    targets = OVERLAY_TARGETS.get(str(overlay.relative_to(EXPERIMENTS)))
    run_files = [p for p in _run_files() if p.parent == overlay.parent and (targets is None or p.name in targets)]
    assert run_files, f"{overlay} is an overlay with no run file beside it"
    for run_file in run_files:
        _fast_dev_run([overlay.parent / "base.yaml", run_file, overlay], tmp_path, monkeypatch)


def test_every_experiment_folder_has_a_base():
    folders = {p.parent for p in EXPERIMENTS.rglob("*.yaml")}
    assert folders and all((f / "base.yaml").is_file() for f in folders)


def _cli(tmp_path: Path, *args: str):
    return run_cli(tmp_path, *args)


@pytest.mark.slow
def test_teacher_then_kd_then_test_through_the_command_line(tmp_path):
    """The digits pipeline as the README runs it: the KD run finds the teacher's checkpoint by the teacher's run
    name (teacher_run in base.yaml), in the newest version of that run."""
    base, short = str(EXPERIMENTS / "digits" / "base.yaml"), ["--trainer.max_epochs=2",
                                                              "--trainer.enable_progress_bar=false"]
    teacher = _cli(tmp_path, "fit", f"--config={base}", f"--config={EXPERIMENTS / 'digits' / 'teacher.yaml'}", *short)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    teacher_ckpt = tmp_path / "logs/digits/teacher/version_0/checkpoints/best.ckpt"
    assert teacher_ckpt.is_file()
    assert (tmp_path / "logs/digits/teacher/version_0/config.yaml").is_file()  # the resolved config beside the logs

    kd_config = f"--config={EXPERIMENTS / 'digits' / 'kd.yaml'}"
    kd = _cli(tmp_path, "fit", f"--config={base}", kd_config, *short)
    assert kd.returncode == 0, kd.stderr[-3000:]
    run_dir = tmp_path / "logs/digits/kd/version_0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["terms"]["kd"]["init_args"]["temperature"] == 4.0
    assert saved["model"]["init_args"]["teacher_checkpoint"] == "logs/digits/teacher/version_0/checkpoints/best.ckpt"
    assert saved["optim"]["optimizer"] == "adamw" and saved["name"] == "digits/kd"
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["num_classes"] == 10 and hparams["optim"]["lr"] == 0.003  # linked from the data and optim
    ckpt = next((run_dir / "checkpoints").glob("last*.ckpt"))
    assert not [k for k in torch.load(ckpt, weights_only=False)["state_dict"] if k.startswith("teacher.")]

    test = _cli(tmp_path, "test", f"--config={base}", kd_config, f"--ckpt_path={ckpt}")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/agreement" in test.stdout and "test/acc" in test.stdout

    resumed = _cli(tmp_path, "fit", f"--config={base}", kd_config, "--trainer.max_epochs=3",
                   "--trainer.enable_progress_bar=false", f"--ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("override,message", [
    ("--model.init_args.teacher_checkpoint=missing.ckpt", "teacher_checkpoint 'missing.ckpt' does not exist"),
    ("--teacher_run=digits/nothing", "teacher_run 'digits/nothing': no trained teacher yet"),
    ("--model.init_args.student=resnet99", "Unknown model name 'resnet99'. Known models: digits_cnn"),
    ("--model.init_args.temprature=2", "temprature"),
    ("--model.init_args.student_kwargs={hiden: [32]}", "Cannot build model 'mlp' with arguments {'hiden': [32]}"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, override, message):
    no_teacher_run = [] if override.startswith("--teacher_run") else ["--teacher_run=null"]
    result = _cli(tmp_path, "fit", f"--config={EXPERIMENTS / 'digits' / 'base.yaml'}",
                  f"--config={EXPERIMENTS / 'digits' / 'kd.yaml'}", *no_teacher_run, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_class_count_mismatch_is_reported_before_training(tmp_path):
    from kd_lightning.models import build_model

    torch.save(build_model("mlp", 5, hidden=[256, 256], dropout=0.2).state_dict(), tmp_path / "five.pt")
    result = _cli(tmp_path, "fit", f"--config={EXPERIMENTS / 'digits' / 'base.yaml'}",
                  f"--config={EXPERIMENTS / 'digits' / 'kd.yaml'}", "--model.init_args.teacher_checkpoint=five.pt")
    assert result.returncode != 0
    assert "5 classes" in result.stderr and "data has 10 classes" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_callback_settings_are_checked_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad_callback.yaml"
    bad.write_text("trainer:\n  callbacks:\n    - class_path: kd_lightning.callbacks.ProgressiveUnfreezing\n"
                   "      init_args: {unfreeze_at: {layer1: 2}}\n")
    result = _cli(tmp_path, "fit", f"--config={EXPERIMENTS / 'digits' / 'base.yaml'}",
                  f"--config={EXPERIMENTS / 'digits' / 'scratch.yaml'}", f"--config={bad}")
    assert result.returncode != 0
    assert "has no module 'layer1'" in result.stderr and "net.1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()
