"""Which worlds the scheduler ticks: registration, config reloads, resync after an unknown commit, stats.

A world is registered once its stored row, config and behaviour are valid;
its state row is created if missing, and its tiers are assigned (see
:mod:`.tiers`) before its first tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scheduler_daemon.context import WorldSimulationContext
from scheduler_daemon.logs import get_logger
from scheduler_daemon.scheduler.base import SchedulerBase
from scheduler_daemon.scheduler.results import WorldNotRegisteredError, _World
from scheduler_daemon.simulation.behavior import BehaviorContent, parse_behavior
from scheduler_daemon.store.errors import LeaseLostError, WorldNotFoundError
from scheduler_daemon.store.leases import Lease
from scheduler_daemon.store.worlds import WorldRecord
from scheduler_daemon.world_config import WorldConfig, parse_world_config

log = get_logger("scheduler_daemon.scheduler")


class WorldRegistry(SchedulerBase):
    """Registers, reloads, resynchronises and unregisters worlds."""

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
                    last_advanced_at=record.last_advanced_at,
                )
                entries[world_id] = _World(ctx, behavior, lease=lease)
            assigned = await self._compute_tiers(conn, entries, None) if entries else {}
        if created:
            log.info("world_state_rows_created", world_ids=created)
        for world_id, entry in entries.items():
            self._adopt_tiers(entry, assigned[world_id])
            self._worlds[world_id] = entry
            ctx, config = entry.context, entry.context.config
            log.info(
                "world_registered",
                world_id=world_id,
                name=records[world_id].name,
                world_time=ctx.current_world_time,
                time_scale=config.time_scale,
                tick_interval_seconds=config.tick_interval_seconds,
                paused=config.pause_simulation,
                lease_epoch=entry.lease.epoch if entry.lease else None,
            )
            answers[world_id] = ctx
        if entries:
            self.registrations += 1
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
            try:
                await self._assign_tiers(entry, None)
            except LeaseLostError:
                # Another instance owns the world now and assigns its tiers; our next tick's fence drops it.
                log.info("tiers_skipped_lease_lost", world_id=world_id)
        log.info(
            "world_config_applied",
            world_id=world_id,
            config_version=record.config_version,
            time_scale=config.time_scale,
            paused=config.pause_simulation,
        )
        return entry.context

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
        log.warning("world_state_resynchronised", world_id=world_id, world_time=record.world_time, ticks=record.ticks)
        return entry.context

    async def restore_missing_state(self, world_id: int) -> bool:
        """Recreate a registered world's deleted ``world_states`` row from its last committed clock.

        Returns False (nothing written) when the row exists. The world's
        lease, if it has one, is put on the new row, so its fenced ticks go on.
        A world deleted meanwhile: :class:`~scheduler_daemon.store.errors.WorldNotFoundError`.
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
                "world_state_row_recreated",
                world_id=world_id,
                world_time=ctx.current_world_time,
                ticks=ctx.ticks_processed,
            )
        return restored

    async def unregister_world(self, world_id: int) -> None:
        """Stop tracking a world. Its state is already persisted by every committed tick."""
        entry = self._worlds.pop(world_id, None)
        if entry is not None:
            self.registrations += 1
            log.info(
                "world_unregistered",
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


def _world_stats(world: _World) -> dict[str, Any]:
    stats = world.context.get_stats()
    stats["lease_owner"] = world.lease.owner if world.lease else None
    stats["lease_epoch"] = world.lease.epoch if world.lease else None
    return stats
