"""Studies as jobs: the local launcher (several processes, teachers first), SLURM through submitit (against
stand-in SLURM commands that run the jobs here), ``--status``, and a finished run never lost."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_study import DIGITS, TrainCounter, write_study

from kd_lightning.commands.study import main
from kd_lightning.commands.study.jobs import FAILED_FILE, JOB_FILE, STATUS_FILE, write_json
from kd_lightning.commands.study.plan import check_and_hash, plan
from kd_lightning.commands.study.spec import load_study

TESTS = Path(__file__).resolve().parent
KILL = "kill_switch.KillAt"


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / name, weights_only=True, map_location="cpu")["state_dict"]


def same_runs(a: Path, b: Path, runs: list[str]) -> None:
    """Bit-identical best and last checkpoints and the same results.json numbers, run by run."""
    for run in runs:
        for name in ("best.ckpt", "last.ckpt"):
            wa, wb = weights(a / run / "seed_0", name), weights(b / run / "seed_0", name)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (run, name)
    def per_seed(folder: Path) -> dict:
        return {(r["run"], r["seed"]): (r["test_acc_best"], r["test_acc_last"], r["best_val_acc"])
                for r in json.loads((folder / "results.json").read_text())["per_seed"]}
    assert per_seed(a) == per_seed(b)


@pytest.fixture
def tests_on_pythonpath(monkeypatch):
    """Jobs started as processes import the tests' kill switch like the test process does."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(TESTS))


# -- local processes ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_launcher_runs_two_at_once_teachers_first_with_the_serial_results(tmp_path):
    study = write_study(tmp_path / "study.yaml")
    main([str(study), "--out", str(tmp_path / "serial")])
    main([str(study), "--out", str(tmp_path / "local"), "--launcher", "local", "--jobs", "2"])
    local = tmp_path / "local"
    same_runs(tmp_path / "serial", local, ["teacher", "kd_student", "scratch_student"])
    started = {run: (local / run / "seed_0" / "started.json").stat().st_mtime
               for run in ("teacher", "kd_student", "scratch_student")}
    teacher_done = (local / "teacher" / "seed_0" / "run.json").stat().st_mtime
    assert started["kd_student"] >= teacher_done  # the student waited for its teacher's checkpoint
    assert started["scratch_student"] < teacher_done  # the scratch student did not: two jobs at once
    assert "Epoch" in (local / "kd_student" / "seed_0" / "run.log").read_text() or \
        (local / "kd_student" / "seed_0" / "run.log").stat().st_size > 0  # each job's output in its folder


