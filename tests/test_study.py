"""``kd-lightning study``: aggregation, a tiny digits study end to end, resuming, reruns on change, bad input."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd_lightning.commands.study import jobs as study_module
from kd_lightning.models.loading import load_model
from kd_lightning.commands.study import main
from kd_lightning.commands.study.plan import check_and_hash, non_default_settings, plan
from kd_lightning.commands.study.spec import StudyError, load_study, substitute_seed
from kd_lightning.commands.study.report import RunResult, mean_curve, mean_std, plot_results, summarize, to_markdown

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits"
# 1,078 training images at batch 256: 4 steps an epoch, 2 epochs, a validation after each
TINY = {"data.init_args.batch_size": 256, "trainer.max_epochs": 2}
PROGRESS = re.compile(r"^\[ *\d+\.\ds\] seed \d+ \w+: test acc \d+\.\d% \(best\) / \d+\.\d% \(last\)")


def write_study(path: Path, seeds: list[int] | None = (0,), overrides: dict | None = None,
                runs: dict | None = None, **extra) -> Path:
    """A digits study over the experiments/digits configs (absolute paths, so it may live anywhere)."""
    runs = runs if runs is not None else {
        "teacher": {"configs": [str(DIGITS / "teacher.yaml")]},
        "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher"},
        "scratch_student": {"configs": [str(DIGITS / "scratch.yaml")]},
    }
    study = {"base": [str(DIGITS / "base.yaml")], **({"seeds": list(seeds)} if seeds is not None else {}),
             "overrides": {**TINY, **(overrides or {})}, "runs": runs, **extra}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


TRAIN_RUN = study_module.train_run


class StudyStopped(Exception):
    """Stands for Ctrl-C (not KeyboardInterrupt itself, which would stop pytest if it escaped)."""


class TrainCounter:
    """Replaces kd_lightning.study.train_run: records which runs trained, and stops the study when the run
    named ``stop_at`` is about to train."""

    def __init__(self, monkeypatch, stop_at: str | None = None) -> None:
        self.trained: list[str] = []
        self.stop_at = stop_at
        monkeypatch.setattr(study_module, "train_run", self)

    def __call__(self, run, resume_from=None, callbacks=None):
        if run.spec.name == self.stop_at:
            raise StudyStopped
        self.trained.append(run.title)
        return TRAIN_RUN(run, resume_from, callbacks)


# -- aggregation ----------------------------------------------------------------------------------------------
def test_mean_std_is_mean_and_sample_std():
    mean, std = mean_std([90.0, 92.0, 94.0, 96.0])
    assert mean == 93.0 and std == pytest.approx(math.sqrt(20 / 3))  # squares 9+1+1+9 over n-1 = 3
    assert mean_std([91.5]) == (91.5, None)  # one seed has no spread to show
    with pytest.raises(ValueError):
        mean_std([])


def test_summarize_keeps_best_and_last_apart():
    results = [
        RunResult("kd", 0, test_acc_best=0.90, test_acc_last=0.80, params=10, size_kb=1.0, latency_us=30.0),
        RunResult("kd", 1, test_acc_best=0.94, test_acc_last=0.84, params=10, size_kb=1.0, latency_us=20.0),
        RunResult("teacher", 0, test_acc_best=0.97, test_acc_last=0.96),
    ]
    rows = summarize(results, ["teacher", "kd", "never_ran"], labels={"kd": "KD student"}, groups={"kd": "10%"})
    assert [r["run"] for r in rows] == ["teacher", "kd"]  # the study's order; runs without results left out
    teacher, kd = rows
    assert kd["label"] == "KD student" and kd["group"] == "10%" and teacher["label"] == "teacher"
    assert kd["seeds"] == 2
    assert kd["best_ckpt_test_acc_mean"] == pytest.approx(92.0)
    assert kd["best_ckpt_test_acc_std"] == pytest.approx(math.sqrt(8.0))  # (90 - 92)² + (94 - 92)² over 1
    assert kd["last_ckpt_test_acc_mean"] == pytest.approx(82.0)
    assert kd["last_ckpt_test_acc_std"] == pytest.approx(math.sqrt(8.0))
    assert kd["latency_us"] == 20.0  # best of the seeds
    assert teacher["best_ckpt_test_acc_mean"] == pytest.approx(97.0) and teacher["last_ckpt_test_acc_std"] is None
    assert "| teacher | 1 | 97.0 | 96.0 |" in to_markdown(rows)  # a single seed: its value, no "± 0.0"
    assert teacher["params"] is None and teacher["latency_us"] is None


def test_rows_carry_validation_accuracy_and_x_and_the_figure_plots_against_x(tmp_path):
    results = [RunResult("kd_10", seed, test_acc_best=0.6 + seed / 100, test_acc_last=0.5, best_val_acc=0.7 + seed / 100)
               for seed in (0, 1)] + [
        RunResult("kd_50", 0, test_acc_best=0.8, test_acc_last=0.8, best_val_acc=0.82),
        RunResult("scratch_10", 0, test_acc_best=0.4, test_acc_last=0.4),
        RunResult("teacher", 0, test_acc_best=0.9, test_acc_last=0.9)]
    xs = {"kd_10": 10.0, "kd_50": 50.0, "scratch_10": 10.0}
    labels = {"kd_10": "KD", "kd_50": "KD", "scratch_10": "scratch"}
    rows = summarize(results, ["teacher", "kd_10", "kd_50", "scratch_10"], labels=labels, xs=xs)
    teacher, kd_10, kd_50, scratch_10 = rows
    assert kd_10["best_val_acc_mean"] == pytest.approx(70.5) and kd_10["best_val_acc_std"] == pytest.approx(0.7071, abs=1e-4)
    assert scratch_10["best_val_acc_mean"] is None and teacher["x"] is None and kd_50["x"] == 50.0
    markdown = to_markdown(rows)
    assert "| KD | 2 | 60.5 ± 0.7 | 50.0 ± 0.0 | 70.5 ± 0.7 |" in markdown

    def png_width(path):
        return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width

    plot_results(tmp_path / "with_x.png", "t", rows, {}, x_label="% of labels")
    plot_results(tmp_path / "without_x.png", "t", [dict(r, x=None) for r in rows], {})
    assert png_width(tmp_path / "with_x.png") > 1.4 * png_width(tmp_path / "without_x.png")  # a third panel


def test_long_run_labels_in_the_figure_do_not_run_into_each_other(tmp_path, monkeypatch):
    """Five runs with labels such as "function matching, soft 0.5 / hard 0.5 (seed 0)": the bar panel's tick labels
    overlapped into one unreadable line (README's all-labels figure)."""
    from matplotlib.figure import Figure

    labels = {"teacher": "teacher (all labels)", "fm": "function matching, cached", "scratch": "scratch",
              "fm_hard": "function matching, soft 0.5 / hard 0.5 (seed 0)", "mixup": "scratch with MixUp (seed 0)"}
    rows = summarize([RunResult(name, 0, test_acc_best=0.7, test_acc_last=0.7) for name in labels], list(labels),
                     labels=labels)
    boxes = []
    save = Figure.savefig

    def savefig(figure, *args, **kwargs):
        renderer = figure.canvas.get_renderer()
        boxes.extend(t.get_window_extent(renderer) for t in figure.axes[0].get_xticklabels())
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot_results(tmp_path / "figure.png", "t", rows, {})
    assert len(boxes) == 5
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]


