"""Initial schema: worlds, world_states, sessions, npcs.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)
WorldTime = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "worlds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("meta", JSONType, nullable=False),
        sa.Column("config_version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("updated_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
        sa.PrimaryKeyConstraint("id", name="pk_worlds"),
    )
    op.create_table(
        "world_states",
        sa.Column("world_id", sa.Integer, nullable=False),
        sa.Column("world_time", WorldTime, nullable=False, server_default="0"),
        sa.Column("ticks", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_advanced_at", Timestamp, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", Timestamp, nullable=True),
        sa.Column("lease_epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("world_id", name="pk_world_states"),
        sa.ForeignKeyConstraint(
            ["world_id"], ["worlds.id"], name="fk_world_states_world_id_worlds", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("world_id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("location", sa.String(200), nullable=True),
        sa.Column("scene_npc_ids", JSONType, nullable=False),
        sa.Column("involved_npc_ids", JSONType, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("updated_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.ForeignKeyConstraint(["world_id"], ["worlds.id"], name="fk_sessions_world_id_worlds", ondelete="CASCADE"),
    )
    op.create_index("ix_sessions_world_id_active", "sessions", ["world_id", "active"])
    op.create_table(
        "npcs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("world_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("location", sa.String(200), nullable=True),
        sa.Column("home", sa.String(200), nullable=True),
        sa.Column("routine", sa.String(200), nullable=True),
        sa.Column("tier", sa.SmallInteger, nullable=False, server_default="3"),
        sa.Column("next_decision_at", WorldTime, nullable=False, server_default="0"),
        sa.Column("current_activity", sa.String(200), nullable=True),
        sa.Column("activity_started_at", WorldTime, nullable=True),
        sa.Column("energy", sa.Float, nullable=False, server_default="100"),
        sa.Column("mood_valence", sa.Float, nullable=False, server_default="0"),
        sa.Column("mood_arousal", sa.Float, nullable=False, server_default="0"),
        sa.Column("last_decision_at", WorldTime, nullable=True),
        sa.Column("decisions", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("state", JSONType, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_npcs"),
        sa.ForeignKeyConstraint(["world_id"], ["worlds.id"], name="fk_npcs_world_id_worlds", ondelete="CASCADE"),
    )
    op.create_index("ix_npcs_world_id_tier_next_decision_at", "npcs", ["world_id", "tier", "next_decision_at"])


def downgrade() -> None:
    op.drop_table("npcs")
    op.drop_table("sessions")
    op.drop_table("world_states")
    op.drop_table("worlds")
