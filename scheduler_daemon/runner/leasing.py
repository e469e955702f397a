"""Lease balancing (several daemons on one PostgreSQL): claim up to the fair share, shed surplus, drop lost worlds."""

from __future__ import annotations

from scheduler_daemon.logs import get_logger
from scheduler_daemon.runner.base import RunnerBase
from scheduler_daemon.runner.state import Slot

log = get_logger("scheduler_daemon.runner")


class LeaseBalancing(RunnerBase):
    """Ticks only worlds whose lease this daemon holds (with a :class:`~scheduler_daemon.leasing.LeaseKeeper`)."""

    async def _balance(self, active: dict[int, int]) -> dict[int, int]:
        """Heartbeat, give up inactive and surplus worlds, claim up to the fair share.

        Returns the active worlds whose lease we hold: the ones to tick.
        """
        keeper = self.leases
        assert keeper is not None
        await keeper.heartbeat()
        gone = [w for w in keeper.held if w not in active]
        if gone:
            await self._give_up(gone, reason="inactive")
        share = keeper.compute_fair_share(len(active))
        surplus = keeper.leases_held - share
        if surplus > 0:
            # Shed at a tick boundary: remove_world waits for an in-flight tick.
            # Idle and isolated worlds go first, then the highest ids.
            order = sorted(keeper.held, key=lambda w: (w not in self.broken, self._is_in_flight(w), -w))
            await self._give_up(order[:surplus], reason="surplus")
        elif surplus < 0:
            await keeper.claim([w for w in active if w not in keeper.held], -surplus)
        return {w: v for w, v in active.items() if w in keeper.held}

    def _is_in_flight(self, world_id: int) -> bool:
        slot = self._slots.get(world_id)
        return slot is not None and slot.in_flight

    async def _give_up(self, world_ids: list[int], *, reason: str) -> None:
        assert self.leases is not None
        for world_id in world_ids:
            await self.remove_world(world_id)
            self.broken.pop(world_id, None)
        await self.leases.release(world_ids, reason=reason)

    async def _lose_world(self, world_id: int, reason: str) -> None:
        """Another instance owns the world now: stop ticking it (after an in-flight tick)."""
        assert self.leases is not None
        if self.leases.forget_lost(world_id, reason):
            self.broken.pop(world_id, None)
            await self.remove_world(world_id)

    async def _drop_lost_in_tick(self, slot: Slot, reason: str) -> None:
        """Drop a world whose lease was lost, from inside its own tick (the slot lock is held)."""
        assert self.leases is not None
        self.leases.forget_lost(slot.world_id, reason)
        await self._unregister_held(slot)

    async def _keep_leases(self) -> None:
        """Background task: heartbeat and renew every TTL/3; drop worlds whose lease was lost."""
        keeper = self.leases
        assert keeper is not None
        while True:
            await self.clock.sleep_until(self.clock.now() + keeper.renew_interval_seconds)
            try:
                await keeper.heartbeat()
                lost = await keeper.renew()
            except Exception as exc:
                # Keep ticking: the leases are still ours until the TTL runs
                # out, and the fence stops our writes once someone else claims.
                log.error("lease_renewal_failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
                continue
            for world_id in lost:
                await self._lose_world(world_id, reason="renewal")