def test_mean_curve_averages_seeds_step_by_step():
    steps, means, stds = mean_curve([[(15, 0.5), (31, 0.7)], [(15, 0.7), (31, 0.9), (31, 0.8), (47, 0.95)]])
    assert steps == [15, 31, 47]
    assert means == pytest.approx([0.6, 0.75, 0.95])  # step 31 of the second curve counts its last value, 0.8
    assert stds[0] == pytest.approx(math.sqrt(0.02)) and stds[2] == 0.0
    assert mean_curve([]) == ([], [], [])


def test_seed_placeholder():
    assert substitute_seed("${seed}", 3) == 3
    assert substitute_seed({"name": "run_${seed}", "keep": [1, "${seed}"]}, 4) == {"name": "run_4", "keep": [1, 4]}
    with pytest.raises(StudyError, match="unknown placeholder"):
        substitute_seed("${sed}", 1)


def test_more_seeds_reuse_the_shared_teacher(tmp_path):
    """--seeds adds students, not teachers: a ``once`` run keeps the study file's first seed, so its students of
    the new seeds distil from the teacher already trained (and two commands with disjoint --seeds can train
    side by side after it)."""
    from dataclasses import replace

    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")], "once": True},
            "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher"}}
    spec = load_study(write_study(tmp_path / "study.yaml", seeds=[0, 1], runs=runs))
    planned = plan(replace(spec, seeds=(5, 6)), tmp_path / "out")  # what --seeds 5 6 does
    assert [run.title for run in planned] == ["seed 0 teacher", "seed 5 kd_student", "seed 6 kd_student"]
    assert {run.teacher.folder for run in planned[1:]} == {tmp_path / "out" / "teacher" / "seed_0"}
    assert "--seed_everything=0" in planned[0].args