def _processes_in(folder: Path) -> list[int]:
    """Pids of this user's processes whose working directory is ``folder`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == folder:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_study_stopped_by_sigterm_stops_its_local_jobs_which_save_their_state(tmp_path, capsys):
    import signal
    import subprocess
    import time

    study = write_study(tmp_path / "study.yaml", overrides={"trainer.max_epochs": 5000},  # far longer than the test
                        runs={"teacher": {"configs": [str(DIGITS / "teacher.yaml")]}})
    command = [sys.executable, "-m", "kd_lightning", "study", str(study), "--out", "out", "--launcher", "local",
               "--jobs", "1"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = tmp_path / "out" / "teacher" / "seed_0" / STATUS_FILE
    deadline = time.time() + 120
    while time.time() < deadline and not (status.is_file() and json.loads(status.read_text()).get("step", 0) > 0):
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)  # as `kill`, a scheduler or a closed session stops the study
    launcher.communicate(timeout=120)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and _processes_in(tmp_path):
            time.sleep(0.2)
        assert not _processes_in(tmp_path), "the study's job kept training after the study was stopped"
    finally:
        for pid in _processes_in(tmp_path):
            os.kill(pid, signal.SIGKILL)
    # the job stopped as a stopped run does: its state saved at the step it stopped (not only at the last epoch's
    # end), and not marked failed (a new start resumes it: see test_study.py)
    run = tmp_path / "out" / "teacher" / "seed_0"
    log = (run / "run.log").read_text()
    assert "Received SIGTERM" in log and "Stopped by a signal at step" in log, log[-2000:]
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / FAILED_FILE).exists()
    main([str(study), "--out", str(tmp_path / "out"), "--status"])
    status = capsys.readouterr().out
    assert "seed 0 teacher" in status and "failed" not in status, status


@pytest.mark.slow
def test_a_serial_study_stopped_by_ctrl_c_marks_its_run_stopped_not_failed(tmp_path, capsys):
    import signal
    import subprocess
    import time

    study = write_study(tmp_path / "study.yaml", overrides={"trainer.max_epochs": 5000},
                        runs={"teacher": {"configs": [str(DIGITS / "teacher.yaml")]}})
    command = [sys.executable, "-m", "kd_lightning", "study", str(study), "--out", "out"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "out" / "teacher" / "seed_0"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "last.ckpt").is_file():
        time.sleep(0.2)
    launcher.send_signal(signal.SIGINT)  # Ctrl-C; Lightning turns it into sys.exit(1) inside the fit
    launcher.wait(timeout=120)
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / FAILED_FILE).exists()
    main([str(study), "--out", str(tmp_path / "out"), "--status"])
    status = capsys.readouterr().out
    assert "stopped" in status and "failed" not in status, status


@pytest.mark.slow
def test_a_run_training_in_another_process_is_not_started_twice(tmp_path):
    """The same study started again (another terminal) while its run trains: one line that names the run and the
    process, and nothing of the training run touched; the run's own start is not blocked by its lock."""
    import signal
    import subprocess
    import time

    study = write_study(tmp_path / "study.yaml", overrides={"trainer.max_epochs": 5000},
                        runs={"teacher": {"configs": [str(DIGITS / "teacher.yaml")]}})
    command = [sys.executable, "-m", "kd_lightning", "study", str(study), "--out", "out"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "out" / "teacher" / "seed_0"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / STATUS_FILE).is_file():
            time.sleep(0.2)
        launch_files = ("job.json", "started.json", FAILED_FILE)
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name in launch_files}
        second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"seed 0 teacher is training in process {first.pid} on " in err[0], err
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name in launch_files} == before
        assert sorted(p.name for p in run.parent.iterdir()) == ["seed_0"]  # nothing set aside
        assert first.poll() is None  # still training
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)


def test_a_job_whose_run_is_locked_by_another_process_refuses_before_touching_its_folder(tmp_path):
    """The job's own check (a duplicate SLURM job, or a launch that raced past the study's check): execute() refuses
    while another process holds the run's lock, and trains once the lock is free."""
    from filelock import FileLock

    from kd_lightning.commands.study.jobs import RUN_LOCK, StudyError, execute

    run = plan(load_study(write_study(tmp_path / "study.yaml", runs={"teacher": {
        "configs": [str(DIGITS / "teacher.yaml")]}})), tmp_path / "out")[0]
    run.config_hash = check_and_hash(run)
    run.folder.mkdir(parents=True)
    other = FileLock(run.folder / RUN_LOCK)  # another open of the lock file: as another process's
    other.acquire()
    try:
        with pytest.raises(StudyError, match="seed 0 teacher is training in another process"):
            execute(run)
        assert sorted(p.name for p in run.folder.iterdir()) == [RUN_LOCK]  # nothing written
    finally:
        other.release()
    result, how = execute(run)
    assert how == "trained" and result.test_acc_best > 0.5


