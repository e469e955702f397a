# scheduler-daemon developer commands. `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
VAR    := $(CURDIR)/var
# The embedded default for development: SQLite under ./var (env wins over the config file).
RUN_ENV := SCHEDULER_DATABASE__URL=sqlite+aiosqlite:///$(VAR)/scheduler.db

.PHONY: help venv dev run demo test lint fmt bench bench-quick bench-memory bench-npc soak clean

help:
	@echo "make run         set up .venv, migrate ./var/scheduler.db, seed the demo, run the daemon"
	@echo "make test        set up .venv with dev dependencies and run the whole test suite"
	@echo "make lint        ruff + mypy"
	@echo "make bench       benchmark suite vs APScheduler, a bare heap loop, naive ORM, raw SQL (minutes)"
	@echo "make bench-quick the same at smaller sizes, under 6 minutes: bench/results/quick.{json,md,png}"
	@echo "make bench-memory 10 minutes at sustained load on PostgreSQL, checks resident memory growth"
	@echo "make bench-npc   NPC benchmarks: decide() decisions/s, per-tick selection on PostgreSQL"
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

$(VENV)/.installed-bench: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $@ $(VENV)/.installed $(VENV)/.installed-dev

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
# connection rounds, 60 kills inside grouped writes) plus a 30-minute soak sampling
# RSS and open fds. Not in CI.
# Figures of every fault test are appended to var/faults-report.jsonl.
soak: $(VENV)/.installed-dev
	@mkdir -p $(VAR)
	SCHEDULER_FAULTS_PROFILE=soak SCHEDULER_FAULTS_REPORT=$(VAR)/faults-report.jsonl $(BIN)/pytest tests/faults

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check scheduler_daemon tests bench examples
	$(BIN)/ruff format --check scheduler_daemon tests bench examples
	$(BIN)/mypy

fmt: $(VENV)/.installed-dev
	$(BIN)/ruff format scheduler_daemon tests bench examples
	$(BIN)/ruff check --fix scheduler_daemon tests bench

# Benchmarks (docs/performance.md). PostgreSQL from SCHEDULER_TEST_POSTGRES_URL.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python -m bench --quick

# Ten minutes at the sustained load on PostgreSQL; fails if resident memory grows 5 % or more.
bench-memory: $(VENV)/.installed-bench
	$(BIN)/python -m bench.soak

# PostgreSQL part: SCHEDULER_BENCH_POSTGRES_URL (or SCHEDULER_TEST_POSTGRES_URL), a server to create a scratch DB on.
bench-npc: $(VENV)/.installed-dev
	$(BIN)/python bench/npc_bench.py

clean:
	rm -rf $(VENV) $(VAR) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# The container image (Dockerfile; docs/operations.md, "Containers"). Needs a running Docker engine.
IMAGE ?= scheduler-daemon:dev
.PHONY: image
image:
	@command -v docker >/dev/null || { echo "make image: docker is not installed" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make image: no Docker engine is reachable (docker info failed; start dockerd or set DOCKER_HOST)" >&2; exit 1; }
	docker build -t $(IMAGE) .
