"""``python -m kd_lightning.commands.study.worker [--worker | <job.json>]``: the entry point of a job process
(:func:`kd_lightning.commands.study.jobs.main`). A module of its own, which the package does not import, so that
``-m`` does not run a module that the package has already imported (runpy warns, and its state would exist twice)."""

from kd_lightning.commands.study.jobs import main

if __name__ == "__main__":
    main()
