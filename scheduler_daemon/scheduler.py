"""``WorldScheduler``: one tick of one world = load ─► decide (pure) ─► commit.

This is the only module that combines the pure core (``context``,
``simulation/``) with the store. A tick's NPC updates and the new world time
commit in one transaction; the in-memory context changes only after the commit
succeeded, so a failed tick leaves database and context exactly as they were.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.context import AdvancePlan, TickOutcome, WorldSimulationContext
from scheduler_daemon.generation import GenerationSink, leave_enqueued
from scheduler_daemon.simulation import chains as chain_logic
from scheduler_daemon.simulation import generation as gen_logic
from scheduler_daemon.simulation.behavior import (
    BehaviorContent,
    DecideFn,
    decide,
    parse_behavior,
    simulate_batch,
)
from scheduler_daemon.simulation.npc import SIMULATED_TIERS, NpcDecision, NpcState, Tier
from scheduler_daemon.simulation.tiers import (
    SessionView,
    TierAssignment,
    assign_tiers,
    last_taken,
    sessions_fingerprint,
    tier_relevant_locations,
)
from scheduler_daemon.store.chains import ChainUpdate
from scheduler_daemon.store.errors import StaleWorldStateError, WorldNotFoundError, is_transient
from scheduler_daemon.store.generation import ClaimResult, GenerationRequest
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.npcs import QuarantinedNpc
from scheduler_daemon.store.protocol import TickStore
from scheduler_daemon.store.sessions import ActiveSessions, IgnoredSession
from scheduler_daemon.store.ticks import DueWork, WorldAdvance
from scheduler_daemon.store.worlds import WorldRecord
from scheduler_daemon.world_config import WorldConfig, parse_world_config

log = structlog.get_logger("scheduler_daemon.scheduler")

# A tick whose world has no pending request (never mutated).
_NOTHING_CLAIMED: Final = ClaimResult(claimed=[], rejected=[], in_flight=0)


class WorldNotRegisteredError(LookupError):
    """The world is not registered with this scheduler."""

    def __init__(self, world_id: int) -> None:
        self.world_id = world_id
        super().__init__(f"world {world_id} is not registered")


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one tick did (returned by :meth:`WorldScheduler.tick_world`)."""

    world_id: int
    world_time_before: float
    world_time_after: float
    delta_real_seconds: float
    delta_game_seconds: float
    npcs_simulated: int
    jobs_enqueued: int
    chain_steps: int
    npcs_per_tier: dict[str, int]
    duration_ms: float
    capped: bool
    paused: bool


@dataclass(frozen=True, slots=True)
class CommittedTick:
    """One committed tick's NPC work, for observers such as ``simulate``'s summary.

    ``npcs`` are the states as selected (before deciding), ``decisions`` the
    committed outcomes in the same order.
    """

    world_id: int
    world_time: float
    npcs: Sequence[NpcState]
    decisions: Sequence[NpcDecision]
    decision_lag_per_tier: Mapping[Tier, float]


#: Called after each committed tick (see :class:`WorldScheduler`).
TickListener = Callable[[CommittedTick], None]


@dataclass(slots=True)
class _World:
    context: WorldSimulationContext
    behavior: BehaviorContent
    extra: dict[str, Any] = field(default_factory=dict)
    last_committed: CommittedTick | None = None  # handed to on_commit after apply
    # Claimed generation requests may await hand-off. True at registration, so
    # the first tick after a (re)start hands out what a crash left behind.
    outbox_pending: bool = True
    lease: Lease | None = None  # the fencing token when several daemons share the database


