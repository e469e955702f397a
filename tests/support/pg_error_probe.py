"""``python tests/support/pg_error_probe.py URL``: PostgreSQL errors as a fresh daemon process classifies them.

psycopg (the ``postgres`` extra) is imported lazily, so the store's error
classification is loaded before psycopg, as in the daemon. Two faults, each
behind :func:`~scheduler_daemon.retry.retry_transient` as the runner uses it:
a session killed (``pg_terminate_backend``) under a statement run on the driver's
connection (the due-NPC selection's path), and a pooled session left read-only
under a write through the engine. Prints one JSON object: what each error was
classified as and what the retry returned.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import sqlalchemy as sa

from scheduler_daemon.retry import retry_transient
from scheduler_daemon.store.errors import is_database_error, is_transient, needs_new_connection


def classified(exc: BaseException) -> dict[str, Any]:
    """What the runner's retries and metrics see of ``exc``."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    return {
        "class": type(orig).__name__,
        "sqlstate": getattr(orig, "sqlstate", None),
        "transient": is_transient(exc),
        "needs_new_connection": needs_new_connection(orig),
        "database_error": is_database_error(exc),
    }


async def probe(url: str) -> dict[str, Any]:
    report: dict[str, Any] = {"psycopg_loaded_with_the_classification": "psycopg" in sys.modules}
    from scheduler_daemon.store.base import driver_execute
    from scheduler_daemon.store.repository import Store

    store = Store.from_url(url, pool_size=1, max_overflow=0)
    import psycopg

    admin = await psycopg.AsyncConnection.connect(
        sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True
    )
    try:
        await store.upgrade()
        pids: list[int] = []
        killed: list[dict[str, Any]] = []

        async def killed_once() -> int:
            async with store.engine.connect() as conn:
                pids.append((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
                if len(pids) == 1:
                    # Waits until the backend has gone.
                    await admin.execute("SELECT pg_terminate_backend(%s, 10000)", [pids[0]])
                try:
                    cursor = await driver_execute(conn, "SELECT 1", [])
                except Exception as exc:
                    killed.append(classified(exc))
                    raise
                return int((await cursor.fetchone())[0])

        report["killed"] = {
            "result": await retry_transient("killed session", killed_once, max_attempts=2, multiplier=0.01),
            "errors": killed,
            "new_session": len(pids) == 2 and pids[0] != pids[1],
        }

        async with store.engine.connect() as conn:
            await conn.execute(sa.text("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"))
            await conn.commit()
        refused: list[dict[str, Any]] = []

        async def write() -> int:
            try:
                return await store.create_world("probe")
            except Exception as exc:
                refused.append(classified(exc) | {"invalidated": getattr(exc, "connection_invalidated", None)})
                raise

        report["read_only"] = {
            "result": await retry_transient("read-only session", write, max_attempts=2, multiplier=0.01),
            "errors": refused,
        }
    finally:
        await admin.close()
        await store.dispose()
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(sys.argv[1]))))
