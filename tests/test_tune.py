"""kd-lightning tune: a search on validation that beats a bad start, prunes, survives a kill, shares its storage
between workers, reproduces its best trial from best.yaml and never reads the test split."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from test_study_launchers import fake_slurm, tests_on_pythonpath  # noqa: E402,F401 - fixtures

from kd_lightning.callbacks.optuna_pruning import OptunaPruning  # noqa: E402
from kd_lightning.commands.cli import cli_main  # noqa: E402
from kd_lightning.commands.tune.command import main  # noqa: E402
from kd_lightning.commands.tune.search import counted, outcome  # noqa: E402
from kd_lightning.commands.tune.spec import TuneJob  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits"
TEMPERATURE = "model.init_args.terms.kd.init_args.temperature"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """The digits teacher of experiments/digits, 4 epochs (a few seconds)."""
    folder = tmp_path_factory.mktemp("teacher")
    cli_main(["fit", f"--config={DIGITS / 'base.yaml'}", f"--config={DIGITS / 'teacher.yaml'}",
              "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false", f"--checkpoint.dirpath={folder}",
              f"--trainer.logger.init_args.save_dir={folder}"])
    return folder / "best.ckpt"


def write_tune(path: Path, teacher: Path, tune: dict, overrides: dict | None = None) -> Path:
    """A tune file of the digits KD run that starts from a deliberately bad temperature (64: nearly uniform soft
    targets, which carry next to nothing) with 0.95 of the loss on them."""
    data = {"title": "test search", "configs": [str(DIGITS / "base.yaml"), str(DIGITS / "kd.yaml")],
            "teacher": str(teacher), "seed": 0,
            "overrides": {"trainer.max_epochs": 3, "threads": 1, "model.init_args.terms.kd.init_args.weight": 0.95,
                          TEMPERATURE: 64.0, **(overrides or {})},
            "tune": {"space": {TEMPERATURE: {"type": "float", "low": 0.5, "high": 64.0, "log": True}}, **tune}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def storage_study(out: Path):
    return optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'optuna.db'}")


# -- the search ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_tune_beats_a_bad_starting_temperature_and_best_yaml_reproduces_its_best_trial(tmp_path, teacher,
                                                                                               capsys):
    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 8, "pruner": "none"})
    out = tmp_path / "out"
    report = main([str(tune), "--out", str(out)])
    study = storage_study(out)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(8)) and all(outcome(t) == "complete" for t in trials)
    start = trials[0]  # the run's own settings come first
    assert start.params == {TEMPERATURE: 64.0} and start.user_attrs.get("start")
    assert study.best_value > start.value + 0.05, (start.value, study.best_value)
    assert study.best_params[TEMPERATURE] < 16  # the search moved away from the bad temperature
    for name in ("trials.md", "trials.csv", "best.yaml", "history.png", "importances.png", "slices.png"):
        assert (out / name).is_file(), name
    table = (out / "trials.md").read_text()
    assert "8 of 8 trials (8 complete)" in table and f"Best: trial {study.best_trial.number}" in table
    assert report["best"] == out / "best.yaml"
    # every trial's TensorBoard run, checkpoints and log in its own folder
    trial = out / "trials" / f"trial_{study.best_trial.number:04d}"
    assert list(trial.glob("events.out.tfevents.*")) and (trial / "checkpoints" / "best.ckpt").is_file()

    # best.yaml on top of the run's configs, same seed: the best trial's metric exactly
    overlay = yaml.safe_load((out / "best.yaml").read_text())
    assert overlay["model"]["init_args"]["terms"]["kd"]["init_args"]["temperature"] == study.best_params[TEMPERATURE]
    cli = cli_main(["fit", f"--config={DIGITS / 'base.yaml'}", f"--config={DIGITS / 'kd.yaml'}",
                    f"--config={out / 'best.yaml'}", "--trainer.enable_progress_bar=false",
                    f"--trainer.logger.init_args.save_dir={tmp_path / 'again'}",
                    f"--checkpoint.dirpath={tmp_path / 'again' / 'checkpoints'}"])
    assert float(cli.trainer.checkpoint_callback.best_model_score) == study.best_value


@pytest.mark.slow
def test_a_trial_that_does_badly_early_is_pruned(tmp_path, teacher):
    from kd_lightning.commands.tune.command import check_job, load_tune_file, make_job, prepare
    from kd_lightning.commands.tune.search import work

    tune = write_tune(tmp_path / "tune.yaml", teacher, {
        "trials": 3, "pruner": {"type": "median", "startup_trials": 1},
        "space": {"optim.lr": {"type": "categorical", "choices": [3.0e-3, 1.0e-3, 1.0e-7]}}})
    title, configs, overrides, seed, teacher_path, spec, _ = load_tune_file(tune, {})
    job = make_job(title, configs, overrides, seed, teacher_path, spec, tmp_path / "out", None, "serial", "tune")
    study = prepare(job, check_job(job))
    study.enqueue_trial({"optim.lr": 1.0e-3})
    study.enqueue_trial({"optim.lr": 1.0e-7})  # learns nothing: below the median from its first validation
    work(job)
    trials = storage_study(tmp_path / "out").get_trials()
    assert [outcome(t) for t in trials] == ["complete", "complete", "pruned"]
    pruned = trials[2]
    steps_per_trial = max(trials[0].intermediate_values)
    assert max(pruned.intermediate_values) < steps_per_trial  # stopped early, at its first validation
    assert len(pruned.intermediate_values) == 1
    assert "pruned" in (tmp_path / "out" / "trials" / "trial_0002" / "status.json").read_text()


def test_the_pruning_callback_reports_every_validation_and_keeps_the_best():
    reported = []

    class Trial:
        def report(self, value, step):
            reported.append((step, value))

        def should_prune(self):
            return False

    callback = OptunaPruning(Trial(), "val/acc", "maximize", previous={20: 0.5, 10: 0.3})
    assert reported == [(10, 0.3), (20, 0.5)] and callback.best == 0.5  # a resumed trial's earlier values first
    assert OptunaPruning(Trial(), "val/loss", "minimize", previous={1: 0.9, 2: 0.4}).best == 0.4
    with pytest.raises(ValueError, match="direction"):
        OptunaPruning(Trial(), "val/acc", "largest")


# -- storage, stops and workers --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_stopped_search_started_again_resumes_its_trial_and_repeats_no_trial_number(tmp_path, teacher, stop):
    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 3, "pruner": "none"},
                      overrides={"trainer.max_epochs": 6})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kd_lightning", "tune", str(tune), "--out", str(out)]
    search = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = out / "trials" / "trial_0001" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while time.time() < deadline and not last.is_file() and search.poll() is None:
        time.sleep(0.1)
    search.send_signal(stop)  # kill -9: a killed worker, no chance to say anything; Ctrl-C: a user's stop
    _, stderr = search.communicate()
    assert last.is_file(), "the search finished or failed before trial 1 saved a checkpoint"
    before = storage_study(out).get_trials()
    # killed, the trial is left running (the next start finds its process gone); stopped, it is marked so
    assert [outcome(t) for t in before][:2] == ["complete", "running" if stop == signal.SIGKILL else "stopped"]
    if stop == signal.SIGINT:  # one line, exit status 130, the report and the trial's status as they stand
        assert search.returncode == 130 and stderr.strip().splitlines()[-1].startswith("kd-lightning: stopped;")
        assert "| stopped |" in (out / "trials.md").read_text()
        assert '"stopped"' in (out / "trials" / "trial_0001" / "status.json").read_text()

    main([str(tune), "--out", str(out)])
    trials = storage_study(out).get_trials()
    numbers = [t.number for t in trials]
    assert numbers == sorted(set(numbers))  # no trial number twice
    assert [outcome(t) for t in trials][:2] == ["complete", "stopped"]
    resumed = [t for t in trials if t.user_attrs.get("resumes") == 1]
    assert len(resumed) == 1 and outcome(resumed[0]) == "complete"
    assert resumed[0].params == trials[1].params
    # the resumed trial went on in trial 1's folder: every validation of the whole run (6 epochs), from the first
    assert resumed[0].user_attrs["folder"] == str(out / "trials" / "trial_0001")
    assert len(resumed[0].intermediate_values) == 6
    assert len(counted(trials)) == 3  # the budget: the stopped trial was replaced, not counted
    assert "resumes trial 1" in (out / "trials.md").read_text()


def rendezvous(folder: Path) -> dict:
    """Every worker's first trial waits for the other's: both are known to take trials (tests/rendezvous.py)."""
    return {"trainer.callbacks+": {"class_path": "rendezvous.Rendezvous", "init_args": {"folder": str(folder)}}}


@pytest.mark.slow
def test_two_local_workers_share_one_storage_and_one_budget(tmp_path, teacher, tests_on_pythonpath):
    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 2, "pruner": "none"},
                      {"trainer.max_epochs": 2, **rendezvous(tmp_path / "arrived")})
    out = tmp_path / "out"
    main([str(tune), "--out", str(out), "--launcher", "local", "--jobs", "2", "--threads", "1", "--trials", "4"])
    trials = storage_study(out).get_trials()
    assert len(counted(trials)) == 4 and all(outcome(t) == "complete" for t in counted(trials))
    pids = {t.user_attrs["pid"] for t in counted(trials)}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes took trials
    assert "4 of 4 trials (4 complete)" in (out / "trials.md").read_text()
    main([str(tune), "--out", str(out), "--status"])  # the budget it was started with, not the file's
    assert "4 of 4 trials" in (out / "trials.md").read_text()


ASKING_WORKER = """
import sys, time
import optuna
from kd_lightning.commands.tune.search import one_ask_at_a_time, open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage, start = sys.argv[1], float(sys.argv[2])
study = optuna.load_study(study_name="search", storage=open_storage(storage))
while time.time() < start:
    pass
