"""Tier assignment of registered worlds: when it is outdated, computing and writing it, quarantine.

Tiers are computed from a world's sessions at registration, after a change of
capacities or tier rules, and when the runner's discovery finds them outdated;
never per tick (it reads every NPC of the world).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.logs import get_logger
from scheduler_daemon.scheduler.base import SchedulerBase
from scheduler_daemon.scheduler.results import _Assigned, _World
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.simulation.tiers import (
    SessionView,
    TierAssignment,
    assign_tiers,
    sessions_fingerprint,
    tier_relevant_locations,
)
from scheduler_daemon.store.sessions import ActiveSessions, IgnoredSession

log = get_logger("scheduler_daemon.scheduler")


class Tiering(SchedulerBase):
    """Assigns the tiers of registered worlds and tracks session rows tiering cannot read."""

    def tiers_outdated(self, world_id: int, sessions: Sequence[SessionView]) -> bool:
        """Whether a registered world's tiers need recomputing.

        True when its active sessions differ from those of the last assignment
        (by :func:`~scheduler_daemon.simulation.tiers.sessions_fingerprint`),
        or when a committed decision moved an NPC to or from a place tiering
        looks at (a player's location or a rule's location).
        """
        ctx = self._require(world_id).context
        return ctx.tiers_stale or ctx.sessions_fingerprint != sessions_fingerprint(sessions)

    async def refresh_tiers(self, world_id: int, sessions: Sequence[SessionView] | None = None) -> TierAssignment:
        """Recompute a registered world's tiers and write the changed ones.

        ``sessions`` are its active sessions if the caller already read them
        (discovery does, for all worlds in one query); otherwise they are read
        here. Must not run concurrently with a tick of the same world (the
        runner holds the world's lock). A world with a lease is fenced like
        its ticks: once another instance owns it, nothing is written and
        :class:`~scheduler_daemon.store.errors.LeaseLostError` is raised.
        """
        return await self._assign_tiers(self._require(world_id), sessions)

    def note_ignored_sessions(self, ignored: Sequence[IgnoredSession]) -> None:
        """Report session rows tiering cannot read: once each when first seen, and once when fixed.

        ``ignored`` is the complete list from a read of every active session.
        """
        now = {s.session_id: s for s in ignored}
        for session_id, session in now.items():
            if self._ignored_sessions.get(session_id) != session.problem:
                log.warning(
                    "session_unreadable",
                    world_id=session.world_id,
                    session_id=session_id,
                    problem=session.problem,
                )
        for session_id in self._ignored_sessions.keys() - now.keys():
            log.info("session_readable_again", session_id=session_id)
        self._ignored_sessions = {session_id: s.problem for session_id, s in now.items()}

    @property
    def ignored_sessions(self) -> int:
        """Active session rows left out of tiering because they cannot be read."""
        return len(self._ignored_sessions)

    async def _assign_tiers(self, entry: _World, sessions: Sequence[SessionView] | None) -> TierAssignment:
        world_id = entry.context.world_id
        views = None if sessions is None else ActiveSessions({world_id: list(sessions)}, [])
        async with self.store.transaction() as conn:
            if entry.lease is not None:
                # A daemon that lost the lease without noticing yet must not write the new owner's tiers.
                await self.store.fence_tick(conn, entry.lease)
            assigned = (await self._compute_tiers(conn, {world_id: entry}, views))[world_id]
        self._adopt_tiers(entry, assigned)
        return assigned.assignment

    async def _compute_tiers(
        self, conn: AsyncConnection, entries: Mapping[int, _World], sessions: ActiveSessions | None
    ) -> dict[int, _Assigned]:
        """Assign the tiers of several worlds from their sessions and write the changed ones (one statement).

        NPC rows that cannot be decided are quarantined: frozen, outside every
        capacity, until a later assignment finds them readable again.
        """
        if sessions is None:
            sessions = await self.store.session_views_many(conn, list(entries))
        placements = await self.store.npc_placements_many(conn, list(entries))
        changes: dict[int, dict[int, tuple[Tier, float | None]]] = {}
        out: dict[int, _Assigned] = {}
        for world_id, entry in entries.items():
            config = entry.context.config
            now = entry.context.current_world_time
            intervals = config.tiers.intervals()
            records = placements.get(world_id, [])
            views = sessions.views.get(world_id, [])
            quarantined = {r.placement.id: r.problem for r in records if r.problem is not None}
            assignment = assign_tiers(
                (r.placement for r in records if r.problem is None),
                views,
                config.tiers.capacities(),
                config.tier_rules,
            )
            per_world: dict[int, tuple[Tier, float | None]] = {}
            for record in records:
                new = Tier.FROZEN if record.problem is not None else assignment.tiers[record.placement.id]
                if new != record.tier:
                    # A promoted NPC is decided at its new cadence within one
                    # new interval, not after its old (coarser) one.
                    promoted = new != Tier.FROZEN and (record.tier is None or new < record.tier)
                    per_world[record.placement.id] = (new, now + intervals[new] if promoted else None)
            changes[world_id] = per_world
            counts = dict(assignment.counts)
            counts[Tier.FROZEN] = counts.get(Tier.FROZEN, 0) + len(quarantined)
            activities: dict[str | None, int] = {}
            for record in records:
                activities[record.current_activity] = activities.get(record.current_activity, 0) + 1
            out[world_id] = _Assigned(assignment, counts, views, activities, quarantined, len(per_world))
        await self.store.write_tier_changes(conn, changes)
        return out

    def _adopt_tiers(self, entry: _World, assigned: _Assigned) -> None:
        """After the assignment's commit: the context takes it over; quarantine changes are logged."""
        ctx = entry.context
        log_quarantine(ctx.world_id, ctx.quarantined_npcs, assigned.quarantined)
        ctx.record_tier_assignment(
            assigned.counts,
            sessions_fingerprint=sessions_fingerprint(assigned.sessions),
            relevant_locations=tier_relevant_locations(assigned.sessions, ctx.config.tier_rules),
            activity_counts=assigned.activities,
            quarantined=assigned.quarantined,
        )
        log.debug(
            "tiers_assigned",
            world_id=ctx.world_id,
            sessions=len(assigned.sessions),
            changed=assigned.changed,
            population={t.label: n for t, n in assigned.counts.items()},
        )


def log_quarantine(world_id: int, before: Mapping[int, str], after: Mapping[int, str]) -> None:
    """WARNING once per NPC row entering quarantine, INFO once when it leaves."""
    for npc_id, problem in after.items():
        if npc_id not in before:
            log.warning("npc_quarantined", world_id=world_id, npc_id=npc_id, problem=problem)
    for npc_id in before.keys() - after.keys():
        log.info("npc_quarantine_released", world_id=world_id, npc_id=npc_id)
