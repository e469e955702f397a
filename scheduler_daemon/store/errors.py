"""Every error the store raises, and which database errors are transient or need a new connection.

The classes say what went wrong with a world, a request or a chain (callers
catch them by name); the functions classify the driver's errors for retries.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import TYPE_CHECKING, cast

from sqlalchemy import exc as sa_exc

if TYPE_CHECKING:
    import psycopg


class DatabaseURLError(ValueError):
    """The database URL names an unsupported backend or is malformed."""


class SchemaNotMigratedError(RuntimeError):
    """The database schema is missing or behind this version of the daemon."""


def shown_ref(ref: int | str) -> str:
    """A reference as messages show it: a daemon id ``12``, an external id ``ext:abc``."""
    return str(ref) if isinstance(ref, int) else f"ext:{ref}"


class WorldNotFoundError(LookupError):
    """No world with that id (or external id)."""

    def __init__(self, world_id: int | str) -> None:
        self.world_id = world_id
        super().__init__(f"world {shown_ref(world_id)} does not exist")


class InvalidStoredWorldError(ValueError):
    """A world's stored row cannot be used (``meta`` not JSON, not an object, too large; a bad clock).

    The message names the world and the field; the world is isolated, nothing else is affected.
    """

    def __init__(self, world_id: int, problem: str) -> None:
        self.world_id = world_id
        self.problem = problem
        super().__init__(f"world {world_id}: {problem}")


class StaleWorldStateError(RuntimeError):
    """The world's state row changed under us (another writer, or a lost lease)."""


class LeaseLostError(StaleWorldStateError):
    """The world's lease is no longer ours (another instance claimed it); nothing was written."""

    def __init__(self, world_id: int, owner: str, epoch: int) -> None:
        self.world_id, self.owner, self.epoch = world_id, owner, epoch
        super().__init__(f"world {world_id}: lease (owner {owner!r}, epoch {epoch}) lost; tick rolled back")


class SessionNotFoundError(LookupError):
    """No session with that id (or external id) in that world."""

    def __init__(self, world_id: int, session_id: int | str) -> None:
        self.world_id, self.session_id = world_id, session_id
        super().__init__(f"world {world_id}: session {shown_ref(session_id)} does not exist")


class NpcNotFoundError(LookupError):
    """No NPC with that id (or external id) in that world."""

    def __init__(self, world_id: int, npc: int | str) -> None:
        self.world_id, self.npc = world_id, npc
        super().__init__(f"world {world_id}: npc {shown_ref(npc)} does not exist")


class UnknownNpcsError(LookupError):
    """A session names NPCs that do not exist in its world; ``refs`` lists them (ids and external ids)."""

    def __init__(self, world_id: int, refs: list[int | str]) -> None:
        self.world_id, self.refs = world_id, refs
        super().__init__(f"world {world_id}: no such NPCs: {', '.join(map(shown_ref, refs))}")


class EntityRowsError(ValueError):
    """Rows of a bulk write cannot be written as given; ``problems`` are (item index, field, message).

    Nothing of the write was committed.
    """

    def __init__(self, world_id: int, problems: list[tuple[int, str, str]]) -> None:
        self.world_id, self.problems = world_id, problems
        shown = "; ".join(f"[{i}].{field}: {msg}" for i, field, msg in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"world {world_id}: {shown}{more}")


class ExternalIdTakenError(ValueError):
    """The external id is already another entity's (worlds: among all worlds; NPCs, sessions: in the world)."""

    def __init__(self, kind: str, external_id: str, owner: int) -> None:
        self.kind, self.external_id, self.owner = kind, external_id, owner
        super().__init__(f"external id {external_id!r} is already {kind} {owner}'s")


class RequestNotFoundError(LookupError):
    """No generation request with that id."""

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        super().__init__(f"generation request {request_id} does not exist")