# -- running --------------------------------------------------------------------------------------------------
def test_a_serial_study_prints_its_progress_at_the_terminal_not_into_the_runs_log(tmp_path, capsys, monkeypatch):
    """A serial study trains in this process with its output sent to the run's run.log: the progress lines must
    still reach the terminal (they went into run.log, so the terminal showed nothing until a run ended)."""
    from kd_lightning.commands.study import launchers

    monkeypatch.setattr(launchers, "PROGRESS_EVERY_S", 0.05)
    study = write_study(tmp_path / "study.yaml", runs={"teacher": {"configs": [str(DIGITS / "teacher.yaml")]}},
                        overrides={"trainer.max_epochs": 3})
    main([str(study), "--out", str(tmp_path / "out")])
    shown = [line for line in capsys.readouterr().out.splitlines() if "done; running: seed 0 teacher step" in line]
    assert shown, "no progress line at the terminal"
    assert "done; running:" not in (tmp_path / "out" / "teacher" / "seed_0" / "run.log").read_text()


def test_tiny_study_end_to_end(tmp_path, capsys):
    study = write_study(tmp_path / "study.yaml", seeds=[0, 1],
                        overrides={"data.init_args.split_seed": "${seed}"}, title="tiny digits")
    out = tmp_path / "out"
    rows = main([str(study), "--out", str(out)])

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[") and "running:" not in line]
    assert len(lines) == 6 and all(PROGRESS.match(line) for line in lines), lines
    assert [(r["run"], r["seeds"]) for r in rows] == [("teacher", 2), ("kd_student", 2), ("scratch_student", 2)]
    assert rows[0]["params"] > 10 * rows[1]["params"] and rows[1]["params"] == rows[2]["params"]

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["teacher", "kd_student", "scratch_student"]
    assert {"best_ckpt_test_acc_mean", "best_ckpt_test_acc_std", "last_ckpt_test_acc_mean",
            "last_ckpt_test_acc_std"} <= set(table[0])
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# tiny digits") and "test acc, best.ckpt (%)" in markdown and "| kd_student | 2 |" in markdown
    results = json.loads((out / "results.json").read_text())
    assert len(results["per_seed"]) == 6
    kd_seeds = [r for r in results["per_seed"] if r["run"] == "kd_student"]
    assert rows[1]["best_ckpt_test_acc_mean"] == pytest.approx(50 * sum(r["test_acc_best"] for r in kd_seeds))
    curve = results["val_acc_curves"]["teacher"]
    assert curve["step"] == [3, 7] and all(0 < v <= 1 for v in curve["val_acc_mean"])  # 2 validations, 4 steps apart
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for seed in (0, 1):
        folder = out / "kd_student" / f"seed_{seed}"
        assert (folder / "checkpoints" / "best.ckpt").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        config = yaml.safe_load((folder / "config.yaml").read_text())
        # every student of a seed distils from that seed's teacher; the seed reaches the config values
        assert config["model"]["init_args"]["teacher_checkpoint"] == str(out / "teacher" / f"seed_{seed}"
                                                                         / "checkpoints" / "best.ckpt")
        assert config["seed_everything"] == seed and config["data"]["init_args"]["split_seed"] == seed
        # what evaluate/export read: the student's weights from the KD checkpoint
        student = load_model("mlp", 10, checkpoint=str(folder / "checkpoints" / "best.ckpt"), hidden=[32])
        assert sum(p.numel() for p in student.parameters()) == rows[1]["params"]


def test_teacher_trained_once_teaches_every_seed(tmp_path):
    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")], "once": True},
            "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher"}}
    study = write_study(tmp_path / "study.yaml", seeds=[5, 6], runs=runs,
                        overrides={"trainer.max_epochs": 1})
    rows = main([str(study), "--out", str(tmp_path / "out")])
    assert [(r["run"], r["seeds"]) for r in rows] == [("teacher", 1), ("kd_student", 2)]
    assert not (tmp_path / "out" / "teacher" / "seed_6").exists()
    config = yaml.safe_load((tmp_path / "out" / "kd_student" / "seed_6" / "config.yaml").read_text())
    assert config["model"]["init_args"]["teacher_checkpoint"].endswith("teacher/seed_5/checkpoints/best.ckpt")