class WorldScheduler:
    """Registers worlds and ticks them against a :class:`Store`.

    ``defaults`` is the raw camelCase simulation config used under each world's
    own (``[defaults.simulation]`` in the daemon's settings). ``decide_fn`` is
    the behaviour function (see :mod:`scheduler_daemon.simulation.behavior`).
    ``sink`` receives claimed generation requests after each tick's commit
    (see :mod:`scheduler_daemon.generation`); one grouped tick's hand-off stage
    takes at most ``sink_timeout_seconds``, the rest waits for the next tick.
    """

    def __init__(
        self,
        store: TickStore,
        *,
        defaults: Mapping[str, Any] | None = None,
        decide_fn: DecideFn = decide,
        sink: GenerationSink = leave_enqueued,
        sink_timeout_seconds: float = 5.0,
        on_commit: TickListener | None = None,
    ) -> None:
        self.store = store
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.decide_fn = decide_fn
        self.sink = sink
        self.sink_timeout_seconds = sink_timeout_seconds
        self.on_commit = on_commit
        self._worlds: dict[int, _World] = {}
        self._ignored_sessions: dict[int, str] = {}  # session id -> why tiering cannot read it

    # ------------------------------------------------------------ registry
    def _load(self, record: WorldRecord) -> tuple[WorldConfig, BehaviorContent]:
        record.require_valid()
        config = parse_world_config(record.simulation_raw, world_id=record.id, defaults=self.defaults)
        behavior = parse_behavior(record.id, record.meta.get("behavior"))
        return config, behavior

    async def register_world(self, world_id: int, *, lease: Lease | None = None) -> WorldSimulationContext:
        """Load a world (creating its state row if missing) and start tracking it.

        With a ``lease`` every tick of the world is fenced on it (see
        :mod:`scheduler_daemon.store.leases`); register only after claiming,
        so the clock loaded here is the last one any owner committed.

        Raises :class:`~scheduler_daemon.store.errors.InvalidStoredWorldError`,
        :class:`~scheduler_daemon.world_config.WorldConfigError` or
        :class:`~scheduler_daemon.simulation.behavior.BehaviorContentError` naming
        the world and the field when its stored row, config (``tierRules``
        included) or behaviour content is invalid; the world is then not
        registered and nothing else is affected. Tiers are assigned from the
        world's current sessions before the first tick.
        """
        answer = (await self.register_worlds([(world_id, lease)]))[world_id]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def register_worlds(
        self, requests: Sequence[tuple[int, Lease | None]]
    ) -> dict[int, WorldSimulationContext | Exception]:
        """Register several worlds (``(world_id, lease)`` each) in one transaction.

        Missing state rows are created, the worlds loaded, and their tiers
        assigned with one statement of each kind for all of them, so
        registering thousands of worlds costs a few transactions, not several
        per world. Each world is checked on its own: one that cannot be
        registered gets its exception as its answer (see
        :meth:`register_world`) and the others are registered. A database
        error fails the whole call.
        """
        leases = dict(requests)
        answers: dict[int, WorldSimulationContext | Exception] = {}
        entries: dict[int, _World] = {}
        async with self.store.transaction() as conn:
            created = await self.store.create_missing_states(conn, list(leases))
            records = await self.store.load_worlds(conn, list(leases))
            for world_id, lease in leases.items():
                record = records.get(world_id)
                try:
                    if record is None:
                        raise WorldNotFoundError(world_id)
                    config, behavior = self._load(record)
                except (ValueError, LookupError) as exc:
                    answers[world_id] = exc
                    continue
                ctx = WorldSimulationContext(
                    world_id,
                    config,
                    world_time=float(record.world_time or 0.0),
                    ticks=int(record.ticks or 0),
                    config_version=record.config_version,
                )
                entries[world_id] = _World(ctx, behavior, lease=lease)
            assigned = await self._compute_tiers(conn, entries, None) if entries else {}
        if created:
            log.info("world state rows created at world time 0", world_ids=created)
        for world_id, entry in entries.items():
            self._adopt_tiers(entry, assigned[world_id])
            self._worlds[world_id] = entry
            ctx, config = entry.context, entry.context.config
            log.info(
                "world registered",
                world_id=world_id,
                name=records[world_id].name,
                world_time=ctx.current_world_time,
                time_scale=config.time_scale,
                tick_interval_seconds=config.tick_interval_seconds,
                paused=config.pause_simulation,
                lease_epoch=entry.lease.epoch if entry.lease else None,
            )
            answers[world_id] = ctx
        return answers

    def get_lease(self, world_id: int) -> Lease | None:
        """The lease a registered world's ticks are fenced on (``None``: single instance)."""
        return self._require(world_id).lease

    async def reload_world(
        self, world_id: int, *, elapsed_real_since_tick: float = 0.0, record: WorldRecord | None = None
    ) -> WorldSimulationContext:
        """Re-read a registered world's config and behaviour from the database.

        ``record`` is the world as just written by the caller (the admin
        API): it is applied without reading it again, unless the world
        already runs that version or a newer one (a concurrent change got
        there first; configs never go backwards). The new config applies from
        now: the part of the current interval that already elapsed accrues at
        the old scale. On a validation error the old config stays in force and
        the error propagates.
        """
        entry = self._require(world_id)
        if record is not None and record.config_version <= entry.context.config_version:
            return entry.context
        if record is None:
            record = await self.store.get_world(world_id)
        config, behavior = self._load(record)
        old = entry.context.config
        entry.context.update_config(
            config, version=record.config_version, elapsed_real_since_tick=elapsed_real_since_tick
        )
        entry.behavior = behavior
        if old.tiers.capacities() != config.tiers.capacities() or old.tier_rules != config.tier_rules:
            await self._assign_tiers(entry, None)
        log.info(
            "world config applied",
            world_id=world_id,
            config_version=record.config_version,
            time_scale=config.time_scale,
            paused=config.pause_simulation,
        )
        return entry.context

    # --------------------------------------------------------------- tiers
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
        runner holds the world's lock).
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
                    "session ignored for tiering: its row cannot be read",
                    world_id=session.world_id,
                    session_id=session_id,
                    problem=session.problem,
                )
        for session_id in self._ignored_sessions.keys() - now.keys():
            log.info("session readable again", session_id=session_id)
        self._ignored_sessions = {session_id: s.problem for session_id, s in now.items()}

    @property
    def ignored_sessions(self) -> int:
        """Active session rows left out of tiering because they cannot be read."""
        return len(self._ignored_sessions)

    async def _assign_tiers(self, entry: _World, sessions: Sequence[SessionView] | None) -> TierAssignment:
        world_id = entry.context.world_id
        views = None if sessions is None else ActiveSessions({world_id: list(sessions)}, [])
        async with self.store.transaction() as conn:
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
        _log_quarantine(ctx.world_id, ctx.quarantined_npcs, assigned.quarantined)
        ctx.record_tier_assignment(
            assigned.counts,
            sessions_fingerprint=sessions_fingerprint(assigned.sessions),
            relevant_locations=tier_relevant_locations(assigned.sessions, ctx.config.tier_rules),
            activity_counts=assigned.activities,
            quarantined=assigned.quarantined,
        )
        log.debug(
            "tiers assigned",
            world_id=ctx.world_id,
            sessions=len(assigned.sessions),
            changed=assigned.changed,
            population={t.label: n for t, n in assigned.counts.items()},
        )

    async def resync_world(self, world_id: int) -> WorldSimulationContext:
        """Reload a registered world's committed clock from the database.

        Used when a commit's outcome is unknown (e.g. the connection dropped
        during COMMIT) or the state row moved underneath us. A state row
        that is gone is recreated from the context's clock (see
        :meth:`restore_missing_state`).
        """
        entry = self._require(world_id)
        record = (await self.store.get_world(world_id)).require_valid()
        if record.world_time is None and await self.restore_missing_state(world_id):
            return entry.context
        entry.context.resync(float(record.world_time or 0.0), int(record.ticks or 0), record.last_advanced_at)
        log.warning("world state resynchronised", world_id=world_id, world_time=record.world_time, ticks=record.ticks)
        return entry.context

    async def restore_missing_state(self, world_id: int) -> bool:
        """Recreate a registered world's deleted ``world_states`` row from its last committed clock.

        Returns False (nothing written) when the row exists. The world's
        lease, if it has one, is put on the new row, so its fenced ticks go on.
        """
        entry = self._require(world_id)
        ctx = entry.context
        async with self.store.transaction() as conn:
            restored = await self.store.restore_world_state(
                conn,
                world_id,
                world_time=ctx.current_world_time,
                ticks=ctx.ticks_processed,
                advanced_at=None,
                lease=entry.lease,
            )
        if restored:
            log.warning(
                "world state row was missing; recreated from the last committed clock",
                world_id=world_id,
                world_time=ctx.current_world_time,
                ticks=ctx.ticks_processed,
            )
        return restored

    async def unregister_world(self, world_id: int) -> None:
        """Stop tracking a world. Its state is already persisted by every committed tick."""
        entry = self._worlds.pop(world_id, None)
        if entry is not None:
            log.info(
                "world unregistered",
                world_id=world_id,
                world_time=entry.context.current_world_time,
                ticks=entry.context.ticks_processed,
            )

    def _require(self, world_id: int) -> _World:
        try:
            return self._worlds[world_id]
        except KeyError:
            raise WorldNotRegisteredError(world_id) from None

    def get_context(self, world_id: int) -> WorldSimulationContext:
        """The registered world's context (raises :class:`WorldNotRegisteredError`)."""
        return self._require(world_id).context

    def get_all_contexts(self) -> dict[int, WorldSimulationContext]:
        return {wid: w.context for wid, w in self._worlds.items()}

    def is_registered(self, world_id: int) -> bool:
        return world_id in self._worlds

    def get_stats(self) -> dict[str, Any]:
        """Stats of every registered world."""
        return {
            "registered_worlds": len(self._worlds),
            "worlds": {wid: _world_stats(w) for wid, w in self._worlds.items()},
        }

    # ---------------------------------------------------------------- tick
    async def tick_world(
        self, world_id: int, delta_real_seconds: float, *, wall_at: datetime | None = None
    ) -> TickResult:
        """Advance one world by ``delta_real_seconds`` of real time and commit it.

        Raises on failure after recording it in the context; the clock, the
        counters and every row stay as they were before the tick. ``wall_at``:
        see :meth:`tick_worlds`.
        """
        (answer,) = await self.tick_worlds([(world_id, delta_real_seconds)], wall_at=wall_at)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def tick_worlds(
        self, requests: Sequence[tuple[int, float]], *, wall_at: datetime | None = None
    ) -> list[TickResult | BaseException]:
        """Tick several worlds, ``(world_id, delta_real_seconds)`` each, in one grouped commit.

        Returns one answer per request, in order: the :class:`TickResult` of a
        committed tick, or the exception that failed that world. Every world's
        tick is atomic on its own: a world that fails is rolled back alone
        (its context untouched, the failure recorded) and its neighbours
        commit. An error of the shared transaction itself (the COMMIT, a lost
        connection, a cancellation) fails every world of the group and is
        raised. After the COMMIT, the committed worlds' claimed generation
        requests are handed to the sink (transactional outbox), the whole
        group's hand-off stage within ``sink_timeout_seconds``.

        ``wall_at`` is the wall time at which the deltas end, written as each
        world's ``last_advanced_at``. A caller measuring the deltas on its own
        clock (the runner) reads it at the same moment, so a pause of the
        process before or while the group is planned (a long garbage
        collection) cannot move the stamp away from the time the tick covers.
        Default: the wall clock, read once for the group before planning.
        """
        if wall_at is None:
            wall_at = datetime.now(UTC)
        answers: list[TickResult | BaseException | None] = [None] * len(requests)
        work: list[_Planned] = []
        hand_off: list[_World] = []  # committed (or paused) worlds with outbox work
        # Checked once per group: a filtered structlog call still costs ~10 µs.
        debug = log.is_enabled_for(logging.DEBUG)
        for index, (world_id, delta) in enumerate(requests):
            entry = self._worlds.get(world_id)
            if entry is None:
                answers[index] = WorldNotRegisteredError(world_id)
                continue
            try:
                plan = entry.context.plan_advance(delta)
            except Exception as exc:
                entry.context.record_failure(_describe(exc))
                answers[index] = exc
                continue
            planned = _Planned(index, entry, plan, time.perf_counter(), wall_at)
            entry.last_committed = None
            if plan.delta_game_seconds == 0.0 and entry.context.paused:
                # Frozen clock: nothing can become due, nothing to write (so no tick to count).
                answers[index] = self._apply(
                    planned, TickOutcome(selection_ran=False, state_written=False), debug=debug
                )
                if entry.outbox_pending:
                    hand_off.append(entry)
            else:
                work.append(planned)
        if work:
            try:
                outcomes = await self._commit_group(work)
            except BaseException as exc:
                for planned in work:
                    planned.entry.last_committed = None
                    planned.entry.context.record_failure(_describe(exc))
                    if not isinstance(exc, StaleWorldStateError):
                        # The shared COMMIT's outcome may be unknown (timeout, lost connection).
                        planned.entry.context.record_unconfirmed(planned.plan, planned.wall_at_start)
                raise
            for planned, outcome in zip(work, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    planned.entry.last_committed = None
                    planned.entry.context.record_failure(_describe(outcome))
                    if not isinstance(outcome, StaleWorldStateError):
                        planned.entry.context.record_unconfirmed(planned.plan, planned.wall_at_start)
                    answers[planned.index] = outcome
                else:
                    answers[planned.index] = self._apply(planned, outcome, debug=debug)
                    if outcome.jobs_enqueued:
                        planned.entry.outbox_pending = True
                    if planned.entry.outbox_pending:
                        hand_off.append(planned.entry)
        if hand_off:
            # Transactional outbox: only committed claims are handed out, after
            # the COMMIT; the whole group's hand-off shares one deadline.
            deadline = asyncio.get_running_loop().time() + self.sink_timeout_seconds
            for entry in hand_off:
                await self._hand_off(entry, deadline)
        return [a for a in answers if a is not None]

    async def _commit_group(self, work: list[_Planned]) -> list[TickOutcome | BaseException]:
        """One transaction for the group: batched due-NPC selection, then each world's tick body.

        Optimistic: all bodies run under one savepoint. Only if one of them
        fails is the group rolled back to it and every world re-run under a
        savepoint of its own, so a failing world costs its neighbours a retry,
        never their tick. (One savepoint per world up front would cost two
        extra round trips per world on every tick.)
        """
        async with self.store.transaction() as conn:
            selected = await self.store.select_due_npcs_many(
                conn,
                [
                    (p.entry.context.world_id, p.plan.world_time_after, p.entry.context.config.max_npc_ticks_per_step)
                    for p in work
                ],
            )
            due = selected.npcs
            full = [
                (p.entry.context.world_id, p.plan.world_time_after, last_taken(due[p.entry.context.world_id]))
                for p in work
                if len(due[p.entry.context.world_id]) >= p.entry.context.config.max_npc_ticks_per_step
            ]
            reads = _GroupReads(
                due=due,
                quarantined=selected.quarantined,
                pending=await self.store.due_work_many(
                    conn, [(p.entry.context.world_id, p.plan.world_time_after) for p in work]
                ),
                # The budget may have left due NPCs waiting: how long the oldest of each tier has waited.
                waiting=await self.store.oldest_waiting_many(conn, full),
            )
            if len(work) == 1:
                # The transaction is the unit of atomicity; an error fails it and is raised.
                return [await self._run_tick(conn, work[0], reads)]
            try:
                async with conn.begin_nested():
                    return await self._run_group(conn, work, reads)
            except Exception as exc:
                if is_transient(exc):
                    # The connection or transaction itself failed (not one world):
                    # re-running worlds on it only fails again; the whole unit is retried.
                    raise
                log.debug("grouped tick failed; retrying each world under its own savepoint", worlds=len(work))
            outcomes: list[TickOutcome | BaseException] = []
            for p in work:
                try:
                    async with conn.begin_nested():
                        outcomes.append(await self._run_tick(conn, p, reads))
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes

    async def _run_tick(self, conn: AsyncConnection, planned: _Planned, reads: _GroupReads) -> TickOutcome:
        """One world's whole tick inside the transaction: body, then its own writes; raises to roll back."""
        body = await self._tick_body(conn, planned, reads)
        await self.store.write_decisions(conn, planned.entry.context.world_id, body.decisions)
        await self.store.advance_world_states(conn, [self._advance(planned)])
        return self._finish_body(planned, body)

    async def _run_group(
        self, conn: AsyncConnection, work: list[_Planned], reads: _GroupReads
    ) -> list[TickOutcome | BaseException]:
        """Every world's body, then all NPC writes and all clock moves as one statement each.

        Runs under the group's optimistic savepoint: any failure (including
        one world's stale or fenced-off state row) raises, and the caller
        re-runs each world alone under its own savepoint to isolate it.
        """
        bodies = [await self._tick_body(conn, p, reads) for p in work]
        await self.store.write_decisions_many(
            conn, [(p.entry.context.world_id, b.decisions) for p, b in zip(work, bodies, strict=True)]
        )
        await self.store.advance_world_states(conn, [self._advance(p) for p in work])
        return [self._finish_body(p, b) for p, b in zip(work, bodies, strict=True)]

    @staticmethod
    def _advance(planned: _Planned) -> WorldAdvance:
        """The fenced clock move of one world's tick."""
        ctx = planned.entry.context
        return WorldAdvance(
            world_id=ctx.world_id,
            world_time=planned.plan.world_time_after,
            expected_ticks=ctx.ticks_processed,
            advanced_at=planned.wall_at_start,
            fence=planned.entry.lease.fence if planned.entry.lease is not None else None,
        )

    async def _tick_body(self, conn: AsyncConnection, planned: _Planned, reads: _GroupReads) -> _Body:
        """A world's tick up to its NPC and clock writes, inside the (grouped) transaction.

        Its due NPCs, whether it has chain steps or generation claims to do,
        and how long NPCs left waiting have waited were read for the whole
        group (``reads``). Every statement here filters by this world's id.
        """
        entry, plan = planned.entry, planned.plan
        ctx = entry.context
        outcome = TickOutcome()
        planned.events.clear()  # from a rolled-back run of this body
        config = ctx.config
        now = plan.world_time_after
        due = reads.due[ctx.world_id]
        pending = reads.pending[ctx.world_id]
        with structlog.contextvars.bound_contextvars(world_id=ctx.world_id):  # on every log line of this body
            if entry.lease is not None:
                # Lock the state row under our lease before any write, so a lost
                # lease writes nothing and no claim can slip in before COMMIT.
                await self.store.fence_tick(conn, entry.lease)
            bad = reads.quarantined.get(ctx.world_id)
            if bad:
                # Out of the selection until fixed; its row itself is left as it is.
                await self.store.write_tier_changes(conn, {ctx.world_id: {q.npc_id: (Tier.FROZEN, None) for q in bad}})
                outcome.quarantined = {q.npc_id: q.problem for q in bad}
            _count_tiers(due, now, outcome)
            for tier, next_at in reads.waiting.get(ctx.world_id, {}).items():
                lag = now - next_at
                outcome.waiting_lag_per_tier[tier] = lag
                outcome.decision_lag_per_tier[tier] = max(lag, outcome.decision_lag_per_tier.get(tier, lag))
            decisions = simulate_batch(due, entry.behavior, now, config.tiers.intervals(), self.decide_fn)
            # Chains and generation claims commit with the world time they
            # happened at, under the same fence (the clock move after them).
            if pending.chains:
                outcome.chain_steps = await self._advance_chains(conn, ctx, now, planned.events)
            claim = _NOTHING_CLAIMED
            if pending.requests:
                claim = await self.store.claim_requests(
                    conn,
                    ctx.world_id,
                    now,
                    max_ops=config.max_job_ops_per_step,
                    max_in_flight_per_world=config.generation.max_in_flight_per_world,
                    max_in_flight_per_user=config.generation.max_in_flight_per_user,
                )
        return _Body(outcome, due, decisions, claim)

    def _finish_body(self, planned: _Planned, body: _Body) -> TickOutcome:
        """After the world's writes (still inside the transaction): its outcome and log events."""
        ctx = planned.entry.context
        outcome, due, decisions, claim = body.outcome, body.due, body.decisions, body.claim
        now = planned.plan.world_time_after
        outcome.npcs_simulated = len(decisions)
        outcome.jobs_enqueued = len(claim.claimed)
        if claim.rejected:
            planned.events.append(
                (
                    logging.ERROR,
                    "broken generation requests marked failed",
                    {
                        "request_ids": [rid for rid, _ in claim.rejected],
                        "errors": [reason for _, reason in claim.rejected],
                    },
                )
            )
        if claim.claimed:
            planned.events.append(
                (
                    logging.DEBUG,
                    "generation requests claimed",
                    {"request_ids": claim.claimed, "in_flight": claim.in_flight},
                )
            )
        _track_changes(due, decisions, ctx.tier_relevant_locations, outcome)
        # Set on every (re-)run of the body; reset by tick_worlds if the world fails after all.
        planned.entry.last_committed = (
            CommittedTick(ctx.world_id, now, due, decisions, dict(outcome.decision_lag_per_tier))
            if self.on_commit is not None
            else None
        )
        return outcome

    def _apply(self, planned: _Planned, outcome: TickOutcome, *, debug: bool) -> TickResult:
        """After COMMIT: move the world's context and describe the tick."""
        ctx = planned.entry.context
        plan = planned.plan
        outcome.duration_ms = (time.perf_counter() - planned.started) * 1000.0
        was_lagging = ctx.lagging_tiers
        if outcome.quarantined:
            _log_quarantine(ctx.world_id, ctx.quarantined_npcs, {**ctx.quarantined_npcs, **outcome.quarantined})
        ctx.apply_tick(plan, outcome)
        _log_lag_transition(ctx, was_lagging)
        entry = planned.entry
        for level, event, fields in planned.events:
            log.log(level, event, world_id=ctx.world_id, **fields)
        if self.on_commit is not None and entry.last_committed is not None:
            try:
                self.on_commit(entry.last_committed)
            except Exception:
                # The tick is committed; an observer's bug must not fail it.
                log.exception("tick listener failed", world_id=ctx.world_id)
            entry.last_committed = None
        if debug:
            log.debug(
                "tick",
                world_id=ctx.world_id,
                world_time=plan.world_time_after,
                delta_game_seconds=plan.delta_game_seconds,
                delta_real_seconds=plan.delta_real_seconds,
                ticks=ctx.ticks_processed,
                lease_epoch=planned.entry.lease.epoch if planned.entry.lease else None,
                time_scale=ctx.config.time_scale,
                npcs=outcome.npcs_simulated,
                per_tier={t.label: n for t, n in outcome.npcs_per_tier.items()},
                duration_ms=round(outcome.duration_ms, 3),
            )
            if outcome.npcs_simulated >= ctx.config.max_npc_ticks_per_step > 0:
                log.debug(
                    "npc budget exhausted",
                    world_id=ctx.world_id,
                    max_npc_ticks_per_step=ctx.config.max_npc_ticks_per_step,
                )
        return TickResult(
            world_id=ctx.world_id,
            world_time_before=plan.world_time_before,
            world_time_after=plan.world_time_after,
            delta_real_seconds=plan.delta_real_seconds,
            delta_game_seconds=plan.delta_game_seconds,
            npcs_simulated=outcome.npcs_simulated,
            jobs_enqueued=outcome.jobs_enqueued,
            chain_steps=outcome.chain_steps,
            npcs_per_tier={t.label: outcome.npcs_per_tier.get(t, 0) for t in SIMULATED_TIERS},
            duration_ms=outcome.duration_ms,
            capped=plan.capped,
            paused=ctx.paused,
        )

    async def _advance_chains(
        self,
        conn: AsyncConnection,
        ctx: WorldSimulationContext,
        now: float,
        events: list[tuple[int, str, dict[str, Any]]],
    ) -> int:
        """Fire every due chain step in order (at most ``maxChainStepsPerStep``); returns steps fired.

        A chain row that cannot be read (broken steps JSON, impossible step
        index) is marked ``failed`` with the reason; the tick goes on. Log
        events go to ``events``, for after the commit.
        """
        budget = ctx.config.max_chain_steps_per_step
        due = await self.store.select_due_chains(conn, ctx.world_id, now, budget)
        updates: list[ChainUpdate] = []
        failures: list[tuple[int, str]] = []
        fired_total = 0
        for chain in due:
            if fired_total >= budget:
                break
            try:
                steps = chain_logic.parse_steps(chain.steps)
                if not isinstance(chain.fired, list):
                    raise chain_logic.ChainError(f"fired: expected a list, got {type(chain.fired).__name__}")
                advance = chain_logic.advance_chain(
                    chain.id, steps, chain.current_step, float(chain.next_step_at or 0.0), now, budget - fired_total
                )
            except chain_logic.ChainError as exc:
                failures.append((chain.id, f"invalid stored chain: {exc}"))
                continue
            fired_total += len(advance.fired)
            updates.append(
                ChainUpdate(
                    chain_id=chain.id,
                    current_step=advance.current_step,
                    next_step_at=advance.next_step_at,
                    status=chain_logic.COMPLETED if advance.completed else chain_logic.ACTIVE,
                    completed_at=now if advance.completed else None,
                    fired=[*chain.fired, *(f.to_wire() for f in advance.fired)],
                )
            )
            events.append(
                (
                    logging.INFO,
                    "chain steps fired",
                    {
                        "chain_id": chain.id,
                        "chain_key": chain.chain_key,
                        "steps": [f.index for f in advance.fired],
                        "world_time": now,
                        "completed": advance.completed,
                    },
                )
            )
        await self.store.write_chain_updates(conn, ctx.world_id, updates)
        if failures:
            await self.store.fail_chains(conn, ctx.world_id, failures)
            events.append(
                (
                    logging.ERROR,
                    "broken chains marked failed",
                    {"chain_ids": [c for c, _ in failures], "errors": [e for _, e in failures]},
                )
            )
        return fired_total

    async def _hand_off(self, entry: _World, deadline: float) -> None:
        """Hand committed claims to the sink (after the tick's commit; never raises).

        ``deadline`` (event-loop time) ends the stage; it is shared by all
        worlds of a grouped tick, so a group's hand-off takes at most
        ``sink_timeout_seconds``.

        Accepted requests are marked handed off; a failing sink sends the
        request back to ``pending`` with ``attempts + 1`` and a backoff, or to
        ``failed`` after ``generation.maxAttempts``. Whatever is not done when
        the stage's time is up (or when the database fails) stays in the
        outbox for the next tick, and is handed out again with the same
        idempotency key.
        """
        ctx = entry.context
        config = ctx.config
        limit = max(config.generation.max_in_flight_per_world, config.max_job_ops_per_step, 1)
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            return  # out of time: the requests wait for the next tick (outbox_pending stays)
        try:
            async with self.store.connect() as conn:
                batch = await self.store.outbox(conn, ctx.world_id, limit)
            accepted: list[int] = []
            failed: list[tuple[GenerationRequest, str]] = []
            for request in batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        result = self.sink(request)
                        if inspect.isawaitable(result):
                            await result
                except TimeoutError:
                    failed.append((request, f"sink timed out (hand-off stage budget {self.sink_timeout_seconds:g}s)"))
                except Exception as exc:
                    failed.append((request, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))
                else:
                    accepted.append(request.id)
            async with self.store.transaction() as conn:
                await self.store.mark_handed_off(conn, ctx.world_id, accepted)
                for request, error in failed:
                    decision = gen_logic.retry_after_failure(
                        request.attempts,
                        max_attempts=config.generation.max_attempts,
                        backoff_base_seconds=config.generation.retry_backoff_seconds,
                        time_scale=config.time_scale,
                        world_time=ctx.current_world_time,
                    )
                    await self.store.mark_handoff_failed(conn, ctx.world_id, request.id, decision, error)
                    log.warning(
                        "generation hand-off failed",
                        world_id=ctx.world_id,
                        request_id=request.id,
                        attempts=decision.attempts,
                        gave_up=decision.failed,
                        retry_at_world_time=decision.not_before,
                        error=error,
                    )
        except Exception as exc:
            log.error(
                "generation hand-off interrupted; requests stay in the outbox",
                world_id=ctx.world_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        entry.outbox_pending = len(batch) >= limit or len(accepted) + len(failed) < len(batch)
        if accepted:
            log.info("generation requests handed off", world_id=ctx.world_id, count=len(accepted), request_ids=accepted)


@dataclass(slots=True)
class _Planned:
    """A world's tick between planning and commit."""

    index: int  # position in the tick_worlds request
    entry: _World
    plan: AdvancePlan
    started: float  # perf_counter at planning, for duration_ms
    wall_at_start: datetime  # wall time the tick's world time corresponds to (for humans)
    # Log events of the tick body, emitted by _apply only once it committed
    # (the body may be rolled back and re-run): (level, event, fields).
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)


@dataclass(slots=True)
class _Body:
    """A world's tick body before its NPC and clock writes."""

    outcome: TickOutcome
    due: list[NpcState]
    decisions: list[NpcDecision]
    claim: ClaimResult


@dataclass(frozen=True, slots=True)
class _Assigned:
    """A tier assignment computed inside a transaction, for the context to adopt after the commit."""

    assignment: TierAssignment
    counts: dict[Tier, int]  # population per tier, quarantined rows counted as frozen
    sessions: list[SessionView]
    activities: dict[str | None, int]
    quarantined: dict[int, str]
    changed: int


@dataclass(frozen=True, slots=True)
class _GroupReads:
    """What a grouped tick reads once for all its worlds, before their bodies (by world id)."""

    due: Mapping[int, list[NpcState]]  # due NPCs, in decision order
    quarantined: Mapping[int, list[QuarantinedNpc]]  # rows the selection found undecidable
    pending: Mapping[int, DueWork]  # chain steps / generation claims to do
    waiting: Mapping[int, Mapping[Tier, float]]  # worlds with a full budget: oldest left waiting per tier


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _world_stats(world: _World) -> dict[str, Any]:
    stats = world.context.get_stats()
    stats["lease_owner"] = world.lease.owner if world.lease else None
    stats["lease_epoch"] = world.lease.epoch if world.lease else None
    return stats


def _count_tiers(due: list[NpcState], now: float, outcome: TickOutcome) -> None:
    for npc in due:
        outcome.npcs_per_tier[npc.tier] = outcome.npcs_per_tier.get(npc.tier, 0) + 1
        lag = now - npc.next_decision_at
        if lag > outcome.decision_lag_per_tier.get(npc.tier, -1.0):
            outcome.decision_lag_per_tier[npc.tier] = lag


def _track_changes(
    due: Sequence[NpcState], decisions: Sequence[NpcDecision], relevant: frozenset[str], outcome: TickOutcome
) -> None:
    """Activity count changes, and whether a move can change someone's tier."""
    delta = outcome.activity_delta
    for npc, decision in zip(due, decisions, strict=True):
        if npc.current_activity != decision.current_activity:
            delta[npc.current_activity] = delta.get(npc.current_activity, 0) - 1
            delta[decision.current_activity] = delta.get(decision.current_activity, 0) + 1
        if npc.location != decision.location and (npc.location in relevant or decision.location in relevant):
            outcome.tier_inputs_moved = True


def _log_lag_transition(ctx: WorldSimulationContext, was_lagging: frozenset[Tier]) -> None:
    """WARNING once when a world starts lagging, INFO once when it recovers."""
    lags = {t.label: round(v, 1) for t, v in sorted(ctx.decision_lag_per_tier.items())}
    if ctx.lagging_tiers and not was_lagging:
        log.warning(
            "npc decision budget too small: decisions lag behind",
            lagging_tiers=[t.label for t in sorted(ctx.lagging_tiers)],
            decision_lag_seconds=lags,
            max_npc_ticks_per_step=ctx.config.max_npc_ticks_per_step,
            hint="raise maxNpcTicksPerStep or the lower tiers' decisionIntervalSeconds, or lower their maxNpcs",
        )
    elif was_lagging and not ctx.lagging_tiers:
        log.info("npc decision lag recovered", decision_lag_seconds=lags)


def _log_quarantine(world_id: int, before: Mapping[int, str], after: Mapping[int, str]) -> None:
    """WARNING once per NPC row entering quarantine, INFO once when it leaves."""
    for npc_id, problem in after.items():
        if npc_id not in before:
            log.warning("npc quarantined: its row cannot be decided", world_id=world_id, npc_id=npc_id, problem=problem)
    for npc_id in before.keys() - after.keys():
        log.info("npc released from quarantine", world_id=world_id, npc_id=npc_id)