class RequestStateError(RuntimeError):
    """The request is not in a state that allows the transition (e.g. completing a finished one)."""

    def __init__(self, request_id: int, status: str, wanted: str) -> None:
        self.request_id, self.status, self.wanted = request_id, status, wanted
        super().__init__(f"generation request {request_id} is {status}; cannot mark it {wanted}")


class ChainNotFoundError(LookupError):
    """No interaction chain with that id."""

    def __init__(self, chain_id: int) -> None:
        self.chain_id = chain_id
        super().__init__(f"interaction chain {chain_id} does not exist")


# SQLSTATEs after which a connection can no longer write, so only a new
# connection can succeed: read-only transaction (a demoted primary, a hot
# standby, ``default_transaction_read_only``), admin shutdown, crash shutdown,
# cannot connect now (starting up, in recovery, shutting down), database
# dropped (a standby's recovery conflict). Class 08 (connection exception) too.
_RECONNECT_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03", "57P04"})
# A standby cancels or ends sessions "due to conflict with recovery" under
# SQLSTATE 40001, which alone means an ordinary serialization failure.
_RECOVERY_CONFLICT = "conflict with recovery"
# Also worth a retry on the same connection: serialization failure, deadlock, lock not available.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


def _psycopg_error(exc: BaseException | None) -> psycopg.Error | None:
    """``exc`` if psycopg raised it, else None.

    psycopg is the ``postgres`` extra, absent from SQLite-only installs: until a
    PostgreSQL engine has imported it, no error can come from it.
    """
    module = sys.modules.get("psycopg")
    if module is None or not isinstance(exc, module.Error):
        return None
    return cast("psycopg.Error", exc)


def is_unique_violation(exc: BaseException) -> bool:
    """True for a unique-index violation (two writers inserting the same external id at once)."""
    if not isinstance(exc, sa_exc.IntegrityError):
        return False
    orig = exc.orig
    if (pg_error := _psycopg_error(orig)) is not None:
        return pg_error.sqlstate == "23505"
    return isinstance(orig, sqlite3.IntegrityError) and "UNIQUE" in str(orig)


def needs_new_connection(exc: BaseException) -> bool:
    """True for a PostgreSQL error after which the connection that raised it cannot write.

    The engine treats these as disconnects (see
    :func:`~scheduler_daemon.store.database.create_engine`): the connection and
    every older one in the pool are dropped, so the next attempt reconnects,
    and reaches the new primary after a failover. ``exc`` is the driver's
    exception (``DBAPIError.orig``).
    """
    if (pg_error := _psycopg_error(exc)) is None:
        return False
    code = pg_error.sqlstate or ""
    return code.startswith("08") or code in _RECONNECT_SQLSTATES or (code == "40001" and _RECOVERY_CONFLICT in str(exc))


def is_transient(exc: BaseException) -> bool:
    """True for disconnects, refused connections, connections that cannot write, serialization failures, busy SQLite."""
    orig: BaseException | None = exc
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
    if (pg_error := _psycopg_error(orig)) is not None:
        import psycopg  # loaded already: it raised pg_error

        if isinstance(pg_error, psycopg.OperationalError):
            return True
        return (pg_error.sqlstate or "") in _TRANSIENT_SQLSTATES or needs_new_connection(pg_error)
    if isinstance(orig, sqlite3.OperationalError):
        return "locked" in str(orig) or "busy" in str(orig)
    return isinstance(orig, ConnectionError | OSError | TimeoutError)


def is_database_error(exc: BaseException) -> bool:
    """True for any error raised by the database layer (counted in ``worldsched_db_errors_total``)."""
    if isinstance(exc, sa_exc.SQLAlchemyError | sqlite3.Error):
        return True
    return _psycopg_error(exc) is not None or is_transient(exc)


def error_class(exc: BaseException) -> str:
    """The driver's error class under SQLAlchemy's wrapper (``ReadOnlySqlTransaction``, not ``InternalError``)."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else None
    return type(orig if orig is not None else exc).__name__
