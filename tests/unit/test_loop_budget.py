"""LoopBudget: admin work over many worlds takes at most its share of the event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from scheduler_daemon.loop_budget import LoopBudget


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_many_clients_together_stay_within_the_share() -> None:
    budget = LoopBudget(0.25)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def client() -> None:
        await budget.map(list(range(10)), lambda _: _burn(0.002), chunk=2)  # 5 pieces of ~4 ms

    await asyncio.gather(*(client() for _ in range(4)))
    elapsed = loop.time() - started
    # 80 ms of work at a quarter of the loop takes at least about 240 ms of waiting in between.
    assert budget.busy_seconds >= 0.08
    assert elapsed >= budget.busy_seconds / 0.25 * 0.9


async def test_other_tasks_run_between_pieces() -> None:
    budget = LoopBudget(0.5)
    ran: list[int] = []

    async def ticker() -> None:
        for i in range(5):
            ran.append(i)
            await asyncio.sleep(0)

    async def admin() -> list[int]:
        return await budget.map(list(range(6)), lambda i: (_burn(0.001), i)[1], chunk=1)

    results, _ = await asyncio.gather(admin(), ticker())
    assert results == list(range(6))
    assert ran == list(range(5))  # the other task finished while the admin work was in pieces


async def test_a_call_is_charged_even_when_it_raises() -> None:
    budget = LoopBudget(0.5)

    def fail() -> None:
        _burn(0.002)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await budget.call(fail)
    assert budget.busy_seconds >= 0.002


@pytest.mark.parametrize("share", [0.0, -1.0, 1.5])
def test_share_must_be_a_fraction(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        LoopBudget(share)
