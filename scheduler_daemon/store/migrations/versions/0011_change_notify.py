"""Changes the game writes with SQL notify the daemon (PostgreSQL ``LISTEN/NOTIFY``).

Triggers ``pg_notify('scheduler_daemon_changes', <world id>)`` when a row
that decides what a world runs or how its NPCs are tiered changes: a world
(inserted, deleted, its ``meta`` or ``config_version`` changed), a session
(inserted, deleted, its world, user, location, NPC lists or ``active``
changed), an NPC (inserted, deleted, its world, name, home, routine or
external id changed). The daemon LISTENs and applies the change before the
world's next tick instead of at its next discovery poll.

The columns the daemon's own ticks and tier assignments write (an NPC's
location, activity, needs, tier, next decision; ``world_states``) fire
nothing: the daemon would otherwise notify itself on every tick. A row
trigger is enough: PostgreSQL delivers identical notifications of one
transaction once. SQLite has no ``NOTIFY``: nothing is installed there (the
discovery poll picks changes up).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# The channel is scheduler_daemon.store.notifications.CHANNEL (kept literal:
# a migration must not change when the package does).
_FUNCTIONS = {
    # worlds: the world id is the row's id.
    "scheduler_daemon_notify_world": """
CREATE FUNCTION scheduler_daemon_notify_world() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('scheduler_daemon_changes', OLD.id::text);
    ELSE
        PERFORM pg_notify('scheduler_daemon_changes', NEW.id::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql
""",
    # sessions, npcs: a row moved to another world notifies both.
    "scheduler_daemon_notify_world_row": """
CREATE FUNCTION scheduler_daemon_notify_world_row() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('scheduler_daemon_changes', OLD.world_id::text);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('scheduler_daemon_changes', NEW.world_id::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql
""",
}


def _changed(columns: str) -> str:
    """A trigger condition: one of ``columns`` has a new value (an UPDATE that rewrites the same values is quiet)."""
    old = ", ".join(f"OLD.{c}" for c in columns.split(", "))
    new = ", ".join(f"NEW.{c}" for c in columns.split(", "))
    return f"({old}) IS DISTINCT FROM ({new})"


_WORLD_COLUMNS = "meta, config_version"
_SESSION_COLUMNS = "world_id, user_id, location, scene_npc_ids, involved_npc_ids, active"
_NPC_COLUMNS = "world_id, name, home, routine, external_id"

#: (trigger name, table, events, condition or None, function)
_TRIGGERS = (
    ("worlds_notify_change", "worlds", "INSERT OR DELETE", None, "scheduler_daemon_notify_world"),
    (
        "worlds_notify_update",
        "worlds",
        f"UPDATE OF {_WORLD_COLUMNS}",
        _changed(_WORLD_COLUMNS),
        "scheduler_daemon_notify_world",
    ),
    ("sessions_notify_change", "sessions", "INSERT OR DELETE", None, "scheduler_daemon_notify_world_row"),
    (
        "sessions_notify_update",
        "sessions",
        f"UPDATE OF {_SESSION_COLUMNS}",
        _changed(_SESSION_COLUMNS),
        "scheduler_daemon_notify_world_row",
    ),
    ("npcs_notify_change", "npcs", "INSERT OR DELETE", None, "scheduler_daemon_notify_world_row"),
    (
        "npcs_notify_update",
        "npcs",
        f"UPDATE OF {_NPC_COLUMNS}",
        _changed(_NPC_COLUMNS),
        "scheduler_daemon_notify_world_row",
    ),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for sql in _FUNCTIONS.values():
        op.execute(sql)
    for name, table, events, condition, function in _TRIGGERS:
        when = f" WHEN ({condition})" if condition else ""
        op.execute(f"CREATE TRIGGER {name} AFTER {events} ON {table} FOR EACH ROW{when} EXECUTE FUNCTION {function}()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, table, *_ in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    for function in _FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
