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
    # The game's own id (0010); NULL never conflicts.
    sa.Column("external_id", sa.String(200), nullable=True),
    sa.Index("uq_worlds_external_id", "external_id", unique=True),
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
    sa.Index("ix_world_states_lease_owner", "lease_owner"),
)

#: One row per running daemon (PostgreSQL leases): a heartbeat whose expiry
#: comes from the database's ``now()``. Live rows give the fair share.
scheduler_instances = sa.Table(
    "scheduler_instances",
    metadata,
    sa.Column("instance_id", sa.String(200), primary_key=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("heartbeat_at", Timestamp, nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
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
    sa.Column("external_id", sa.String(200), nullable=True),
    sa.Index("ix_sessions_world_id_active", "world_id", "active"),
    sa.Index("uq_sessions_world_id_external_id", "world_id", "external_id", unique=True),
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
    sa.Column("external_id", sa.String(200), nullable=True),
    # The per-tick selection: one index range per tier, already in due order
    # including the id tie-break, so each range scan stops at the limit (0008).
    sa.Index("ix_npcs_world_id_tier_next_decision_at_id", "world_id", "tier", "next_decision_at", "id"),
    sa.Index("uq_npcs_world_id_external_id", "world_id", "external_id", unique=True),
    # The game's paged reads of one world by id (0010).
    sa.Index("ix_npcs_world_id_id", "world_id", "id"),
)

#: 64-bit ids on PostgreSQL; SQLite only auto-increments an INTEGER primary key.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Generation requests. The outbox is ``status = 'enqueued' AND NOT
# handed_off``: claimed in a committed tick, not yet accepted by the sink.
generation_requests = sa.Table(
    "generation_requests",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("world_id", sa.Integer, sa.ForeignKey("worlds.id", ondelete="CASCADE"), nullable=False),
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("npc_id", sa.Integer, nullable=True),
    sa.Column("kind", sa.String(100), nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # World time before which a request backing off is not claimed again.
    sa.Column("not_before", WorldTime, nullable=True),
    sa.Column("handed_off", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("enqueued_at", Timestamp, nullable=True),
    sa.Column("finished_at", Timestamp, nullable=True),
    sa.CheckConstraint(
        "status IN ('pending', 'enqueued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"
    ),
    # The claim: pending rows of one world, highest priority then oldest.
    sa.Index(
        "ix_generation_requests_world_id_status_priority_id",
        "world_id",
        "status",
        sa.text("priority DESC"),
        "id",
    ),
)

interaction_chains = sa.Table(
    "interaction_chains",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("world_id", sa.Integer, sa.ForeignKey("worlds.id", ondelete="CASCADE"), nullable=False),
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=True),
    sa.Column("npc_id", sa.Integer, nullable=True),
    sa.Column("chain_key", sa.String(200), nullable=False),
    sa.Column("steps", JSONType, nullable=False),
    sa.Column("current_step", sa.Integer, nullable=False, server_default="0"),
    # World times.
    sa.Column("started_at", WorldTime, nullable=False),
    sa.Column("next_step_at", WorldTime, nullable=True),
    sa.Column("completed_at", WorldTime, nullable=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="active"),
    # Fired steps: [{"step": i, "dueAt": world time, "firedAt": world time}, ...]
    sa.Column("fired", JSONType, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("updated_at", Timestamp, nullable=False, server_default=sa.func.current_timestamp()),
    sa.CheckConstraint("status IN ('active', 'completed', 'cancelled', 'failed')", name="status"),
    sa.Index("ix_interaction_chains_world_id_status_next_step_at", "world_id", "status", "next_step_at"),
)

interaction_cooldowns = sa.Table(
    "interaction_cooldowns",
    metadata,
    sa.Column("world_id", sa.Integer, sa.ForeignKey("worlds.id", ondelete="CASCADE"), nullable=False),
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("npc_id", sa.Integer, nullable=False),
    sa.Column("interaction_key", sa.String(200), nullable=False),
    # World time of the last interaction (``lastInteractionAt``), never the wall clock.
    sa.Column("last_interaction_at", WorldTime, nullable=False),
    sa.Column("interactions", sa.BigInteger, nullable=False, server_default="1"),
    sa.PrimaryKeyConstraint("world_id", "session_id", "npc_id", "interaction_key"),
)