taken = []
for _ in range(10):
    with one_ask_at_a_time(storage):
        taken.append(study.ask().number)
print(taken)
"""


def test_workers_asking_at_once_never_take_the_same_queued_trial(tmp_path):
    """SQLite has no SELECT ... FOR UPDATE: two local workers asking at once popped the same queued trial (CI:
    "Cannot tell a COMPLETE trial" after both trained it into one folder)."""
    import ast

    import optuna

    from kd_lightning.commands.tune.search import open_storage

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="search", storage=open_storage(storage))
    for x in range(40):
        study.enqueue_trial({"x": float(x)})
    start = time.time() + 4  # every worker has imported optuna and loaded the study by then
    workers = [subprocess.Popen([sys.executable, "-c", ASKING_WORKER, storage, str(start)], stdout=subprocess.PIPE,
                                text=True) for _ in range(4)]
    taken = [n for w in workers for n in ast.literal_eval(w.communicate(timeout=120)[0].strip().splitlines()[-1])]
    assert sorted(taken) == list(range(40)), sorted(taken)  # each queued trial taken once, none twice


@pytest.mark.slow
def test_the_search_never_reads_the_test_split(tmp_path, teacher, monkeypatch):
    from torch.utils.data import Dataset

    from kd_lightning.data import DigitsDataModule

    reads: dict[str, int] = {"train": 0, "val": 0, "test": 0}
    calls = []

    class Recorded(Dataset):
        def __init__(self, data, split):
            self.data, self.split = data, split

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            reads[self.split] += 1
            return self.data[index]

    build = DigitsDataModule.build_datasets

    def recorded(self):
        train, val, test, labels = build(self)
        return Recorded(train, "train"), Recorded(val, "val"), Recorded(test, "test"), labels

    test_loader = DigitsDataModule.test_dataloader
    monkeypatch.setattr(DigitsDataModule, "build_datasets", recorded)
    monkeypatch.setattr(DigitsDataModule, "test_dataloader", lambda self: calls.append(1) or test_loader(self))
    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 2, "pruner": "none"}, {"trainer.max_epochs": 1})
    main([str(tune), "--out", str(tmp_path / "out")])
    assert reads["train"] > 0 and reads["val"] > 0  # the recorder sees what is read
    assert reads["test"] == 0 and not calls


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tune, message", [
    ({"trials": 2, "space": {"model.init_args.terms.kd.init_args.temprature": {"type": "float", "low": 1, "high": 2}}},
     "temprature"),
    ({"trials": 2, "space": {TEMPERATURE: {"type": "float", "low": 8, "high": 2}}}, "low (8) > high (2)"),
    ({"trials": 2, "space": {TEMPERATURE: {"type": "real", "low": 1, "high": 2}}},
     "unknown type 'real' (known: float, int, categorical)"),
    ({"trials": 2, "space": {TEMPERATURE: {"type": "float", "low": 0, "high": 2, "log": True}}}, "needs low > 0"),
    ({"trials": 0, "space": {TEMPERATURE: {"type": "float", "low": 1, "high": 2}}}, "'trials' is required"),
    ({"trials": 2, "space": {TEMPERATURE: {"type": "float", "low": 1, "high": 2}}, "metric": "test/acc"},
     "never reads the test split"),
    ({"trials": 2, "space": {TEMPERATURE: {"type": "float", "low": 1, "high": 2}}, "pruner": "percentile"},
     "pruner must be one of median, hyperband, none"),
    ({"trials": 2, "space": {"seed_everything": {"type": "int", "low": 1, "high": 2}}}, "set by the runner"),
], ids=["unknown-key", "low-above-high", "unknown-type", "log-at-zero", "no-trials", "test-metric", "pruner",
        "owned-key"])
def test_a_bad_space_fails_in_one_line_before_any_trial(tmp_path, teacher, capsys, tune, message):
    path = tmp_path / "tune.yaml"
    write_tune(path, teacher, {})
    data = yaml.safe_load(path.read_text())
    data["tune"] = tune
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_status:
        main([str(path), "--out", str(out)])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("options, message", [
    (["--storage", "foo"], "--storage must be a database URL"),
    (["--storage", "journal:"], "needs a file path"),
    (["--storage", "mysql://user@nohost/db"], "its database driver is not installed"),
    (["--launcher", "slurm"], "sbatch not found"),
    (["--trials", "0"], "--trials must be >= 1"),
], ids=["storage-not-a-url", "journal-without-file", "driver-missing", "slurm-without-sbatch", "no-trials"])
def test_bad_options_fail_in_one_line_with_nothing_written(tmp_path, teacher, capsys, monkeypatch, options, message):
    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM here
    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 2})
    with pytest.raises(SystemExit) as exit_status:
        main([str(tune), "--out", str(tmp_path / "out"), *options])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_metric_the_run_never_logs_stops_the_search_after_one_trial(tmp_path, teacher, capsys):
    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 4, "metric": "val/accuracy"},
                      {"trainer.max_epochs": 1})
    with pytest.raises(SystemExit) as exit_status:
        main([str(tune), "--out", str(tmp_path / "out")])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "'val/accuracy' was not logged" in error[0] and "val/acc" in error[0], error
    assert [outcome(t) for t in storage_study(tmp_path / "out").get_trials()] == ["failed"]  # one trial, not four


def test_a_worker_is_alive_only_while_its_own_process_runs():
    from kd_lightning.commands.tune.search import process_start, worker_alive

    me = os.getpid()
    assert worker_alive(me, process_start(me)) and worker_alive(me)
    if process_start(me) is not None:  # Linux: a pid now held by another process is not the worker's
        assert not worker_alive(me, str(int(process_start(me)) + 1))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not worker_alive(int(done.stdout))  # gone (pids are not reused this quickly)


def test_a_folder_holding_another_search_is_refused_not_mixed(tmp_path, teacher, capsys):
    from kd_lightning.commands.tune.command import load_tune_file, make_job
    from kd_lightning.commands.tune.search import load_study

    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 2})
    title, configs, overrides, seed, teacher_path, spec, _ = load_tune_file(tune, {})
    job = make_job(title, configs, overrides, seed, teacher_path, spec, tmp_path / "out", None, "serial", "tune")
    load_study(job, create=True)
    other = TuneJob(**{**job.to_dict(), "args": job.args + ["--optim.lr=0.1"]})
    with pytest.raises(ValueError, match="with other settings"):
        load_study(other, create=True)


# -- a tune: block in a study ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_study_tunes_a_run_on_its_first_seed_then_trains_every_seed_with_the_best_settings(tmp_path, capsys):
    from test_study import write_study

    from kd_lightning.commands.study import main as study_main

    tune = {"trials": 3, "pruner": "none",
            "space": {TEMPERATURE: {"type": "float", "low": 1.0, "high": 16.0, "log": True}}}
    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")], "once": True},
            "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher", "tune": tune}}
    study = write_study(tmp_path / "study.yaml", seeds=[0, 1], runs=runs,
                        overrides={"data.init_args.split_seed": "${seed}"})
    out = tmp_path / "out"
    study_main([str(study), "--out", str(out)])
    best_yaml = yaml.safe_load((out / "kd_student" / "tune" / "best.yaml").read_text())
    assert best_yaml["data"]["init_args"]["split_seed"] == 0  # the search's seed, not the placeholder
    search = storage_study_named(out / "kd_student" / "tune", "kd_student")
    trials = search.get_trials()
    assert len(trials) == 3 and all(outcome(t) == "complete" for t in trials)
    assert trials[0].params == {TEMPERATURE: 4.0} and trials[0].user_attrs.get("start")  # kd.yaml's own T first
    best = search.best_params[TEMPERATURE]
    for seed in (0, 1):  # every seed trained with the settings found on seed 0's validation
        config = yaml.safe_load((out / "kd_student" / f"seed_{seed}" / "config.yaml").read_text())
        assert config["model"]["init_args"]["terms"]["kd"]["init_args"]["temperature"] == best
    assert all(t.user_attrs["folder"].startswith(str((out / "kd_student" / "tune").resolve())) for t in trials)
    results = (out / "results.md").read_text()
    assert "Tuned on validation" in results and "3 of 3 trials (3 complete)" in results and "seed 0" in results
    # started again: nothing searched or trained again
    capsys.readouterr()
    study_main([str(study), "--out", str(out)])
    assert len(storage_study_named(out / "kd_student" / "tune", "kd_student").get_trials()) == 3
    assert "searching" not in capsys.readouterr().out


def storage_study_named(folder: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder.resolve() / 'optuna.db'}")


def test_a_bad_space_in_a_study_fails_before_anything_trains(tmp_path, capsys):
    from test_study import write_study

    from kd_lightning.commands.study import main as study_main

    tune = {"trials": 3, "space": {"model.init_args.terms.kd.init_args.temprature":
                                   {"type": "float", "low": 1.0, "high": 16.0}}}
    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")], "once": True},
            "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher", "tune": tune}}
    study = write_study(tmp_path / "study.yaml", runs=runs)
    with pytest.raises(SystemExit) as exit_status:
        study_main([str(study), "--out", str(tmp_path / "out")])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "temprature" in error[0], error
    assert not (tmp_path / "out").exists()


TUNE_FILES = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "tune" in (yaml.safe_load(p.read_text()) or {}))


def test_the_repository_has_its_tune_files():
    assert {p.relative_to(ROOT / "experiments").as_posix() for p in TUNE_FILES} >= {"digits/tune.yaml"}


@pytest.mark.parametrize("path", TUNE_FILES, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_the_repository_tune_files_are_valid(tmp_path, path):
    """Every tune file under experiments/ parses, and its run builds with every key of its space (a teacher not
    trained yet: the run's own, untrained); nothing is written."""
    from kd_lightning.commands.tune.command import check_job, load_tune_file, make_job

    title, configs, overrides, seed, teacher, spec, _ = load_tune_file(path, {})
    if not (ROOT.parent / "shared" / "data").is_dir() and any("../shared/data" in c.read_text() for c in configs):
        pytest.skip("the run reads ../shared/data, which this checkout does not have beside it")
    job = make_job(title, configs, overrides, seed, teacher, spec, tmp_path / "out", None, "serial", path.stem)
    job.args += ["--teacher_run=null"]
    start = check_job(job)
    assert start is not None and set(start) == set(spec.space)  # the run's own settings lie in the space
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_slurm_workers_share_a_journal_storage_and_the_budget(tmp_path, teacher, fake_slurm, tests_on_pythonpath):
    tune = write_tune(tmp_path / "tune.yaml", teacher, {"trials": 4, "pruner": "none"},
                      {"trainer.max_epochs": 2, **rendezvous(tmp_path / "arrived")})
    out = tmp_path / "out"
    assert main([str(tune), "--out", str(out), "--launcher", "slurm", "--jobs", "2",
                 "--resource", "time=10"]) is None  # submitted; the jobs run on
    journal = out / "optuna.journal"
    deadline = time.time() + 240
    while time.time() < deadline:
        study = optuna.load_study(study_name="tune", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))))
        if len([t for t in study.get_trials() if t.state.is_finished()]) >= 4:
            break
        time.sleep(1.0)
    trials = study.get_trials()
    assert len(counted(trials)) == 4 and all(outcome(t) == "complete" for t in counted(trials))
    assert len({t.user_attrs["slurm_job_id"] for t in counted(trials)}) == 2  # both jobs took trials
    report = main([str(tune), "--out", str(out), "--status"])  # from the folder alone: the journal is found
    assert report["best"] == out / "best.yaml" and "4 of 4 trials (4 complete)" in (out / "trials.md").read_text()
