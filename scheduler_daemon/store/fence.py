"""``Fence``: the token a tick's writes are fenced on when several daemons share the database."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fence:
    """Owner and epoch of the lease a write is made under: the row must still carry both.

    A :class:`~scheduler_daemon.store.leases.Lease` gives its own (``lease.fence``).
    """

    owner: str
    epoch: int