def test_stopped_study_resumes_without_retraining_finished_runs(tmp_path, monkeypatch, capsys):
    study = write_study(tmp_path / "study.yaml")
    out = tmp_path / "out"
    stopped = TrainCounter(monkeypatch, stop_at="scratch_student")
    with pytest.raises(StudyStopped):
        main([str(study), "--out", str(out)])
    assert stopped.trained == ["seed 0 teacher", "seed 0 kd_student"]
    teacher_ckpt = out / "teacher" / "seed_0" / "checkpoints" / "best.ckpt"
    finished = [out / "teacher", out / "kd_student"]
    before = {p: p.stat().st_mtime_ns for folder in finished for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()

    resumed = TrainCounter(monkeypatch)
    rows = main([str(study), "--out", str(out)])
    assert resumed.trained == ["seed 0 scratch_student"]
    assert teacher_ckpt in before and all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())
    # the stopped attempt's folder (its run.log says why it stopped) is kept beside the new one, not deleted
    assert [p.name for p in (out / "scratch_student").iterdir() if "set-aside" in p.name]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[") and "running:" not in line]
    assert [line.endswith("(finished before: skipped)") for line in lines] == [True, True, False]
    assert [r["run"] for r in rows] == ["teacher", "kd_student", "scratch_student"]


def test_a_study_preempted_inside_a_run_resumes_that_run_exactly(tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of the KD student's second epoch: the study exits with 143 after saving last.ckpt;
    started again, it resumes that run from last.ckpt, and ends with the uninterrupted study's weights."""
    import torch

    import kd_lightning.commands.cli

    main([str(write_study(tmp_path / "reference.yaml")), "--out", str(tmp_path / "reference")])
    study = str(write_study(tmp_path / "study.yaml"))
    cli_main = kd_lightning.commands.cli.cli_main
    stop = "--trainer.callbacks+={class_path: kill_switch.KillAt, init_args: {epoch: 1, batch: 1, signal_name: SIGTERM}}"

    def preempted_kd_student(args, run=True, callbacks=None, **kwargs):  # only the KD student's training (not the checks)
        kd = run and "--trainer.logger.init_args.name=kd_student" in args
        return cli_main([*args, stop] if kd else args, run, callbacks, **kwargs)

    monkeypatch.setattr(kd_lightning.commands.cli, "cli_main", preempted_kd_student)
    with pytest.raises(SystemExit) as exit_status:
        main([study, "--out", str(tmp_path / "out")])
    assert exit_status.value.code == 143
    monkeypatch.setattr(kd_lightning.commands.cli, "cli_main", cli_main)
    interrupted = tmp_path / "out/kd_student/seed_0"
    assert not (interrupted / "run.json").exists()
    assert torch.load(interrupted / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4 + 2

    capsys.readouterr()
    main([study, "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().out.splitlines()
    assert any("teacher" in line and "skipped" in line for line in lines)
    assert any("kd_student" in line and "resumed an interrupted run" in line for line in lines)
    for run in ("kd_student", "scratch_student"):
        done, reference = (json.loads((tmp_path / f"{out}/{run}/seed_0/run.json").read_text())["results"]
                           for out in ("out", "reference"))
        assert done["test_acc_best"] == reference["test_acc_best"]
        assert done["test_acc_last"] == reference["test_acc_last"]
        resumed, uninterrupted = (torch.load(tmp_path / f"{out}/{run}/seed_0/checkpoints/last.ckpt",
                                             weights_only=True)["state_dict"] for out in ("out", "reference"))
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_changed_config_reruns_that_run_and_its_students(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text((DIGITS / "scratch.yaml").read_text())
    runs = {"teacher": {"configs": [str(DIGITS / "teacher.yaml")]},
            "kd_student": {"configs": [str(DIGITS / "kd.yaml")], "teacher": "teacher"},
            "scratch_student": {"configs": ["scratch.yaml"]}}  # relative to the study file
    study = write_study(tmp_path / "study.yaml", runs=runs)
    out = tmp_path / "out"
    main([str(study), "--out", str(out)])

    counter = TrainCounter(monkeypatch)
    main([str(study), "--out", str(out), "--verbose"])  # progress bars on: display only, nothing trains again
    assert counter.trained == []

    scratch.write_text(scratch.read_text().replace("CrossEntropy}", "CrossEntropy, init_args: {label_smoothing: 0.1}}"))
    assert "label_smoothing" in scratch.read_text()  # the file's content changed, not its path
    main([str(study), "--out", str(out)])
    assert counter.trained == ["seed 0 scratch_student"]

    counter.trained.clear()
    runs["teacher"]["overrides"] = {"optim.lr": 0.002}
    write_study(study, runs=runs)
    main([str(study), "--out", str(out)])
    assert counter.trained == ["seed 0 teacher", "seed 0 kd_student"]  # a new teacher: its student distils again


class _Upgraded:
    """A class as a package upgrade leaves it: a new option ``smoothing`` whose default keeps the old behaviour."""

    def __init__(self, lr: float = 0.1, crop: tuple = (0.25, 1.0), smoothing: float = 0.0) -> None:
        pass


def test_run_hash_ignores_options_left_at_their_defaults():
    """A finished run is not trained again because an upgrade added an option with a default; any value that
    differs from its default still counts (given or not, as the parser and the class signature see it)."""
    path = f"{__name__}._Upgraded"
    before = {"model": {"class_path": path, "init_args": {"lr": 0.2, "crop": [0.25, 1.0]}}, "trainer": {"max_steps": 5}}
    after = {"model": {"class_path": path, "init_args": {"lr": 0.2, "crop": [0.25, 1.0], "smoothing": 0.0}},
             "trainer": {"max_steps": 5, "max_time": None}}
    defaults = {"trainer": {"max_steps": -1, "max_time": None}}
    expected = {"model": {"class_path": path, "init_args": {"lr": 0.2}}, "trainer": {"max_steps": 5}}
    assert non_default_settings(before, defaults) == non_default_settings(after, defaults) == expected
    changed = {"model": {"class_path": path, "init_args": {"lr": 0.2, "smoothing": 0.1}}, "trainer": {"max_steps": -1}}
    assert non_default_settings(changed, defaults) == {
        "model": {"class_path": path, "init_args": {"lr": 0.2, "smoothing": 0.1}}}
    # a subclass's **kwargs reach its base's arguments: FlowersDataModule's batch_size default is the base's 64
    data = {"class_path": "kd_lightning.data.FlowersDataModule", "init_args": {"root": "r", "batch_size": 64}}
    assert non_default_settings(data) == {"class_path": "kd_lightning.data.FlowersDataModule",
                                          "init_args": {"root": "r"}}


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (lambda s: s["runs"]["kd_student"].update(configs=["kdd.yaml"]), "run 'kd_student': config file not found: "),
    (lambda s: s["runs"]["kd_student"].update(teacher="teachr"),
     "run 'kd_student' names teacher 'teachr', which is not a run of this study (runs: teacher, kd_student,"),
    (lambda s: s.pop("seeds"), "'seeds' is required"),
    (lambda s: s.update(sedes=[0]), "unknown key 'sedes' (known: title, base, seeds, overrides, runs, x_label, resources)"),
    (lambda s: s["runs"]["kd_student"].update(x="ten"), "run 'kd_student': 'x' must be a number (e.g. the % of labels)"),
    (lambda s: s["runs"]["teacher"].update(overides={}), "run 'teacher': unknown key 'overides'"),
    (lambda s: s["overrides"].update({"trainer.logger.init_args.save_dir": "elsewhere"}), "set by the study runner"),
    # errors only the CLI parser finds, in the last run: still reported before the first run trains
    (lambda s: s["runs"]["scratch_student"].update(overrides={"model.init_args.temprature": 2}),
     "run 'scratch_student' (seed 0): unknown key 'model.init_args.temprature': DistillationModule has no argument "
     "'temprature'; closest valid names: temperature."),
    (lambda s: s["runs"]["scratch_student"].update(overrides={"model.init_args.student": "resnet99"}),
     "run 'scratch_student' (seed 0): Unknown model name 'resnet99'. Known models: digits_cnn"),
])
def test_bad_study_fails_before_anything_is_written(tmp_path, capsys, change, message):
    path = write_study(tmp_path / "study.yaml")
    study = yaml.safe_load(path.read_text())
    change(study)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd-lightning: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_study_through_the_command(tmp_path):
    path = write_study(tmp_path / "study.yaml", seeds=None)
    result = subprocess.run([sys.executable, "-m", "kd_lightning", "study", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"kd-lightning: error: {path}: 'seeds' is required: a list of integers, e.g. seeds: [0, 1, 2]."
    assert not (tmp_path / "logs").exists()


STUDIES = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "runs" in (yaml.safe_load(p.read_text()) or {}))


def test_the_repository_has_its_studies():
    assert {p.name for p in STUDIES} >= {"study.yaml", "study_same_labels.yaml", "methods_study.yaml"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_the_repository_studies_are_valid(tmp_path, path):
    """Every study YAML under experiments/ names existing configs, and every run parses and builds (each run with
    the first seed; the other seeds differ only by the seed the planner writes into their arguments)."""
    from dataclasses import replace

    spec = load_study(path)
    configs = {c for r in spec.runs for c in (*spec.base, *r.configs)}
    if not (ROOT.parent / "shared" / "data").is_dir() and any("../shared/data" in c.read_text() for c in configs):
        pytest.skip("the study reads ../shared/data, which this checkout does not have beside it")
    assert len(plan(spec, tmp_path / "out")) >= len(spec.runs)  # every seed plans
    for run in plan(replace(spec, seeds=spec.seeds[:1]), tmp_path / "out"):
        run.config_hash = check_and_hash(run)  # parses and builds the run, writes nothing
    if any(run.tune is not None for run in spec.runs):  # every search's space names keys the run has
        from kd_lightning.commands.study.tuning import check_tunes

        check_tunes(replace(spec, seeds=spec.seeds[:1]), tmp_path / "out", trains_here=True)
    assert not (tmp_path / "out").exists()
