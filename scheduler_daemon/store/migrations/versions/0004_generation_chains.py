"""Generation requests (transactional outbox), interaction chains, interaction cooldowns.

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)
WorldTime = sa.Float(precision=53)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "generation_requests",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("world_id", sa.Integer, nullable=False),
        sa.Column("session_id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("npc_id", sa.Integer, nullable=True),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("not_before", WorldTime, nullable=True),
        sa.Column("handed_off", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("enqueued_at", Timestamp, nullable=True),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_generation_requests"),
        sa.ForeignKeyConstraint(
            ["world_id"], ["worlds.id"], name="fk_generation_requests_world_id_worlds", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_generation_requests_session_id_sessions", ondelete="CASCADE"
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'enqueued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_generation_requests_status",
        ),
    )
    op.create_index(
        "ix_generation_requests_world_id_status_priority_id",
        "generation_requests",
        ["world_id", "status", sa.text("priority DESC"), "id"],
    )
    op.create_table(
        "interaction_chains",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("world_id", sa.Integer, nullable=False),
        sa.Column("session_id", sa.Integer, nullable=True),
        sa.Column("npc_id", sa.Integer, nullable=True),
        sa.Column("chain_key", sa.String(200), nullable=False),
        sa.Column("steps", JSONType, nullable=False),
        sa.Column("current_step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", WorldTime, nullable=False),
        sa.Column("next_step_at", WorldTime, nullable=True),
        sa.Column("completed_at", WorldTime, nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("fired", JSONType, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("updated_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
        sa.PrimaryKeyConstraint("id", name="pk_interaction_chains"),
        sa.ForeignKeyConstraint(
            ["world_id"], ["worlds.id"], name="fk_interaction_chains_world_id_worlds", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_interaction_chains_session_id_sessions", ondelete="CASCADE"
        ),
        sa.CheckConstraint(
            "status IN ('active', 'completed', 'cancelled', 'failed')", name="ck_interaction_chains_status"
        ),
    )
    op.create_index(
        "ix_interaction_chains_world_id_status_next_step_at",
        "interaction_chains",
        ["world_id", "status", "next_step_at"],
    )
    op.create_table(
        "interaction_cooldowns",
        sa.Column("world_id", sa.Integer, nullable=False),
        sa.Column("session_id", sa.Integer, nullable=False),
        sa.Column("npc_id", sa.Integer, nullable=False),
        sa.Column("interaction_key", sa.String(200), nullable=False),
        sa.Column("last_interaction_at", WorldTime, nullable=False),
        sa.Column("interactions", sa.BigInteger, nullable=False, server_default="1"),
        sa.PrimaryKeyConstraint("world_id", "session_id", "npc_id", "interaction_key", name="pk_interaction_cooldowns"),
        sa.ForeignKeyConstraint(
            ["world_id"], ["worlds.id"], name="fk_interaction_cooldowns_world_id_worlds", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name="fk_interaction_cooldowns_session_id_sessions",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("interaction_cooldowns")
    op.drop_table("interaction_chains")
    op.drop_table("generation_requests")
