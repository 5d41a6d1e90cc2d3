"""The classic three-run study on scikit-learn's bundled digits (1,797 real 8x8 images; no download).

``kd-lightning quickstart`` is ``kd-lightning study experiments/digits/study.yaml`` on one CPU thread: for each
seed (each with its own train/val/test split) a teacher, a student distilled from it, and the same student
trained from scratch with the same data, optimizer and number of optimizer steps; then test accuracy (mean ±
std over seeds, at the best-validation and at the last checkpoint), parameters, size on disk and CPU latency
per image. Two blocks:

* **all labels** -- every run sees every training label;
* **10% labels** -- the students see the same 10% of the training labels (stratified, seeded). The scratch
  student trains on those labelled rows alone; the KD student also sees the other 90% of the training images as
  unlabelled rows, learning the teacher's predictions there (a transfer set). The teacher is trained on all
  labels (``--teacher-labels all``, the default); ``--teacher-labels same`` runs the 10% block with a teacher
  trained on the same 10% only (experiments/digits/study_same_labels.yaml).

The runs are the digits configs (experiments/digits/*.yaml) with the overrides in the study file. A quickstart
started again skips the runs it has already finished.

    kd-lightning quickstart            # or: python -m kd_lightning.quickstart
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import argparse

from kd_lightning.commands.errors import OneLineArgumentParser
from kd_lightning.commands.study import add_study_options, run_from_options

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
STUDIES = {"all": EXPERIMENTS / "digits" / "study.yaml", "same": EXPERIMENTS / "digits" / "study_same_labels.yaml"}
DEFAULT_OUT = {"all": "logs/quickstart", "same": "logs/quickstart_same_labels"}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = OneLineArgumentParser(prog="kd-lightning quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-labels", choices=list(STUDIES), default="all",
                        help="teacher trained on all labels (default), or on the 10%% block's labelled rows only")
    # one thread: these networks are tiny, extra threads only add synchronisation (and stall on a busy CPU)
    add_study_options(parser, default_out=f"{DEFAULT_OUT['all']}, or {DEFAULT_OUT['same']} with --teacher-labels same",
                      default_threads=1)
    options = parser.parse_args(argv)
    return run_from_options(STUDIES[options.teacher_labels], options,
                            default_out=DEFAULT_OUT[options.teacher_labels])


if __name__ == "__main__":
    main()
