"""``ChangeNotifications``: LISTEN for the world changes the triggers of migration 0011 notify (PostgreSQL).

A connection of its own, outside the pool (a ``LISTEN`` lasts as long as its
session, and a pooled connection is lent to ticks), in autocommit (a
notification is delivered between transactions, never inside one). It is
named ``scheduler-daemon changes`` in ``pg_stat_activity``. psycopg (the
``postgres`` extra) is imported when listening starts: :data:`CHANNEL` is
read on SQLite-only installs too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    import psycopg

#: The channel the triggers notify; the payload is the world id as text.
CHANNEL: Final = "scheduler_daemon_changes"
#: ``application_name`` of the listening connection.
APPLICATION_NAME: Final = "scheduler-daemon changes"


class ChangeNotifications:
    """One listening connection: :meth:`listen` (again after a failure), :meth:`receive`, :meth:`close`."""

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        parsed = make_url(url)
        if not parsed.drivername.startswith("postgresql"):
            raise ValueError("change notifications need PostgreSQL (LISTEN/NOTIFY)")
        self._conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self._connect_timeout = max(1, round(connect_timeout))
        self._conn: psycopg.AsyncConnection[object] | None = None

    async def listen(self) -> None:
        """Open a new connection and ``LISTEN`` on :data:`CHANNEL` (closing any previous one); raises its error."""
        import psycopg
        from psycopg import sql
        from psycopg.conninfo import make_conninfo

        await self.close()
        conn = await psycopg.AsyncConnection.connect(
            make_conninfo(
                self._conninfo,
                connect_timeout=self._connect_timeout,
                application_name=APPLICATION_NAME,
                # A server that vanished without closing (a network partition) is noticed within a minute.
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
            ),
            autocommit=True,
        )
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def receive(self, *, wait: float, window: float, limit: int) -> list[str]:
        """The payloads notified: waits up to ``wait`` seconds for one, then collects more for ``window``.

        Returns about ``limit`` payloads at most (one read from the socket may
        bring a few more; the rest stay queued for the next call), or none
        after a quiet ``wait``; the connection is then checked with a query,
        so a connection lost silently raises here rather than staying quiet
        forever. Raises the connection's error when it is lost.
        """
        conn = self._conn
        if conn is None:
            import psycopg

            raise psycopg.OperationalError("not listening")
        payloads = [n.payload async for n in conn.notifies(timeout=wait, stop_after=1)]
        if not payloads:
            # A notification that arrives during this query waits for the next notifies() (psycopg >= 3.2.4).
            await conn.execute("SELECT 1")
            return payloads
        if limit > 1:
            payloads += [n.payload async for n in conn.notifies(timeout=window, stop_after=limit - 1)]
        return payloads

    async def close(self) -> None:
        """Close the connection (its ``LISTEN`` ends with it); nothing to do if none is open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
