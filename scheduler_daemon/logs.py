"""Logging: structlog events carried by the standard library's ``logging``.

The package's loggers (:func:`get_logger`) hand every event to the stdlib
logger of their name, so an application that embeds the scheduler decides
levels and handlers with its own logging config (none: Python's default,
warnings and errors only). Only the CLI and the daemon call
:func:`configure_logging`: one handler on the root logger that renders
structlog events and plain stdlib records alike (console on a TTY, JSON
lines otherwise), with the logger's name on every line and, when stderr is
the systemd journal, a ``<N>`` syslog priority prefix. Reconfigurable at
runtime (SIGHUP changes level and format).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO, cast

import structlog
from structlog.stdlib import ProcessorFormatter

_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}

#: The package's own loggers (``scheduler_daemon.*``), structlog or stdlib: at the configured level.
PACKAGE_LOGGER = "scheduler_daemon"

#: Third-party loggers whose DEBUG/INFO lines are noise even when we debug.
_NOISY = ("sqlalchemy", "aiosqlite", "asyncio", "uvicorn", "uvicorn.access", "alembic", "arq", "httpx")

#: The stdlib logger method of a level (a level between two: the lower one's).
_METHODS = (
    (logging.CRITICAL, "critical"),
    (logging.ERROR, "error"),
    (logging.WARNING, "warning"),
    (logging.INFO, "info"),
)

#: Syslog priorities (sd-daemon(3) prefixes), highest stdlib level first.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class ProjectLogger(structlog.BoundLoggerBase):
    """A structlog bound logger over a stdlib ``logging.Logger``.

    The stdlib logger's level decides, before any processor runs, so a
    disabled DEBUG line costs one cached level check. With structlog
    configured (the daemon, or an application's own setup) its processors
    run and their result goes to the stdlib logger; unconfigured, the line
    is a plain stdlib record.
    """

    _logger: logging.Logger

    def is_enabled_for(self, level: int) -> bool:
        """Whether a line at ``level`` would be emitted."""
        return self._logger.isEnabledFor(level)

    def _emit(self, level: int, method: str, event: str, kw: dict[str, Any]) -> Any:
        if not self._logger.isEnabledFor(level):
            return None
        if not structlog.is_configured():
            # Embedded in an application that configured only the stdlib: a
            # plain record, "event key=value ...", for its own handlers.
            exc_info = kw.pop("exc_info", None)
            fields = {**structlog.contextvars.get_contextvars(), **self._context, **kw}
            message = " ".join([event, *(f"{key}={value!r}" for key, value in fields.items())])
            self._logger.log(level, message, exc_info=exc_info)
            return None
        return self._proxy_to_logger(method, event, **kw)

    def debug(self, event: str, **kw: Any) -> Any:
        """Log ``event`` at DEBUG."""
        return self._emit(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> Any:
        """Log ``event`` at INFO."""
        return self._emit(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> Any:
        """Log ``event`` at WARNING."""
        return self._emit(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> Any:
        """Log ``event`` at ERROR."""
        return self._emit(logging.ERROR, "error", event, kw)

    def critical(self, event: str, **kw: Any) -> Any:
        """Log ``event`` at CRITICAL."""
        return self._emit(logging.CRITICAL, "critical", event, kw)

    def exception(self, event: str, **kw: Any) -> Any:
        """Log ``event`` at ERROR with the exception being handled."""
        kw.setdefault("exc_info", True)
        return self._emit(logging.ERROR, "error", event, kw)

    def log(self, level: int, event: str, **kw: Any) -> Any:
        """Log ``event`` at the stdlib ``level``."""
        method = next((name for threshold, name in _METHODS if level >= threshold), "debug")
        return self._emit(level, method, event, kw)


def get_logger(name: str) -> ProjectLogger:
    """The package's logger ``name``: structlog's API, stdlib's levels and handlers.

    Never configures anything: until an application (or :func:`configure_logging`)
    does, Python's defaults apply and only warnings and errors reach stderr.
    """
    return cast(ProjectLogger, structlog.wrap_logger(logging.getLogger(name), wrapper_class=ProjectLogger))


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0 emerg .. 7 debug) of a stdlib level."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def stream_is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to the journal (systemd's ``JOURNAL_STREAM``, ``device:inode``)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (StringIO) or closed
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _JournalFormatter(ProcessorFormatter):
    """Prefixes each line with ``<N>`` so journald files it at that priority (``SyslogLevelPrefix=``)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def _use_console(fmt: str, stream: TextIO) -> bool:
    if fmt == "console":
        return True
    if fmt == "json":
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """(Re)configure logging for the whole process: for the CLI and the daemon, never on import."""
    stream = stream or sys.stderr
    numeric = _LEVELS[level.upper()]
    console = _use_console(fmt, stream)
    stamped: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[Any]
    # Tracebacks without local variables: structlog's defaults render every
    # frame's locals, which puts whole batches of worlds (and whatever else a
    # frame holds) into the log, and rendering them took most of the time of a
    # tick that failed.
    if console:
        render = [
            structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
        ]
    else:
        render = [
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamped,
            structlog.processors.StackInfoRenderer(),
            ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=ProjectLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: a reload must change the level of loggers already created.
        cache_logger_on_first_use=False,
    )
    formatter_class = _JournalFormatter if stream_is_journal(stream) else ProcessorFormatter
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        formatter_class(
            processors=[structlog.stdlib.add_logger_name, ProcessorFormatter.remove_processors_meta, *render],
            # Plain stdlib records: their extra= fields become the line's fields.
            foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.ExtraAdder(), *stamped],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The configured level for every logger (a plug-in's own too), but the libraries whose
    # INFO and DEBUG lines are noise here log WARNING and up (or the level, when higher).
    root.setLevel(numeric)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    logging.getLogger(PACKAGE_LOGGER).setLevel(numeric)
