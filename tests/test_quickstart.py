"""The embedded quickstart: three runs per seed and labelled fraction, a table, CSV and markdown."""

import csv

from kd_lightning.quickstart import main


def test_quickstart_writes_both_blocks(tmp_path, capsys):
    rows = main(["--seeds", "0", "1", "--epochs", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert [(r["block"], r["run"]) for r in rows] == [
        ("all labels", "teacher (all labels)"), ("all labels", "KD student"), ("all labels", "scratch student"),
        ("10% labels", "teacher (all labels)"), ("10% labels", "KD student"), ("10% labels", "scratch student"),
    ]
    assert all(r["seeds"] == 2 and 0 <= r["test_acc_mean"] <= 100 for r in rows)
    teacher, kd, scratch = rows[:3]
    assert teacher["params"] > 10 * kd["params"] and kd["params"] == scratch["params"]
    assert teacher["size_kb"] > kd["size_kb"] > 0 and kd["latency_us"] > 0
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    table = (tmp_path / "results.md").read_text()
    assert "| 10% labels | KD student |" in table and "±" in table
    assert "| all labels | scratch student |" in out
    assert (tmp_path / "all_labels" / "kd_student" / "seed_0").is_dir()  # TensorBoard runs


def test_quickstart_is_reproducible(tmp_path):
    first = main(["--seeds", "3", "--epochs", "1", "--blocks", "10% labels", "--out", str(tmp_path / "a")])
    second = main(["--seeds", "3", "--epochs", "1", "--blocks", "10% labels", "--out", str(tmp_path / "b")])
    assert [r["test_acc_mean"] for r in first] == [r["test_acc_mean"] for r in second]
