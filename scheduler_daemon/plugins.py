"""User code named in the settings as ``"package.module:callable"``: the decide function and the generation sink.

A sink that needs the daemon's settings or holds connections (the ARQ sink)
names an object with two optional methods: ``with_settings(settings)``
returns the sink this daemon uses (called once at start, so each daemon gets
its own; it must not connect yet), and that sink's ``aclose()`` is awaited
when the daemon stops (:meth:`Plugins.aclose`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Final, Protocol, cast, runtime_checkable

from scheduler_daemon.generation import GenerationSink, leave_enqueued
from scheduler_daemon.logs import get_logger
from scheduler_daemon.settings import DEFAULT_BEHAVIOR, DEFAULT_GENERATION_SINK, Settings, SettingsError
from scheduler_daemon.simulation.behavior import DecideFn, decide

log = get_logger("scheduler_daemon.plugins")

#: Sink specs of earlier versions and what they name now. Our old example
#: config named the default sink's old module, and copies of it must keep working.
RENAMED_SINKS: Final = {"scheduler_daemon.jobs:leave_enqueued": DEFAULT_GENERATION_SINK}


@runtime_checkable
class SettingsAwareSink(Protocol):
    """A sink spec's target that builds the daemon's sink from its settings."""

    def with_settings(self, settings: Settings) -> GenerationSink:
        """The sink to use with ``settings`` (no I/O: also called to validate a reload)."""
        ...


@runtime_checkable
class ClosableSink(Protocol):
    """A sink holding connections, released when the daemon stops."""

    async def aclose(self) -> None:
        """Release the sink's connections; the sink is not called again."""
        ...


def load_callable(spec: str, what: str) -> object:
    """Resolve ``"package.module:callable"`` (the attribute may be dotted) to a callable.

    Raises :class:`ValueError` starting with ``what`` and naming ``spec`` when
    it is malformed, the module cannot be imported, the attribute is missing
    or it is not callable. The signature cannot be checked cheaply; a wrong
    one fails on first use.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not all(p.isidentifier() for p in [*module_name.split("."), *attr_path.split(".")]):
        raise ValueError(f"{what} {spec!r}: expected 'package.module:callable'")
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        # "The named module does not exist" and "one of its own imports is
        # missing" need different fixes.
        if missing == module_name or module_name.startswith(missing + "."):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} not found") from exc
        raise ValueError(f"{what} {spec!r}: importing failed: {exc}") from exc
    except Exception as exc:  # any error raised while executing the module
        raise ValueError(f"{what} {spec!r}: importing failed: {exc}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise ValueError(f"{what} {spec!r}: {attr_path!r} is not callable")
    return target


def load_decide_fn(spec: str = DEFAULT_BEHAVIOR) -> DecideFn:
    """The decide function ``spec`` names (:func:`load_callable`'s errors)."""
    return cast(DecideFn, load_callable(spec, "decide function"))


def load_sink(spec: str) -> GenerationSink:
    """The generation sink ``spec`` names (:func:`load_callable`'s errors).

    A spec naming the sink under its old module (see :data:`RENAMED_SINKS`)
    loads the renamed one, with a deprecation warning.
    """
    renamed = RENAMED_SINKS.get(spec)
    if renamed is not None:
        log.warning(
            "sink_module_renamed",
            deprecated=spec,
            replacement=renamed,
        )
        spec = renamed
    return cast(GenerationSink, load_callable(spec, "generation sink"))


@dataclass(frozen=True)
class Plugins:
    """The user code a deployment names in its settings."""

    decide_fn: DecideFn = decide
    sink: GenerationSink = leave_enqueued

    @classmethod
    def from_settings(cls, settings: Settings) -> Plugins:
        """Import ``scheduler.behavior`` and ``generation.sink`` (bound to ``settings`` if it takes them).

        :class:`SettingsError` names the field.
        """
        try:
            decide_fn = load_decide_fn(settings.scheduler.behavior)
        except ValueError as exc:
            raise SettingsError(f"scheduler.behavior: {exc}") from None
        try:
            sink = load_sink(settings.generation.sink)
            if isinstance(sink, SettingsAwareSink):
                sink = sink.with_settings(settings)
        except ValueError as exc:
            raise SettingsError(f"generation.sink: {exc}") from None
        return cls(decide_fn, sink)

    async def aclose(self) -> None:
        """Release what the sink holds (its connections), if it holds anything."""
        if isinstance(self.sink, ClosableSink):
            await self.sink.aclose()
