"""External ids: the game's own id of a world, an NPC or a session; NPC pages by id.

``worlds.external_id`` is unique; ``npcs.external_id`` and
``sessions.external_id`` are unique per world. NULL (no external id) never
conflicts, on both databases. Unique indexes rather than constraints: adding
a constraint on SQLite recreates the table (batch mode), and dropping the old
``worlds`` table would fire its ``ON DELETE CASCADE`` foreign keys and lose
its triggers (0009); a column and an index are added in place.

``(world_id, id)`` on ``npcs`` serves the game's paged reads of a world's NPCs
(``GET …/npcs``, export), which walk one world in id order.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: (table, index name, indexed columns)
_INDEXES = (
    ("worlds", "uq_worlds_external_id", ["external_id"]),
    ("npcs", "uq_npcs_world_id_external_id", ["world_id", "external_id"]),
    ("sessions", "uq_sessions_world_id_external_id", ["world_id", "external_id"]),
)


def upgrade() -> None:
    for table, index, columns in _INDEXES:
        op.add_column(table, sa.Column("external_id", sa.String(200), nullable=True))
        op.create_index(index, table, columns, unique=True)
    op.create_index("ix_npcs_world_id_id", "npcs", ["world_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_npcs_world_id_id", table_name="npcs")
    for table, index, _ in _INDEXES:
        op.drop_index(index, table_name=table)
        # SQLite >= 3.35 drops a column in place (no table recreation, see above).
        op.drop_column(table, "external_id")
