# scheduler-daemon developer commands. `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
VAR    := $(CURDIR)/var
# The embedded default for development: SQLite under ./var (env wins over the config file).
RUN_ENV := SCHEDULER_DATABASE__URL=sqlite+aiosqlite:///$(VAR)/scheduler.db

.PHONY: help venv dev run demo test lint fmt lock lock-upgrade bench bench-quick bench-memory bench-npc soak clean

help:
	@echo "make run         set up .venv, migrate ./var/scheduler.db, seed the demo, run the daemon"
	@echo "make test        set up .venv with dev dependencies and run the whole test suite"
	@echo "make lint        ruff + mypy, and uv.lock in sync with pyproject.toml"
	@echo "make lock        update uv.lock after editing dependencies in pyproject.toml (keeps other pins)"
	@echo "make lock-upgrade move every pin in uv.lock to the newest release allowed by pyproject.toml"
	@echo "make bench       benchmark suite vs APScheduler, a bare heap loop, naive ORM, raw SQL (minutes)"
	@echo "make bench-quick the same at smaller sizes, under 6 minutes: bench/results/quick.{json,md,png}"
	@echo "make bench-memory 10 minutes at sustained load on PostgreSQL, checks resident memory growth"
	@echo "make bench-npc   NPC benchmarks: decide() decisions/s, per-tick selection on PostgreSQL"
	@echo "make soak        fault suite at full strength + 30 min soak (needs SCHEDULER_TEST_POSTGRES_URL)"
	@echo "make image       build the container image from the Dockerfile (needs a Docker engine)"
	@echo "make clean       remove .venv and ./var"

# uv installs from uv.lock (one lock for every extra and group: the exact versions CI tested);
# it is bootstrapped into the venv with pip, pinned, so a fresh clone needs only Python and PyPI.
# The Dockerfile's ARG UV_VERSION is the same release (tests/system/test_container_files.py).
UV_VERSION := 0.13.9
UV         := $(BIN)/uv
# uv syncs this venv (not one of its own) and never downloads a Python.
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON_DOWNLOADS := never
# TLS trust from the system's CA store, as pip and curl have it (uv's own bundle lacks a CA
# installed only there, e.g. a proxy's: then every download failed unless SSL_CERT_FILE was set).
export UV_SYSTEM_CERTS := 1
# Installed packages compiled to bytecode once: where PYTHONDONTWRITEBYTECODE is set, every
# interpreter (each daemon and CLI start) otherwise compiled SQLAlchemy and the rest again (~1 s).
export UV_COMPILE_BYTECODE := 1
# --locked: refuse a uv.lock out of date with pyproject.toml; --inexact: keep uv and pip in the venv.
SYNC := $(UV) sync --locked --inexact --quiet

$(UV):
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

# Stamp files: reinstall only when pyproject.toml or uv.lock changes.
# make run: the default install (SQLite), as `pip install scheduler-daemon` gives.
$(VENV)/.installed: $(UV) pyproject.toml uv.lock
	$(SYNC) --no-default-groups
	@touch $@

# Tests: every extra (postgres, arq) and the dev group (which includes bench).
$(VENV)/.installed-dev: $(UV) pyproject.toml uv.lock
	$(SYNC) --all-extras --group dev
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: $(UV) pyproject.toml uv.lock
	$(SYNC) --extra postgres --no-default-groups --group bench
	@touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	@mkdir -p $(VAR)
	$(RUN_ENV) $(BIN)/scheduler-daemon --config config.example.toml db upgrade
	$(RUN_ENV) $(BIN)/scheduler-daemon --config config.example.toml demo
	$(RUN_ENV) exec $(BIN)/scheduler-daemon --config config.example.toml run

# Everything but the fault suite on two workers (pytest-xdist; TEST_WORKERS=0: one process), then
# the fault suite alone: its tests drive daemons at load and bound the pauses they see, which
# another worker's tests on the same cores would distort. Both run even if the first fails. The
# suite starts hundreds of interpreters: the repository's own modules are cached as bytecode
# (gitignored __pycache__) even where PYTHONDONTWRITEBYTECODE is set.
TEST_WORKERS ?= 2
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest
test: $(VENV)/.installed-dev
	@$(PYTEST) -n $(TEST_WORKERS) --ignore=tests/faults --durations=10; parallel=$$?; \
	$(PYTEST) tests/faults --durations=5; faults=$$?; \
	test $$parallel -eq 0 -a $$faults -eq 0

# The fault suite at full strength (20 SIGKILLs per backend, 30 s outage, 40 killed
# connection rounds, 60 kills inside grouped writes) plus a 30-minute soak sampling
# RSS and open fds. Not in CI.
# Figures of every fault test are appended to var/faults-report.jsonl.
soak: $(VENV)/.installed-dev
	@mkdir -p $(VAR)
	SCHEDULER_FAULTS_PROFILE=soak SCHEDULER_FAULTS_REPORT=$(VAR)/faults-report.jsonl $(BIN)/pytest tests/faults

lint: $(VENV)/.installed-dev
	$(UV) lock --check
	$(BIN)/ruff check scheduler_daemon tests bench examples
	$(BIN)/ruff format --check scheduler_daemon tests bench examples
	$(BIN)/mypy

# After editing dependencies in pyproject.toml: resolve what changed, keep every other pin.
lock: $(UV)
	$(UV) lock

# The upgrade path: newest releases within pyproject.toml's bounds; then `make test` and commit uv.lock.
lock-upgrade: $(UV)
	$(UV) lock --upgrade

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
