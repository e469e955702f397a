"""``LeaseKeeper``: this daemon's side of sharing worlds through PostgreSQL leases.

It remembers which leases we hold (with their fencing epochs), when each one
is valid until on *our* monotonic clock, and the counters operators watch.
The statements themselves are in :mod:`scheduler_daemon.store.leases`; the
runner decides when to claim, renew, shed and drop.

Local validity: a renewal sent at monotonic time ``t`` keeps a lease valid
until ``t + ttl`` for us, which is never later than its expiry in the
database (the database computed it after receiving the request). A daemon
whose loop was frozen (SIGSTOP, VM pause) sees its leases locally expired on
waking and re-validates each one before ticking; the database fence makes
the outcome safe either way.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from scheduler_daemon.clock import Clock
from scheduler_daemon.logs import get_logger
from scheduler_daemon.store.leases import Lease, LeaseStore

log = get_logger("scheduler_daemon.leasing")


@dataclass(slots=True)
class HeldLease:
    """A lease we hold and until when (our monotonic clock) it is surely still ours."""

    lease: Lease
    valid_until: float


class LeaseObserver(Protocol):
    """Receives lease claims and losses (the metrics implement this)."""

    def lease_claimed(self, world_id: int) -> None: ...

    def lease_lost(self, world_id: int) -> None: ...


class LeaseKeeper:
    """Claims, renews and releases this instance's world leases; counts what happens."""

    def __init__(self, store: LeaseStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.held: dict[int, HeldLease] = {}
        self.live_instances = 1
        self.fair_share = 0
        #: Counters for metrics (``worldsched_lease_claims_total``, ``worldsched_lease_lost_total``).
        self.lease_claims = 0
        self.lease_lost = 0
        #: Told about every claim and loss (the daemon's Prometheus metrics).
        self.observer: LeaseObserver | None = None
        self.lease_releases = 0
        self.renewals_overdue = 0

    @property
    def instance_id(self) -> str:
        return self.store.instance_id

    @property
    def ttl_seconds(self) -> float:
        return self.store.ttl_seconds

    @property
    def renew_interval_seconds(self) -> float:
        """Renew every TTL/3: two renewals can fail before a lease expires."""
        return self.store.ttl_seconds / 3.0

    @property
    def leases_held(self) -> int:
        """Gauge ``worldsched_leases_held``."""
        return len(self.held)

    def lease_for(self, world_id: int) -> Lease | None:
        held = self.held.get(world_id)
        return held.lease if held else None

    def compute_fair_share(self, active_worlds: int) -> int:
        """Active worlds ÷ live instances, rounded up."""
        self.fair_share = math.ceil(active_worlds / max(self.live_instances, 1))
        return self.fair_share

    # ------------------------------------------------------------ database
    async def heartbeat(self) -> int:
        """Refresh our instance row; returns (and remembers) the number of live instances."""
        self.live_instances = await self.store.heartbeat()
        return self.live_instances

    async def claim(self, candidates: Collection[int], limit: int) -> list[Lease]:
        """Claim up to ``limit`` free or expired leases among ``candidates``."""
        sent = self.clock.now()
        leases = await self.store.claim(candidates, limit)
        for lease in leases:
            self.held[lease.world_id] = HeldLease(lease, sent + self.ttl_seconds)
        self.lease_claims += len(leases)
        if self.observer is not None:
            for lease in leases:
                self.observer.lease_claimed(lease.world_id)
        if leases:
            log.info(
                "leases_claimed",
                worlds=[lease.world_id for lease in leases],
                epochs=[lease.epoch for lease in leases],
                held=len(self.held),
                fair_share=self.fair_share,
                live_instances=self.live_instances,
            )
        return leases

    async def held_elsewhere(self, world_ids: Collection[int]) -> set[int]:
        """Of ``world_ids``, the worlds another live instance owns (their changes are its to apply)."""
        return await self.store.held_elsewhere(world_ids)

    async def renew(self, world_ids: Iterable[int] | None = None) -> list[int]:
        """Renew our leases; returns the world ids found lost.

        By default only the leases that a tick has not renewed within the
        last third of the TTL. Lost leases stay in :attr:`held` until
        :meth:`forget_lost` so the caller can stop the world first.
        """
        if world_ids is None:
            due = self.clock.now() + self.ttl_seconds - self.renew_interval_seconds
            world_ids = [w for w, h in self.held.items() if h.valid_until <= due]
        snapshot = [self.held[w] for w in world_ids if w in self.held]
        if not snapshot:
            return []
        sent = self.clock.now()
        result = await self.store.renew([h.lease for h in snapshot])
        lost = []
        for h in snapshot:
            if self.held.get(h.lease.world_id) is not h:
                continue  # released or replaced meanwhile
            if h.lease.world_id in result.renewed:
                h.valid_until = sent + self.ttl_seconds
            elif h.lease.world_id in result.lost:
                lost.append(h.lease.world_id)
        return lost

    def renewed_by_tick(self, world_id: int, started: float) -> None:
        """A fenced tick that began at monotonic ``started`` committed: it renewed the lease too."""
        held = self.held.get(world_id)
        if held is not None:
            held.valid_until = max(held.valid_until, started + self.ttl_seconds)

    def is_valid(self, world_id: int) -> bool:
        """Whether our last renewal still covers this lease on the local monotonic clock."""
        held = self.held.get(world_id)
        return held is not None and self.clock.now() < held.valid_until

    def check_overdue(self, world_id: int) -> bool:
        """Note (log, count) a lease our renewals no longer cover; True if overdue.

        The tick goes ahead anyway: its fence statement checks owner and epoch
        in the database and renews the lease in one step, so a lease that was
        taken over writes nothing and one that was not is kept.
        """
        held = self.held.get(world_id)
        if held is None or self.clock.now() < held.valid_until:
            return False
        self.renewals_overdue += 1
        log.warning(
            "lease_renewal_overdue",
            world_id=world_id,
            overdue_seconds=round(self.clock.now() - held.valid_until, 3),
        )
        return True

    def forget_lost(self, world_id: int, reason: str) -> bool:
        """Drop a lease another instance took; counts it. False if we did not hold it."""
        held = self.held.pop(world_id, None)
        if held is None:
            return False
        self.lease_lost += 1
        if self.observer is not None:
            self.observer.lease_lost(world_id)
        log.warning(
            "lease_lost",
            world_id=world_id,
            epoch=held.lease.epoch,
            reason=reason,
            lease_lost_total=self.lease_lost,
        )
        return True

    async def release(self, world_ids: Iterable[int], reason: str) -> None:
        """Give leases up so a peer can claim them at once."""
        leases = [self.held.pop(w).lease for w in list(world_ids) if w in self.held]
        if not leases:
            return
        released = await self.store.release(leases)
        self.lease_releases += len(released)
        log.info("leases_released", worlds=sorted(released), reason=reason, held=len(self.held))

    async def leave(self) -> None:
        """Clean shutdown: release every lease and remove our heartbeat row.

        Bounded by the TTL: a database that does not answer must not hold the
        shutdown up; the leases then simply expire.
        """
        try:
            async with asyncio.timeout(self.ttl_seconds):
                await self.release(list(self.held), reason="shutdown")
                await self.store.leave()
        except Exception as exc:
            # Peers then take the worlds over when the leases expire (TTL).
            log.error("lease_release_on_shutdown_failed", error=f"{type(exc).__name__}: {exc}")

    def stats(self) -> dict[str, Any]:
        """Lease state for ``get_stats()`` (admin API, ``top``)."""
        return {
            "instance_id": self.instance_id,
            "ttl_seconds": self.ttl_seconds,
            "live_instances": self.live_instances,
            "fair_share": self.fair_share,
            "leases_held": self.leases_held,
            "lease_claims": self.lease_claims,
            "lease_lost": self.lease_lost,
            "lease_releases": self.lease_releases,
            "renewals_overdue": self.renewals_overdue,
            "held": {wid: h.lease.epoch for wid, h in sorted(self.held.items())},
        }
