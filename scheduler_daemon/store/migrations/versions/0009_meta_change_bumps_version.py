"""Every change of ``worlds.meta`` bumps ``config_version``, whoever writes it.

Discovery notices a changed world by its ``config_version`` alone (it never
ships ``meta`` to compare). The daemon's own writes bump it; a game backend or
an operator fixing a row with plain SQL usually does not, so their change (a
new config, or the repair of a world the daemon isolated) went unnoticed until
a restart. A trigger bumps the version for any ``UPDATE`` that changes ``meta``
and leaves the version as it was.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_PG_FUNCTION = """
CREATE FUNCTION worlds_meta_bumps_version() RETURNS trigger AS $$
BEGIN
    IF NEW.meta IS DISTINCT FROM OLD.meta AND NEW.config_version = OLD.config_version THEN
        NEW.config_version := OLD.config_version + 1;
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql
"""
_PG_TRIGGER = (
    "CREATE TRIGGER worlds_meta_bumps_version BEFORE UPDATE OF meta ON worlds "
    "FOR EACH ROW EXECUTE FUNCTION worlds_meta_bumps_version()"
)
# SQLite triggers cannot assign NEW: a second UPDATE of the version only (it
# does not touch meta, so it cannot fire this trigger again).
_SQLITE_TRIGGER = """
CREATE TRIGGER worlds_meta_bumps_version AFTER UPDATE OF meta ON worlds
FOR EACH ROW WHEN NEW.meta IS NOT OLD.meta AND NEW.config_version IS OLD.config_version
BEGIN
    UPDATE worlds SET config_version = config_version + 1 WHERE id = NEW.id;
END
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)
    else:
        op.execute(_SQLITE_TRIGGER)


def downgrade() -> None:
    op.execute(
        "DROP TRIGGER IF EXISTS worlds_meta_bumps_version"
        + (" ON worlds" if op.get_bind().dialect.name == "postgresql" else "")
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS worlds_meta_bumps_version()")