def test_only_the_first_task_of_a_multi_process_job_takes_the_run_lock(tmp_path, monkeypatch):
    """A SLURM job with several tasks (one per GPU) runs the job once per task: the other tasks must not be refused
    by the first task's lock."""
    from filelock import FileLock
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from kd_lightning.commands.study.jobs import RUN_LOCK, StudyError, training_lock

    run = plan(load_study(write_study(tmp_path / "study.yaml")), tmp_path / "out")[0]
    run.folder.mkdir(parents=True)
    first_task = FileLock(run.folder / RUN_LOCK)
    first_task.acquire()
    try:
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        with training_lock(run):
            pass
        monkeypatch.setattr(rank_zero_only, "rank", 0)
        with pytest.raises(StudyError), training_lock(run):
            pass
    finally:
        first_task.release()


def test_a_run_setting_up_shows_as_starting_and_as_stopped_once_its_process_has_ended(tmp_path, monkeypatch, capsys):
    """Before its first step a run loads its data and teacher, or builds a teacher cache (12 min for the flowers
    function-matching cache): the progress line showed nothing and --status said "queued" all that time, or an
    earlier stopped attempt's step as if it were training."""
    import time

    from kd_lightning.commands.study import jobs, launchers
    from kd_lightning.commands.study.status import run_state

    study = write_study(tmp_path / "study.yaml", runs={"teacher": {"configs": [str(DIGITS / "teacher.yaml")]}})
    out = tmp_path / "out"
    run = plan(load_study(study), out)[0]
    run.config_hash = check_and_hash(run)
    run.folder.mkdir(parents=True)
    write_json(run.folder / JOB_FILE, {"launcher": "local", "config_hash": run.config_hash})
    write_json(run.folder / STATUS_FILE, {"state": "running", "step": 7, "max_steps": 8, "updated_at": time.time(),
                                          "host": "vm", "pid": 1})  # an earlier attempt's, stopped at step 7
    seen = {}

    def setting_up(planned_run, resume_from=None, callbacks=None):  # stands for the CLI before its first step
        seen["status.json"] = json.loads((run.folder / STATUS_FILE).read_text())
        seen["progress"] = launchers.progress_line([planned_run], 0, 1, time.perf_counter())
        seen["--status"] = run_state(planned_run, None)  # what --status shows (its stdout is the run's log here)
        raise KeyboardInterrupt  # the process ends (Ctrl-C) before its first step

    monkeypatch.setattr(jobs, "train_run", setting_up)
    with pytest.raises(KeyboardInterrupt):
        jobs.execute(run)
    assert seen["status.json"]["state"] == "starting" and seen["status.json"]["pid"] == os.getpid()
    assert "running: seed 0 teacher starting (0 min)" in seen["progress"] and "step 7" not in seen["progress"]
    assert seen["--status"].state == "running" and seen["--status"].detail.startswith("starting for 0 min")
    main([str(study), "--out", str(out), "--status"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("seed 0 teacher"))
    assert "stopped" in line and "while starting" in line, line


def test_a_serial_studys_progress_shows_the_run_in_progress_not_a_later_runs_stopped_attempt(tmp_path, capsys,
                                                                                           monkeypatch):
    import time

    from kd_lightning.commands.study import launchers

    monkeypatch.setattr(launchers, "PROGRESS_EVERY_S", 0.05)
    study = write_study(tmp_path / "study.yaml", overrides={"trainer.max_epochs": 3}, runs={
        "teacher": {"configs": [str(DIGITS / "teacher.yaml")]}, "scratch": {"configs": [str(DIGITS / "scratch.yaml")]}})
    later = tmp_path / "out" / "scratch" / "seed_0"
    later.mkdir(parents=True)
    write_json(later / STATUS_FILE, {"state": "running", "step": 7, "max_steps": 8, "updated_at": time.time()})
    main([str(study), "--out", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "running:" in line]
    assert any("seed 0 teacher step" in line for line in lines), lines
    assert not any("scratch step 7/8" in line for line in lines), lines


@pytest.mark.slow
def test_a_failed_teacher_blocks_its_students_and_a_new_start_runs_only_what_is_not_done(tmp_path, capsys,
                                                                                          tests_on_pythonpath):
    failing = {"trainer.callbacks+": {"class_path": KILL, "init_args": {"epoch": 1, "signal_name": "RAISE"}}}
    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")], "overrides": failing},
            "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher"},
            "scratch_student": {"configs": [str(DIGITS / "scratch.yaml")]}}
    study = write_study(tmp_path / "study.yaml", runs=runs)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_status:
        main([str(study), "--out", str(out), "--launcher", "local", "--jobs", "2"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "2 of 3 runs did not finish" in error[0]
    assert "seed 0 teacher: failed: RuntimeError: a failure the test asked for" in error[0]
    assert "seed 0 kd_student: blocked: its teacher (seed 0 teacher) did not finish" in error[0]
    assert not (out / "kd_student" / "seed_0" / "started.json").exists()  # never started
    failed = json.loads((out / "teacher" / "seed_0" / FAILED_FILE).read_text())
    assert "a failure the test asked for" in failed["error"] and Path(failed["log"]).is_file()

    main([str(study), "--out", str(out), "--status"])
    status = capsys.readouterr().out
    assert "seed 0 teacher" in status and "failed" in status and "blocked" in status and "done" in status

    runs["teacher"].pop("overrides")  # the cause fixed: the study started again runs what is not done
    write_study(study, runs=runs)
    scratch = weights(out / "scratch_student" / "seed_0", "last.ckpt")
    main([str(study), "--out", str(out), "--launcher", "local", "--jobs", "2"])
    lines = capsys.readouterr().out
    assert "seed 0 scratch_student: test acc" in lines and "(finished before: skipped)" in lines
    assert all(torch.equal(v, weights(out / "scratch_student" / "seed_0", "last.ckpt")[k]) for k, v in scratch.items())
    assert (out / "kd_student" / "seed_0" / "run.json").is_file() and (out / "results.json").is_file()


# -- a finished run is never lost --------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_same_study_by_another_path_or_working_directory_retrains_nothing(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    write_study(home / "study.yaml")
    main([str(home / "study.yaml"), "--out", str(home / "out")])
    before = {p: p.stat().st_mtime_ns for p in (home / "out").rglob("*") if p.is_file() and "results" not in p.name}
    (tmp_path / "scratch_fs").symlink_to(home)  # the same folder by another name, as home and scratch on a cluster
    (tmp_path / "elsewhere").mkdir()
    for cwd, study, out in [(home, "study.yaml", "out"),  # relative
                            (tmp_path, "home/study.yaml", "home/out"),  # relative, from another directory
                            (tmp_path, str(tmp_path / "scratch_fs/study.yaml"), str(tmp_path / "scratch_fs/out")),
                            (tmp_path / "elsewhere", str(home / "study.yaml"), "../home/out")]:
        monkeypatch.chdir(cwd)
        counter = TrainCounter(monkeypatch)
        main([study, "--out", out])
        assert counter.trained == [], (cwd, study, out)
        assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_a_finished_run_brought_in_under_another_name_is_reported_under_the_studys_name(tmp_path, monkeypatch,
                                                                                          capsys):
    """A run trained elsewhere (a probe study, another --out) and copied into this study under this study's run
    name, with the same settings, is done: it was counted done but left out of results.md and the figure, because
    the results kept the name it had where it trained."""
    import shutil

    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")]}}
    main([str(write_study(tmp_path / "probe.yaml", runs=runs)), "--out", str(tmp_path / "probe")])
    study = write_study(tmp_path / "study.yaml", runs={"big_teacher": runs["teacher"]})
    shutil.copytree(tmp_path / "probe" / "teacher" / "seed_0", tmp_path / "out" / "big_teacher" / "seed_0")
    capsys.readouterr()
    counter = TrainCounter(monkeypatch)
    rows = main([str(study), "--out", str(tmp_path / "out")])
    assert counter.trained == [] and [row["run"] for row in rows] == ["big_teacher"]
    main([str(study), "--out", str(tmp_path / "out"), "--report"])
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["run"], r["seed"]) for r in report["per_seed"]] == [("big_teacher", 0)]
    assert "| big_teacher | 1 |" in (tmp_path / "out" / "results.md").read_text()


