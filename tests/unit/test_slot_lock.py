"""The runner's per-world lock and its batch limit: exclusive, FIFO, and safe when a waiter is cancelled."""

from __future__ import annotations

import asyncio

import pytest

from scheduler_daemon.runner.sync import ResizableLimit, SlotLock


async def test_uncontended_acquire_is_immediate_and_exclusive() -> None:
    lock = SlotLock()
    assert lock.try_acquire() and lock.locked()
    assert not lock.try_acquire()
    lock.release()
    assert not lock.locked()
    async with lock:
        assert lock.locked()
    assert not lock.locked()


async def test_waiters_get_the_lock_in_arrival_order_and_it_is_never_shared() -> None:
    lock = SlotLock()
    order: list[int] = []
    holders = 0

    async def worker(n: int) -> None:
        nonlocal holders
        async with lock:
            holders += 1
            assert holders == 1
            order.append(n)
            await asyncio.sleep(0)
            holders -= 1

    assert lock.try_acquire()
    tasks = [asyncio.create_task(worker(n)) for n in range(5)]
    await asyncio.sleep(0)  # all five are queued now
    assert not lock.try_acquire()  # queued waiters go first, even for a free-looking lock
    lock.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()


async def test_a_cancelled_waiter_neither_takes_nor_strands_the_lock() -> None:
    lock = SlotLock()
    assert lock.try_acquire()
    cancelled = asyncio.create_task(lock.acquire())
    after = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    lock.release()  # the cancelled waiter is skipped; the next one gets the lock
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(after, 1.0)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


async def test_a_waiter_cancelled_after_the_hand_over_passes_the_lock_on() -> None:
    lock = SlotLock()
    assert lock.try_acquire()
    first = asyncio.create_task(lock.acquire())
    second = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)
    lock.release()  # hands over to `first`, which is cancelled before it runs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


async def test_the_batch_limit_hands_permits_over_in_order_and_skips_cancelled_waiters() -> None:
    limit = ResizableLimit(1)
    assert limit.try_acquire() and not limit.try_acquire()
    order: list[int] = []

    async def batch(n: int) -> None:
        await limit.acquire()
        order.append(n)
        limit.release()

    tasks = [asyncio.create_task(batch(n)) for n in range(4)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    limit.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 2, 3]
    assert limit.try_acquire() and not limit.try_acquire()  # exactly the one permit is left
    limit.release()


async def test_a_batch_cancelled_after_the_hand_over_passes_its_permit_on() -> None:
    limit = ResizableLimit(1)
    assert limit.try_acquire()
    first = asyncio.create_task(limit.acquire())
    second = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    limit.release()  # hands over to `first`, which is cancelled before it runs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)
    assert not limit.try_acquire()
    limit.release()
    assert limit.try_acquire()
