"""``kd-lightning tune``: hyperparameter search on validation with Optuna. ``space.py`` reads the ``tune:`` block
(a leaf module: the study's spec reads its runs' blocks with it), ``spec.py`` the job every worker runs,
``search.py`` the storage, the workers and a trial, ``report.py`` the tables, ``best.yaml`` and the figures,
``command.py`` the command and its launchers (its docstring has the tune file's format).
"""
