"""Due-NPC index covers the tie-break: (world_id, tier, next_decision_at, id).

The per-tick selection orders each tier by ``next_decision_at, id`` and takes
the first few. Without ``id`` in the index the database reads and sorts every
due NPC of the tier (hundreds) to return 50; with it, the index range is
already in that order and the scan stops at the limit.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_OLD = "ix_npcs_world_id_tier_next_decision_at"
_NEW = "ix_npcs_world_id_tier_next_decision_at_id"


def upgrade() -> None:
    op.create_index(_NEW, "npcs", ["world_id", "tier", "next_decision_at", "id"])
    op.drop_index(_OLD, table_name="npcs")


def downgrade() -> None:
    op.create_index(_OLD, "npcs", ["world_id", "tier", "next_decision_at"])
    op.drop_index(_NEW, table_name="npcs")
