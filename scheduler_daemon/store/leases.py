"""Every lease statement: instance heartbeats and world leases (``LeaseStore``), the tick fence (``Fencing``).

PostgreSQL only (SQLite is single-instance). World ownership is a lease on the
world's ``world_states`` row: ``lease_owner`` (instance id),
``lease_expires_at`` (computed from the database's clock, never a client's)
and ``lease_epoch``, which increases on every claim. A tick is fenced on
``owner = me AND epoch = my epoch`` (:meth:`Fencing.fence_tick` locks the row at the
start of the tick's transaction), so once another instance has claimed the
world, the old owner cannot commit a single row of it, however long it was
paused.

The database clock is an SQL expression (``clock_timestamp()`` by default:
the statement's time, not the transaction's start, so a claim that waited
does not start out partly expired) so tests can substitute a controllable one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scheduler_daemon.store.base import StoreBase
from scheduler_daemon.store.errors import LeaseLostError
from scheduler_daemon.store.fence import Fence
from scheduler_daemon.store.models import scheduler_instances, world_states, worlds

#: Instance rows expired for longer than this are deleted (history for humans until then).
INSTANCE_RETENTION_SECONDS = 3600.0

DbNow = Callable[[], sa.ColumnElement[datetime]]


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease we hold: the fencing token for a world's writes."""

    world_id: int
    owner: str
    epoch: int
    #: With a TTL, every fenced tick also renews the lease (see :meth:`Fencing.fence_tick`).
    ttl_seconds: float = 0.0
    #: The database clock of the store that granted the lease (tests substitute it).
    now: DbNow = field(default=sa.func.clock_timestamp, compare=False, repr=False)

    @property
    def fence(self) -> Fence:
        """What the tick's writes check: this lease's owner and epoch."""
        return Fence(self.owner, self.epoch)


@dataclass(frozen=True, slots=True)
class RenewResult:
    """Outcome of a renewal: leases extended, and leases found lost (owner or epoch changed)."""

    renewed: set[int]
    lost: set[int]


def _seconds(seconds: float) -> sa.ColumnElement[Any]:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.literal(seconds, sa.Float))


def _ids(values: Collection[int]) -> sa.BindParameter[Any]:
    return sa.bindparam("ids", list(values), type_=postgresql.ARRAY(sa.Integer))


def _held(leases: Collection[Lease]) -> sa.TableValuedAlias:
    """``unnest(ids, epochs) AS held(world_id, epoch)`` for owner+epoch conditional statements."""
    return (
        sa.func.unnest(
            sa.bindparam("held_ids", [lease.world_id for lease in leases], type_=postgresql.ARRAY(sa.Integer)),
            sa.bindparam("held_epochs", [lease.epoch for lease in leases], type_=postgresql.ARRAY(sa.BigInteger)),
        )
        .table_valued("world_id", "epoch")
        .render_derived(name="held", with_types=False)
    )


def lease_columns(lease: Lease) -> dict[str, Any]:
    """``world_states`` column values that put ``lease`` on a row (owner, epoch, expiry from the database clock)."""
    return {
        "lease_owner": lease.owner,
        "lease_epoch": lease.epoch,
        "lease_expires_at": lease.now() + _seconds(max(lease.ttl_seconds, 1.0)),
    }


class Fencing(StoreBase):
    """The lease statement of the tick's own transaction; a part of ``Store``, unlike :class:`LeaseStore`."""

    @staticmethod
    async def fence_tick(conn: AsyncConnection, lease: Lease) -> int:
        """First statement of a fenced tick: lock the world's state row if the lease is still ours.

        Returns the committed tick counter. Raises :class:`LeaseLostError` when
        the owner or epoch changed. Holding the row lock for the rest of the
        transaction means no claim can change the epoch before we commit (claims
        skip locked rows). The same statement renews the lease (expiry from the
        database's clock): a world that ticks keeps its lease without waiting for
        the renewal task.
        """
        fenced = sa.update(world_states).where(
            world_states.c.world_id == lease.world_id,
            world_states.c.lease_owner == lease.owner,
            world_states.c.lease_epoch == lease.epoch,
        )
        if lease.ttl_seconds > 0:
            fenced = fenced.values(lease_expires_at=lease.now() + _seconds(lease.ttl_seconds))
        else:
            fenced = fenced.values(lease_epoch=world_states.c.lease_epoch)  # lock only
        row = (await conn.execute(fenced.returning(world_states.c.ticks))).first()
        if row is None:
            raise LeaseLostError(lease.world_id, lease.owner, lease.epoch)
        return int(row[0])