def test_the_seed_is_part_of_a_runs_identity_and_its_folder_is_not(tmp_path):
    from kd_lightning.commands.study.plan import check_and_hash, plan
    from kd_lightning.commands.study.spec import load_study

    spec = load_study(write_study(tmp_path / "study.yaml", seeds=[0, 1]))
    hashes = {}
    for out in (tmp_path / "a", Path(os.path.relpath(tmp_path / "b"))):
        for run in plan(spec, out):
            run.config_hash = check_and_hash(run)
            hashes.setdefault(run.title, set()).add(run.config_hash)
    assert all(len(h) == 1 for h in hashes.values())  # another output folder: the same runs
    assert hashes["seed 0 teacher"] != hashes["seed 1 teacher"]  # another seed: another run


@pytest.mark.slow
def test_a_finished_run_whose_settings_changed_is_set_aside_and_retrain_is_explicit(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text((DIGITS / "scratch.yaml").read_text())
    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")]},
            "scratch_student": {"configs": [str(scratch)]}}
    study = write_study(tmp_path / "study.yaml", runs=runs)
    out = tmp_path / "out"
    main([str(study), "--out", str(out)])
    first = weights(out / "scratch_student" / "seed_0", "last.ckpt")
    scratch.write_text(scratch.read_text().replace("CrossEntropy}", "CrossEntropy, init_args: {label_smoothing: 0.1}}"))
    capsys.readouterr()
    main([str(study), "--out", str(out)])
    kept = [p for p in (out / "scratch_student").iterdir() if p.name.startswith("seed_0.set-aside-")]
    assert len(kept) == 1 and "kept as" in capsys.readouterr().err
    assert all(torch.equal(v, weights(kept[0], "last.ckpt")[k]) for k, v in first.items())  # nothing lost

    counter = TrainCounter(monkeypatch)
    main([str(study), "--out", str(out), "--retrain", "teacher"])
    assert counter.trained == ["seed 0 teacher"]
    assert len([p for p in (out / "teacher").iterdir() if "set-aside" in p.name]) == 1


