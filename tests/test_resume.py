"""Runs that survive: ``last.ckpt`` is the latest state, a run killed and resumed is the uninterrupted run (weights
bit-identical on CPU, every logged TensorBoard point equal), preemption signals save and exit non-zero, a SLURM
requeue resumes on its own, and bad ``--ckpt_path`` input stops before anything is written.

The runs are real ``kd-lightning fit`` subprocesses on the bundled digits; a test callback (``kill_switch.KillAt``)
sends the process a signal at a chosen batch, as a scheduler or a crash would."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from in_process import fork_cli, run_cli
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kd_lightning.callbacks.last_checkpoint import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals and fork as on a Linux cluster")


def fit(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> Any:
    """``kd-lightning fit ARGS`` as its own process: forked from this one (it starts in milliseconds), or, for DDP,
    whose launcher starts the other ranks by running the command line again, a new Python process."""
    if "--trainer.strategy=ddp" not in args:
        return fork_cli(cwd, "fit", *args, env=env, timeout=timeout)
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "kd_lightning", "fit", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def kill_at(epoch: int, batch: int, signal_name: str = "SIGKILL", rank: int = 0, stage: str = "train") -> str:
    return ("--trainer.callbacks+={class_path: kill_switch.KillAt, init_args: "
            f"{{epoch: {epoch}, batch: {batch}, signal_name: {signal_name}, rank: {rank}, stage: {stage}}}}}")


def kd_args(name: str, epochs: int, *extra: str, config: Path = DIGITS / "kd.yaml") -> list[str]:
    return [f"--config={DIGITS / 'base.yaml'}", f"--config={config}", f"--trainer.max_epochs={epochs}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--teacher_run=null",  # a random-weight teacher: resume does not care
            f"--name={name}", *extra]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point TensorBoard shows for ``log_dir`` (it drops points a restarted run purged)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same_run(resumed_dir: Path, full_dir: Path) -> None:
    resumed, full = load(resumed_dir / "checkpoints" / "last.ckpt"), load(full_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == full["global_step"] and resumed["epoch"] == full["epoch"]
    assert resumed["state_dict"].keys() == full["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), f"{key} differs after resuming"
    resumed_points, full_points = scalars(resumed_dir), scalars(full_dir)
    assert resumed_points.keys() == full_points.keys()
    for tag, points in full_points.items():
        assert resumed_points[tag] == points, f"TensorBoard {tag!r} differs after resuming"


@pytest.mark.slow
@pytest.mark.parametrize("config,epochs,kill", [
    (DIGITS / "kd.yaml", 4, (2, 12)),             # SIGKILL mid-epoch 2: resumes from the end of epoch 1
    (DIGITS / "callbacks.yaml", 5, (4, 3)),       # TemperatureScheduler x2, ProgressiveUnfreezing, KL logger
], ids=["kd", "kd+callbacks"])
def test_killed_run_resumed_from_last_ckpt_is_the_uninterrupted_run(tmp_path, config, epochs, kill):
    full = fit(tmp_path, *kd_args("full", epochs, config=config))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = fit(tmp_path, *kd_args("cut", epochs, kill_at(*kill), config=config))
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "logs/cut/version_0/checkpoints/last.ckpt"
    assert load(last)["epoch"] == kill[0] - 1  # the last finished epoch, whatever val/acc did

    resumed = fit(tmp_path, *kd_args("cut", epochs, f"--ckpt_path={last}", config=config))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "logs/cut").iterdir()) == ["version_0"]  # the same log version
    assert_same_run(tmp_path / "logs/cut/version_0", tmp_path / "logs/full/version_0")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_the_current_step_exits_non_zero_and_resumes_exactly(tmp_path, signal_name):
    full = fit(tmp_path, *kd_args("full", 3))
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = fit(tmp_path, *kd_args("cut", 3, kill_at(1, 5, signal_name)))
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    last = tmp_path / "logs/cut/version_0/checkpoints/last.ckpt"
    state = load(last)
    assert state["global_step"] == 16 + 6  # epoch 0 (16 batches) and batches 0..5 of epoch 1: mid-epoch
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 6, "epoch_done": False}]
    assert "resume with --ckpt_path" in stopped.stderr

    resumed = fit(tmp_path, *kd_args("cut", 3, f"--ckpt_path={last}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "logs/cut/version_0", tmp_path / "logs/full/version_0")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name,stage,step_based", [
    ("SIGTERM", "validation", False),  # during the end-of-epoch validation
    ("SIGTERM", "validation", True),   # during a validation inside an epoch (val_check_interval)
    ("SIGKILL", "checkpoint", True),   # while a checkpoint is being written
], ids=["sigterm-epoch-validation", "sigterm-step-validation", "sigkill-checkpoint-writing"])
def test_a_stop_during_validation_or_checkpoint_writing_loses_nothing(tmp_path, signal_name, stage, step_based):
    """Stopped while it validates, a run finishes that validation first (its val/* points and best.ckpt exist),
    then saves and exits; killed while writing a checkpoint, it resumes from the one before. Either way the resumed
    run has the uninterrupted run's weights, val/* points and best.ckpt."""
    every = ["--trainer.val_check_interval=6", "--trainer.check_val_every_n_epoch=null",
             "--trainer.max_epochs=-1", "--trainer.max_steps=36"] if step_based else []
    full = fit(tmp_path, *kd_args("full", 3, *every))
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = fit(tmp_path, *kd_args("cut", 3, *every, kill_at(1, 2 if stage == "validation" else 3, signal_name,
                                                                stage=stage)))
    expected = PREEMPTED_EXIT_CODE if signal_name == "SIGTERM" else -signal.SIGKILL
    assert stopped.returncode == expected, stopped.stderr[-3000:]
    last = tmp_path / "logs/cut/version_0/checkpoints/last.ckpt"
    resumed = fit(tmp_path, *kd_args("cut", 3, *every, f"--ckpt_path={last}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "logs/cut/version_0", tmp_path / "logs/full/version_0")
    best_cut, best_full = (load(tmp_path / f"logs/{run}/version_0/checkpoints/best.ckpt") for run in ("cut", "full"))
    assert best_cut["global_step"] == best_full["global_step"]
    assert all(torch.equal(v, best_full["state_dict"][k]) for k, v in best_cut["state_dict"].items())


@pytest.mark.slow
def test_last_ckpt_is_the_last_epoch_when_val_acc_stops_improving(tmp_path):
    # lr 1e-9: val/acc never improves after epoch 0, so Lightning's save_last would stay at epoch 0
    result = fit(tmp_path, f"--config={DIGITS / 'base.yaml'}", f"--config={DIGITS / 'teacher.yaml'}",
                 "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false", "--optim.lr=1e-9",
                 "--optim.lr_scheduler=none", "--name=flat")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "logs/flat/version_0/checkpoints"
    assert load(checkpoints / "best.ckpt")["epoch"] == 0
    last = load(checkpoints / "last.ckpt")
    assert last["epoch"] == 3 and last["global_step"] == 4 * 16


@pytest.mark.slow
def test_step_based_run_writes_last_ckpt_at_every_validation(tmp_path):
    result = fit(tmp_path, *kd_args("steps", 1, "--trainer.max_epochs=-1", "--trainer.max_steps=40",
                                    "--trainer.val_check_interval=10", "--trainer.check_val_every_n_epoch=null"))
    assert result.returncode == 0, result.stderr[-3000:]
    last = load(tmp_path / "logs/steps/version_0/checkpoints/last.ckpt")
    assert last["global_step"] == 40


def fake_slurm(tmp_path: Path, restart_count: int) -> dict[str, str]:
    """A one-task SLURM job's environment, with an ``scontrol`` that records the requeue and then stops the job
    as SLURM does (SIGTERM to the job's process)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\nkill -TERM $PPID\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
            "SLURM_JOB_NAME": "kd", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0", "SLURM_RESTART_COUNT": str(restart_count)}


@pytest.mark.slow
def test_slurm_requeue_resumes_the_same_run_with_no_flag(tmp_path):
    full = fit(tmp_path, *kd_args("full", 3))
    assert full.returncode == 0, full.stderr[-3000:]

    first = fit(tmp_path, *kd_args("slurm", 3, kill_at(1, 4, "SIGUSR1")), env=fake_slurm(tmp_path, 0))
    assert first.returncode == 0, first.stderr[-3000:]  # requeued: not a failure
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    run_dir = tmp_path / "logs/slurm/slurm_4242"
    assert load(run_dir / "checkpoints/last.ckpt")["global_step"] == 16 + 5
    assert list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue checkpoint, inside the run folder

    # the requeued job: the same command line and job id, SLURM_RESTART_COUNT=1
    second = fit(tmp_path, *kd_args("slurm", 3), env=fake_slurm(tmp_path, 1))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}".replace(str(tmp_path) + os.sep, "") \
        in second.stderr
    assert sorted(p.name for p in (tmp_path / "logs/slurm").iterdir()) == ["slurm_4242"]
    assert_same_run(run_dir, tmp_path / "logs/full/version_0")


@pytest.mark.slow
def test_two_process_ddp_killed_and_resumed_is_the_uninterrupted_ddp_run(tmp_path):
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    full = fit(tmp_path, *kd_args("full", 3, *ddp))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = fit(tmp_path, *kd_args("cut", 3, *ddp, kill_at(2, 2, rank=0), kill_at(2, 2, rank=1)))
    assert killed.returncode != 0
    last = tmp_path / "logs/cut/version_0/checkpoints/last.ckpt"
    assert load(last)["epoch"] == 1
    resumed = fit(tmp_path, *kd_args("cut", 3, *ddp, f"--ckpt_path={last}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "logs/cut/version_0", tmp_path / "logs/full/version_0")


# -- bad --ckpt_path: one clear error, nothing under logs/ ---------------------------------------------------------
def _write(path: Path, content: object) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def _fake_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], hparams: dict | None = None) -> Path:
    return _write(path, {"state_dict": state_dict, "epoch": 0, "global_step": 0, "hyper_parameters": hparams or {}})


TEACHER_WEIGHTS = {"model.net.1.weight": torch.zeros(256, 64)}
WIDE_STUDENT = {"student.net.1.weight": torch.zeros(64, 64), "student.net.1.bias": torch.zeros(64),
                "student.net.3.weight": torch.zeros(10, 64), "student.net.3.bias": torch.zeros(10)}


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.ckpt", "does not exist"),
    (lambda d: _write(d / "garbage.ckpt", b"not a checkpoint"), "cannot be read"),
    (lambda d: _write(d / "plain.ckpt", {"w": torch.zeros(1)}), "not a Lightning checkpoint"),
    (lambda d: _fake_checkpoint(d / "teacher.ckpt", TEACHER_WEIGHTS, {"_class_path": "kd_lightning.ClassifierModule",
                                                                      "model": "mlp"}),
     "holds a ClassifierModule run, but the config trains a DistillationModule"),
    (lambda d: _fake_checkpoint(d / "teacher.ckpt", TEACHER_WEIGHTS), "holds a ClassifierModule (a teacher"),
    (lambda d: _fake_checkpoint(d / "wide.ckpt", WIDE_STUDENT, {"_class_path": "kd_lightning.DistillationModule",
                                                                "student": "mlp", "student_kwargs": {"hidden": [64]}}),
     "student_kwargs: {'hidden': [64]} in the checkpoint, {'hidden': [32]} in the config"),
    (lambda d: _fake_checkpoint(d / "wide.ckpt", WIDE_STUDENT), "another architecture than a DistillationModule"),
], ids=["missing", "unreadable", "not-lightning", "other-module-class", "other-module-class-no-hparams",
        "other-student", "other-student-no-hparams"])
def test_bad_ckpt_path_fails_before_anything_is_written(tmp_path, make, message):
    ckpt = make(tmp_path)
    result = run_cli(tmp_path, "fit", *kd_args("bad", 2, f"--ckpt_path={ckpt}"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "kd-lightning: error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_lightning_cli_still_reads_ckpt_path_where_we_check_it():
    """kd_lightning checks --ckpt_path in an override of LightningCLI's private ``_parse_ckpt_path`` (2.6), the
    one place where Lightning merges a checkpoint's hyperparameters into the config. If a Lightning upgrade
    renames it, our checks would silently stop running: this fails first."""
    from lightning.pytorch.cli import LightningCLI

    from kd_lightning.commands.cli import KDLightningCLI

    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert "_parse_ckpt_path" in KDLightningCLI.__dict__
