"""Daemon instances with a heartbeat (several daemons sharing worlds through leases).

Revision ID: 0007
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "scheduler_instances",
        sa.Column("instance_id", sa.String(200), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("heartbeat_at", Timestamp, nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("instance_id", name="pk_scheduler_instances"),
    )
    # Claims look for free or expired leases; owners list theirs.
    op.create_index("ix_world_states_lease_owner", "world_states", ["lease_owner"])


def downgrade() -> None:
    op.drop_index("ix_world_states_lease_owner", table_name="world_states")
    op.drop_table("scheduler_instances")
