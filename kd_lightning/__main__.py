"""``python -m kd_lightning ...`` is the ``kd-lightning`` command."""

from kd_lightning.commands import main

if __name__ == "__main__":
    main()
