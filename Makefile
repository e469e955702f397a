# scheduler-daemon developer commands. `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
VAR    := $(CURDIR)/var
# The embedded default for development: SQLite under ./var (env wins over the config file).
RUN_ENV := SCHEDULER_DATABASE__URL=sqlite+aiosqlite:///$(VAR)/scheduler.db

.PHONY: help venv dev run demo test test-fast lint fmt bench bench-quick soak clean

help:
	@echo "make run         set up .venv, migrate ./var/scheduler.db, seed the demo, run the daemon"
	@echo "make test        set up .venv with dev dependencies and run the whole test suite"
	@echo "make lint        ruff + mypy"
	@echo "make soak        fault suite at full strength + 30 min soak (needs SCHEDULER_TEST_POSTGRES_URL)"
	@echo "make clean       remove .venv and ./var"

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	@mkdir -p $(VAR)
	$(RUN_ENV) $(BIN)/scheduler-daemon --config config.example.toml db upgrade
	$(RUN_ENV) $(BIN)/scheduler-daemon --config config.example.toml demo
	$(RUN_ENV) exec $(BIN)/scheduler-daemon --config config.example.toml run

test: $(VENV)/.installed-dev
	$(BIN)/pytest

# The fault suite at full strength (20 SIGKILLs per backend, 30 s outage, 40 killed
# connection rounds) plus a 30-minute soak sampling RSS and open fds. Not in CI.
# Figures of every fault test are appended to var/faults-report.jsonl.
soak: $(VENV)/.installed-dev
	@mkdir -p $(VAR)
	SCHEDULER_FAULTS_PROFILE=soak SCHEDULER_FAULTS_REPORT=$(VAR)/faults-report.jsonl $(BIN)/pytest tests/faults

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check scheduler_daemon tests
	$(BIN)/ruff format --check scheduler_daemon tests
	$(BIN)/mypy

fmt: $(VENV)/.installed-dev
	$(BIN)/ruff format scheduler_daemon tests
	$(BIN)/ruff check --fix scheduler_daemon tests

clean:
	rm -rf $(VENV) $(VAR) .pytest_cache .mypy_cache .ruff_cache .hypothesis