class LeaseStore:
    """Heartbeats and world leases for one daemon instance."""

    def __init__(
        self, engine: AsyncEngine, instance_id: str, ttl_seconds: float, *, now: DbNow = sa.func.clock_timestamp
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("world leases need PostgreSQL; SQLite is single-instance")
        self.engine = engine
        self.instance_id = instance_id
        self.ttl_seconds = ttl_seconds
        self._now = now

    def _expiry(self) -> sa.ColumnElement[datetime]:
        return self._now() + _seconds(self.ttl_seconds)

    # ------------------------------------------------------------ instances
    async def heartbeat(self) -> int:
        """Register or refresh this instance; returns the number of live instances (us included)."""
        now = self._now()
        insert = postgresql.insert(scheduler_instances).values(
            instance_id=self.instance_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            heartbeat_at=now,
            expires_at=self._expiry(),
        )
        excluded = insert.excluded
        same_process = sa.and_(
            scheduler_instances.c.pid == excluded.pid, scheduler_instances.c.hostname == excluded.hostname
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[scheduler_instances.c.instance_id],
            set_={
                "hostname": excluded.hostname,
                "pid": excluded.pid,
                "started_at": sa.case((same_process, scheduler_instances.c.started_at), else_=excluded.started_at),
                "heartbeat_at": excluded.heartbeat_at,
                "expires_at": excluded.expires_at,
            },
        )
        async with self.engine.begin() as conn:
            await conn.execute(upsert)
            await conn.execute(
                sa.delete(scheduler_instances).where(
                    scheduler_instances.c.expires_at
                    < self._now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, INSTANCE_RETENTION_SECONDS)
                )
            )
            live = (
                await conn.execute(sa.select(sa.func.count()).where(scheduler_instances.c.expires_at > self._now()))
            ).scalar_one()
        return max(int(live), 1)

    async def leave(self) -> None:
        """Remove this instance's heartbeat row (clean shutdown: peers rebalance at once)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.delete(scheduler_instances).where(scheduler_instances.c.instance_id == self.instance_id)
            )

    # ---------------------------------------------------------------- leases
    async def claim(self, candidates: Collection[int], limit: int) -> list[Lease]:
        """Claim at most ``limit`` of ``candidates`` whose lease is free or expired.

        One conditional ``UPDATE … RETURNING`` over a ``FOR UPDATE SKIP
        LOCKED`` selection: rows an owner is ticking right now (locked by
        :meth:`Fencing.fence_tick`) are skipped, never waited for. Every claim
        increases the epoch. Missing state rows are created first.
        """
        if limit <= 0 or not candidates:
            return []
        async with self.engine.begin() as conn:
            # Only worlds without a state row: an upsert over existing rows would
            # wait for every in-flight tick holding one of them.
            missing = sa.select(worlds.c.id).where(
                worlds.c.id == sa.func.any(_ids(candidates)),
                ~sa.exists().where(world_states.c.world_id == worlds.c.id),
            )
            await conn.execute(
                postgresql.insert(world_states)
                .from_select(["world_id"], missing)
                .on_conflict_do_nothing(index_elements=[world_states.c.world_id])
            )
            claimable = (
                sa.select(world_states.c.world_id)
                .where(
                    world_states.c.world_id == sa.func.any(_ids(candidates)),
                    sa.or_(world_states.c.lease_owner.is_(None), world_states.c.lease_expires_at <= self._now()),
                )
                .order_by(world_states.c.world_id)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            rows = (
                await conn.execute(
                    sa.update(world_states)
                    .where(world_states.c.world_id.in_(claimable))
                    .values(
                        lease_owner=self.instance_id,
                        lease_epoch=world_states.c.lease_epoch + 1,
                        lease_expires_at=self._expiry(),
                    )
                    .returning(world_states.c.world_id, world_states.c.lease_epoch)
                )
            ).all()
        return sorted(
            (Lease(int(r[0]), self.instance_id, int(r[1]), self.ttl_seconds, self._now) for r in rows),
            key=lambda lease: lease.world_id,
        )

    async def held_elsewhere(self, world_ids: Collection[int]) -> set[int]:
        """Of ``world_ids``, the worlds whose lease another instance holds and has not let expire."""
        if not world_ids:
            return set()
        query = sa.select(world_states.c.world_id).where(
            world_states.c.world_id == sa.func.any(_ids(world_ids)),
            world_states.c.lease_owner != self.instance_id,
            world_states.c.lease_expires_at > self._now(),
        )
        async with self.engine.connect() as conn:
            return {int(w) for w in (await conn.execute(query)).scalars()}

    async def renew(self, leases: Collection[Lease]) -> RenewResult:
        """Extend our leases (owner and epoch conditional).

        Rows locked right now are skipped rather than waited for: usually our
        own tick holds the lock (so nobody can claim the row meanwhile), and
        one slow tick must not hold up the renewal of every other world.
        Skipped leases are neither renewed nor lost; the next renewal decides.
        """
        if not leases:
            return RenewResult(set(), set())
        unlocked, renewed = await self._update_held(leases, lease_expires_at=self._expiry())
        return RenewResult(renewed, unlocked - renewed)

    async def release(self, leases: Collection[Lease]) -> set[int]:
        """Give leases up so a peer can claim them at once; returns the world ids released.

        Rows locked right now (a tick still stuck in the database) are left
        alone rather than waited for: they expire after the TTL instead.
        """
        if not leases:
            return set()
        _, released = await self._update_held(leases, lease_owner=None, lease_expires_at=None)
        return released

    async def _update_held(self, leases: Collection[Lease], **values: Any) -> tuple[set[int], set[int]]:
        """Set ``values`` on the state rows of leases we still hold, skipping rows locked right now.

        Returns (world ids whose rows were not locked, world ids updated): an
        unlocked row that was not updated changed owner or epoch.
        """
        held = _held(leases)
        async with self.engine.begin() as conn:
            unlocked = {
                int(r[0])
                for r in (
                    await conn.execute(
                        sa.select(world_states.c.world_id)
                        .where(world_states.c.world_id == sa.func.any(_ids([lease.world_id for lease in leases])))
                        .with_for_update(skip_locked=True)
                    )
                ).all()
            }
            rows = (
                await conn.execute(
                    sa.update(world_states)
                    .where(
                        world_states.c.world_id == held.c.world_id,
                        world_states.c.lease_epoch == held.c.epoch,
                        world_states.c.lease_owner == self.instance_id,
                        world_states.c.world_id == sa.func.any(_ids(sorted(unlocked))),
                    )
                    .values(**values)
                    .returning(world_states.c.world_id)
                )
            ).all()
        return unlocked, {int(r[0]) for r in rows}


async def current_owner(engine: AsyncEngine, ref: int | str, *, now: DbNow = sa.func.clock_timestamp) -> str | None:
    """The instance holding the unexpired lease of the world ``ref`` (daemon id, or external id), if any.

    For ``run --workers``: the supervisor sends a request naming a world to the
    worker that owns it. ``None`` for an unknown world or a free or expired lease.
    """
    key = world_states.c.world_id == ref if isinstance(ref, int) else worlds.c.external_id == ref
    query = (
        sa.select(world_states.c.lease_owner)
        .select_from(world_states.join(worlds, worlds.c.id == world_states.c.world_id))
        .where(key, world_states.c.lease_expires_at > now())
    )
    async with engine.connect() as conn:
        owner = (await conn.execute(query)).scalar_one_or_none()
    return owner if isinstance(owner, str) else None
