# scheduler-daemon container image: `make image`, or `docker build -t scheduler-daemon .`
# Run it with a config file and the admin token mounted (never baked in):
#   docker run -v ./config.toml:/etc/scheduler-daemon/config.toml:ro \
#              -v ./admin-token:/run/secrets/admin-token:ro -p 127.0.0.1:9464:9464 scheduler-daemon
# compose.yaml runs it with PostgreSQL. See docs/operations.md, "Containers".

# --- builder: the project and its dependencies in a venv ---------------------
FROM python:3.11-slim-bookworm AS builder
# The versions uv.lock pins (those CI tested), installed by the uv release the Makefile pins.
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/opt/scheduler-daemon
RUN pip install "uv==${UV_VERSION}"
WORKDIR /src
# Only what the package build needs (.dockerignore keeps the rest out).
COPY pyproject.toml uv.lock README.md LICENSE ./
COPY scheduler_daemon ./scheduler_daemon
# --locked: refuse a uv.lock out of date with pyproject.toml; the postgres extra, no dev tools;
# --no-editable: the venv holds the package itself, /src stays in this stage.
RUN uv sync --locked --no-default-groups --extra postgres --no-editable --compile-bytecode

# --- final: the venv on a clean base, run by an unprivileged user -------------
# Same base as the builder: the venv's interpreter path must exist here too.
FROM python:3.11-slim-bookworm
# A fixed UID/GID, so a mounted token file can be given to it (chown 10001).
RUN groupadd --system --gid 10001 scheduler \
 && useradd --system --uid 10001 --gid scheduler --no-create-home --home-dir /var/lib/scheduler-daemon \
      --shell /usr/sbin/nologin scheduler \
 && install -d -o scheduler -g scheduler -m 0700 /var/lib/scheduler-daemon
COPY --from=builder /opt/scheduler-daemon /opt/scheduler-daemon
ENV PATH=/opt/scheduler-daemon/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The default database.url is SQLite in here; with PostgreSQL nothing is written.
VOLUME /var/lib/scheduler-daemon
# Numeric, so an orchestrator can verify it is not root (runAsNonRoot).
USER 10001:10001
WORKDIR /var/lib/scheduler-daemon

# [http] port (its default); the config must set bind = "0.0.0.0" (and so a token) to be reachable.
EXPOSE 9464
# The daemon finishes its tick, flushes and releases leases on SIGTERM: give it
# time (docker stop -t 35, compose stop_grace_period).
STOPSIGNAL SIGTERM
# Liveness from inside the container (no curl in the slim image): /healthz
# answers 200 while the event loop turns; urlopen raises on anything else.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]

ENTRYPOINT ["scheduler-daemon", "--config", "/etc/scheduler-daemon/config.toml"]
# Any other command works the same way, e.g. `docker run ... scheduler-daemon db upgrade`.
CMD ["run"]