# -- status --------------------------------------------------------------------------------------------------------
def test_status_reads_done_running_failed_blocked_queued_and_not_started_from_the_folder(tmp_path, capsys):
    study = write_study(tmp_path / "study.yaml", seeds=[0])
    out = tmp_path / "out"
    main([str(study), "--out", str(out)])  # seed 0: done
    three = write_study(tmp_path / "study.yaml", seeds=[0, 1, 2])
    folder = out / "teacher" / "seed_1"
    folder.mkdir(parents=True)
    write_json(folder / FAILED_FILE, {"error": "RuntimeError: out of memory", "log": str(folder / "run.log")})
    running = out / "scratch_student" / "seed_1"
    running.mkdir(parents=True)
    import time

    write_json(running / STATUS_FILE, {"state": "running", "step": 3, "max_steps": 8, "val_acc": 0.5, "eta_s": 60,
                                       "updated_at": time.time(), "host": "node7"})
    queued = out / "teacher" / "seed_2"
    queued.mkdir(parents=True)
    write_json(queued / JOB_FILE, {"launcher": "slurm", "slurm_job_id": "4242", "config_hash": "x"})
    capsys.readouterr()
    main([str(three), "--out", str(out), "--status"])
    lines = {line.split("  ")[0].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("seed")}
    assert "done" in lines["seed 0 kd_student"] and "test acc" in lines["seed 0 kd_student"]
    assert "failed" in lines["seed 1 teacher"] and "out of memory" in lines["seed 1 teacher"]
    assert "blocked" in lines["seed 1 kd_student"]
    assert "running" in lines["seed 1 scratch_student"] and "step 3/8, val acc 50.0%" in lines["seed 1 scratch_student"]
    assert "queued" in lines["seed 2 teacher"] and "4242" in lines["seed 2 teacher"]
    assert "not started" in lines["seed 2 scratch_student"]
    assert not (out / "results.json").read_text().count('"missing": ["')  # not rewritten: runs are missing
    main([str(three), "--out", str(out), "--report"])
    report = json.loads((out / "results.json").read_text())
    assert "seed 1 teacher" in report["study"]["missing"] and len(report["per_seed"]) == 3


