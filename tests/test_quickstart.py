"""The quickstart: the digits study (experiments/digits/study.yaml) with its table, CSV, JSON and figure."""

import csv

from kd_lightning.commands.quickstart import main

SHORT = ["--set", "trainer.max_steps=32"]  # 2 passes over the training set instead of 30, in every run


def test_quickstart_writes_both_blocks(tmp_path, capsys):
    rows = main(["--seeds", "0", "1", *SHORT, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert [(r["group"], r["label"]) for r in rows] == [
        ("all labels", "teacher (all labels)"), ("all labels", "KD student"), ("all labels", "scratch student"),
        ("10% labels", "KD student"), ("10% labels", "scratch student"),
    ]
    assert all(r["seeds"] == 2 and 0 <= r["best_ckpt_test_acc_mean"] <= 100 for r in rows)
    teacher, kd, scratch = rows[:3]
    assert teacher["params"] > 10 * kd["params"] and kd["params"] == scratch["params"]
    assert teacher["size_kb"] > kd["size_kb"] > 0 and kd["latency_us"] > 0
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    table = (tmp_path / "results.md").read_text()
    assert "| 10% labels | KD student | 2 |" in table and "±" in table
    assert "| all labels | scratch student | 2 |" in out
    assert out.count("seed 1 kd_student_10pct: test acc") == 1
    run = tmp_path / "kd_student_10pct" / "seed_0"
    assert (run / "checkpoints" / "best.ckpt").is_file() and any(run.glob("events.out.tfevents.*"))
    assert (tmp_path / "results.png").is_file() and (tmp_path / "results.json").is_file()


def test_quickstart_same_labels_teacher_is_reproducible(tmp_path):
    args = ["--teacher-labels", "same", "--seeds", "3", "--set", "trainer.max_steps=16"]
    first = main([*args, "--out", str(tmp_path / "a")])
    second = main([*args, "--out", str(tmp_path / "b")])
    assert [r["label"] for r in first] == ["teacher (same labels)", "KD student", "scratch student"]
    accuracies = [(r["best_ckpt_test_acc_mean"], r["last_ckpt_test_acc_mean"]) for r in first]
    assert accuracies == [(r["best_ckpt_test_acc_mean"], r["last_ckpt_test_acc_mean"]) for r in second]
