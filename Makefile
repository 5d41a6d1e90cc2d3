# Fresh machine to results in one command each. Needs python3 (3.10+) and pip access to PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

quickstart: setup  ## teacher / KD student / scratch student on the bundled digits, printed as a table
	$(BIN)/kd-lightning quickstart

test: setup  ## the whole test suite (slow tests included), one worker per core (at most 4), the 15 slowest listed
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --durations 15

clean:
	rm -rf $(VENV) logs/quickstart logs/quickstart_same_labels .pytest_cache
