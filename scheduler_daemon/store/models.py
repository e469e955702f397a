"""Table definitions (SQLAlchemy Core; the hot path never builds ORM objects).

Every world-owned table carries ``world_id`` and every hot query filters by it,
so the schema can be distributed by ``world_id`` (e.g. Citus) unchanged. No
cross-world foreign keys.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: JSON on SQLite, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: Wall-clock timestamps, for humans only (never used for scheduling).
Timestamp = sa.DateTime(timezone=True)
#: World time: float game seconds since the world's epoch.
WorldTime = sa.Float(precision=53)

worlds = sa.Table(
    "worlds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("meta", JSONType, nullable=False),
    sa.Column("config_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("updated_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
)

world_states = sa.Table(
    "world_states",
    metadata,
    sa.Column("world_id", sa.Integer, sa.ForeignKey("worlds.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("world_time", WorldTime, nullable=False, server_default="0"),
    sa.Column("ticks", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_advanced_at", Timestamp, nullable=True),
    # Lease (PostgreSQL multi-daemon): owner, expiry from the DB's now(), fencing epoch.
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", Timestamp, nullable=True),
    sa.Column("lease_epoch", sa.BigInteger, nullable=False, server_default="0"),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("world_id", sa.Integer, sa.ForeignKey("worlds.id", ondelete="CASCADE"), nullable=False),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("location", sa.String(200), nullable=True),
    sa.Column("scene_npc_ids", JSONType, nullable=False),
    sa.Column("involved_npc_ids", JSONType, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("updated_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Index("ix_sessions_world_id_active", "world_id", "active"),
)

npcs = sa.Table(
    "npcs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("world_id", sa.Integer, sa.ForeignKey("worlds.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("location", sa.String(200), nullable=True),
    sa.Column("home", sa.String(200), nullable=True),
    sa.Column("routine", sa.String(200), nullable=True),
    # Tier as a small int (0 detailed … 3 dormant, 4 frozen): ORDER BY tier is priority.
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
    # The per-tick selection: one index range per tier, already in due order
    # including the id tie-break, so each range scan stops at the limit (0008).
    sa.Index("ix_npcs_world_id_tier_next_decision_at_id", "world_id", "tier", "next_decision_at", "id"),
)