# -- SLURM through submitit, against stand-in SLURM commands -------------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    for command in ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol"):
        path = bin_dir / command
        path.write_text(f"#!/bin/sh\nexec {sys.executable} {TESTS / 'fake_slurm.py'} {command} \"$@\"\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path / "slurm_state"))
    return bin_dir


@pytest.mark.slow
def test_slurm_jobs_carry_resources_and_dependencies_and_requeued_or_killed_jobs_resume(tmp_path, capsys, fake_slurm,
                                                                             tests_on_pythonpath):
    marker, signalled = tmp_path / "killed_once", tmp_path / "signalled_once"
    kill = {"trainer.callbacks+": {"class_path": KILL, "init_args": {
        "epoch": 1, "batch": 1, "signal_name": "SIGKILL", "once_marker": str(marker)}}}
    # what SLURM sends --signal's lead time before the time limit: Lightning requeues the job, which resumes
    requeue = {"trainer.callbacks+": {"class_path": KILL, "init_args": {
        "epoch": 1, "batch": 2, "signal_name": "SIGUSR1", "once_marker": str(signalled)}}}
    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")], "overrides": requeue},
            "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher", "overrides": kill,
                           "resources": {"cpus": 2, "time": "00:20:00"}}}
    study = write_study(tmp_path / "study.yaml", runs=runs, resources={"partition": "debug", "mem": "4G"})
    out = tmp_path / "out"
    main([str(study), "--out", str(out), "--launcher", "slurm", "--dry-run"])
    dry = capsys.readouterr().out
    assert "#SBATCH --partition=debug" in dry and "dependency graph: seed 0 kd_student <- seed 0 teacher" in dry
    assert not (out / "teacher").exists()  # a dry run submits and writes nothing

    with pytest.raises(SystemExit) as exit_status:  # the student's job is killed mid-run (SIGKILL, once)
        main([str(study), "--out", str(out), "--launcher", "slurm", "--wait", "--resource", "account=kd"])
    assert exit_status.value.code == 2 and marker.exists() and signalled.exists()
    teacher_job = json.loads((out / "teacher/seed_0/job.json").read_text())
    slurm_record = json.loads((tmp_path / "slurm_state" / "jobs" / f"{teacher_job['slurm_job_id']}.json").read_text())
    assert slurm_record["restarts"] == 1 and slurm_record["state"] == "COMPLETED"  # requeued once, then finished
    teacher_args = json.loads((out / "teacher/seed_0/run.json").read_text())["args"]
    assert any(a.startswith("--ckpt_path=") for a in teacher_args)  # the requeued job resumed, not restarted
    student_job = json.loads((out / "kd_student/seed_0/job.json").read_text())
    scripts = {run: next((out / run / "seed_0" / "slurm").glob("*_submission.sh")).read_text()
               for run in ("teacher", "kd_student")}
    for line in ("#SBATCH --partition=debug", "#SBATCH --mem=4G", "#SBATCH --account=kd", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@120"):
        assert line in scripts["teacher"] and line in scripts["kd_student"]
    assert "#SBATCH --cpus-per-task=2" in scripts["kd_student"] and "#SBATCH --time=20" in scripts["kd_student"]
    assert f"#SBATCH --dependency=afterok:{teacher_job['slurm_job_id']}" in scripts["kd_student"]
    assert "--dependency" not in scripts["teacher"]
    interrupted = out / "kd_student" / "seed_0" / "checkpoints" / "last.ckpt"
    assert interrupted.is_file() and not (out / "kd_student/seed_0/run.json").exists()

    capsys.readouterr()
    main([str(study), "--out", str(out), "--launcher", "slurm", "--wait", "--resource", "account=kd"])
    lines = capsys.readouterr().out
    assert "seed 0 teacher: finished before: not submitted" in lines
    assert json.loads((out / "kd_student/seed_0/job.json").read_text())["slurm_job_id"] != student_job["slurm_job_id"]
    assert any(a.startswith("--ckpt_path=") for a in json.loads((out / "kd_student/seed_0/run.json").read_text())["args"])
    reference = write_study(tmp_path / "reference.yaml", runs={k: {kk: vv for kk, vv in v.items() if kk != "overrides"}
                                                              for k, v in runs.items()})
    main([str(reference), "--out", str(tmp_path / "reference")])
    for run in ("teacher", "kd_student"):  # requeued, or killed and started again: resumed exactly
        same = weights(tmp_path / "reference" / run / "seed_0", "last.ckpt")
        resumed = weights(out / run / "seed_0", "last.ckpt")
        assert all(torch.equal(v, resumed[k]) for k, v in same.items()), run


def test_bad_launcher_input_is_one_line_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    study = write_study(tmp_path / "study.yaml")
    cases = [(["--launcher", "pbs"], "invalid choice: 'pbs'"),
             (["--launcher", "slurm", "--resource", "gpu=1"], "unknown resource key 'gpu'"),
             (["--launcher", "local", "--dry-run"], "are for --launcher slurm")]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch here
    pytest.importorskip("submitit")
    cases.append((["--launcher", "slurm"], "sbatch not found on PATH"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_status:
            main([str(study), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_status.value.code == 2 and len(err) == 1 and message in err[0], (extra, err)
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(SystemExit):
        main([str(study), "--out", str(tmp_path / "out"), "--launcher", "slurm"])
    assert "pip install 'kd_lightning[cluster]'" in capsys.readouterr().err
    bad = yaml.safe_load(study.read_text())
    bad["resources"] = {"gpus": 1, "walltime": "1:00:00"}
    study.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(SystemExit):
        main([str(study), "--out", str(tmp_path / "out"), "--launcher", "slurm", "--dry-run"])
    assert "unknown resource key 'walltime'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks submitting GPU jobs from a machine without a GPU")
def test_gpu_jobs_are_checked_and_submitted_from_a_login_node_without_a_gpu(tmp_path, capsys):
    """A cluster's login node has no GPU: every run is still parsed and built (its trainer on the CPU) before
    anything is submitted, and its identity is the GPU run's; training here fails in one line instead."""
    pytest.importorskip("submitit")
    gpu = {"trainer.accelerator": "gpu", "trainer.devices": 2, "trainer.strategy": "ddp",
           "trainer.precision": "16-mixed"}
    study = write_study(tmp_path / "study.yaml", overrides=gpu, resources={"gpus": 2})
    main([str(study), "--out", str(tmp_path / "out"), "--launcher", "slurm", "--dry-run"])
    dry = capsys.readouterr().out
    assert dry.count("#SBATCH --gpus-per-node=2") == 3 and "#SBATCH --ntasks-per-node=2" in dry
    with pytest.raises(SystemExit) as exit_status:
        main([str(study), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_status.value.code == 2 and len(err) == 1 and "GPU" in err[0], err
    assert not (tmp_path / "out").exists()
    # the check's CPU trainer is not part of a run's identity; the hardware it asks for is
    cpu_run = plan(load_study(write_study(tmp_path / "cpu.yaml")), tmp_path / "out")[0]
    gpu_run = plan(load_study(study), tmp_path / "out")[0]
    assert check_and_hash(cpu_run, trains_here=False) == check_and_hash(cpu_run, trains_here=True)
    assert check_and_hash(gpu_run, trains_here=False) != check_and_hash(cpu_run)
