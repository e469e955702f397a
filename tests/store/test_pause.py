"""Pause takes effect before it answers: the answer's world time is the frozen one (both backends).

Through the real app (httpx ASGI transport) and a real database; first on a
virtual clock (exact), then with the runner's own loop running on the real
clock, many times, so a pause meets ticks in every phase (in flight, queued,
just done).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from scheduler_daemon.http.routes import create_app
from scheduler_daemon.runner import RunnerLimits, SchedulerLoopRunner
from scheduler_daemon.scheduler import WorldScheduler
from scheduler_daemon.simulation.npc import Tier
from scheduler_daemon.store.repository import Store
from tests.store.test_http_api import AUTH, TOKEN, Api, make_api
from tests.support.helpers import make_world, world_state


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    admin, runner, clock = make_api(store)
    transport = httpx.ASGITransport(app=create_app(admin, token=lambda: TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
        yield Api(client, runner, clock, store, admin.metrics, admin)


async def test_pause_between_ticks_answers_with_the_time_it_froze_at(api: Api) -> None:
    world_id, _ = await make_world(api.store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2})
    await api.runner.add_world(world_id)
    await api.runner.run_until(2.0)
    assert await world_state(api.store, world_id) == (pytest.approx(120.0), 2)
    api.clock.set(2.5)  # half way to the next tick
    base = f"/api/v1/worlds/{world_id}/scheduler"
    r = await api.client.post(f"{base}/pause")
    assert r.status_code == 200, r.text
    # The half second before the pause accrued at the old rate, and is committed already.
    assert r.json()["worldTime"] == pytest.approx(150.0)
    frozen = await world_state(api.store, world_id)
    assert frozen == (pytest.approx(150.0), 3)
    await api.runner.run_until(10.0)
    assert await world_state(api.store, world_id) == frozen  # no tick moved or wrote it
    again = await api.client.post(f"{base}/pause")  # idempotent: nothing more to commit
    assert again.json()["worldTime"] == pytest.approx(150.0)
    assert await world_state(api.store, world_id) == frozen
    resumed = await api.client.post(f"{base}/resume")
    assert resumed.json()["worldTime"] == pytest.approx(150.0)
    await api.runner.run_until(11.0)  # resuming never jumps: one second at 60 from the resume
    assert (await world_state(api.store, world_id))[0] == pytest.approx(210.0)


async def test_a_config_write_that_pauses_takes_effect_before_it_answers(api: Api) -> None:
    # PUT …/scheduler/config with pauseSimulation: true is a pause too: same guarantee as POST …/pause.
    world_id, _ = await make_world(api.store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2})
    await api.runner.add_world(world_id)
    await api.runner.run_until(2.0)
    api.clock.set(2.5)
    r = await api.client.put(f"/api/v1/worlds/{world_id}/scheduler/config", json={"pauseSimulation": True})
    assert r.status_code == 200, r.text
    frozen = await world_state(api.store, world_id)
    assert frozen == (pytest.approx(150.0), 3)  # the half second before the pause, committed already
    await api.runner.run_until(10.0)
    assert await world_state(api.store, world_id) == frozen
    # Another change of a paused world commits nothing more.
    r = await api.client.put(f"/api/v1/worlds/{world_id}/scheduler/config", json={"timeScale": 120})
    assert r.status_code == 200, r.text
    await api.runner.run_until(12.0)
    assert await world_state(api.store, world_id) == frozen


async def test_an_ingest_patch_that_pauses_takes_effect_before_it_answers(api: Api) -> None:
    # PATCH /api/v1/worlds/{id} with simulation.pauseSimulation: true is a pause too.
    world_id, _ = await make_world(api.store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2})
    await api.runner.add_world(world_id)
    await api.runner.run_until(2.0)
    api.clock.set(2.5)
    r = await api.client.patch(f"/api/v1/worlds/{world_id}", json={"simulation": {"pauseSimulation": True}})
    assert r.status_code == 200, r.text
    frozen = await world_state(api.store, world_id)
    assert frozen == (pytest.approx(150.0), 3)  # the half second before the pause, committed already
    await api.runner.run_until(10.0)
    assert await world_state(api.store, world_id) == frozen


async def test_a_pause_whose_clock_cannot_be_committed_is_503_and_pause_again_freezes(api: Api) -> None:
    from tests.support.helpers import drop_trigger, install_failing_trigger

    world_id, _ = await make_world(api.store, simulation={"timeScale": 60}, npcs_per_tier={Tier.DETAILED: 2})
    await api.runner.add_world(world_id)
    await api.runner.run_until(2.0)
    api.clock.set(2.5)
    base = f"/api/v1/worlds/{world_id}/scheduler"
    await install_failing_trigger(api.store, "world_states", world_id)
    try:
        r = await api.client.post(f"{base}/pause")
    finally:
        await drop_trigger(api.store, "world_states")
    assert r.status_code == 503 and "call pause again" in r.json()["detail"], r.text
    assert (await api.client.get(f"{base}/config")).json()["pauseSimulation"] is True  # paused all the same
    assert await world_state(api.store, world_id) == (pytest.approx(120.0), 2)
    r = await api.client.post(f"{base}/pause")
    assert r.status_code == 200 and r.json()["worldTime"] == pytest.approx(150.0), r.text
    frozen = await world_state(api.store, world_id)
    assert frozen == (pytest.approx(150.0), 3)
    await api.runner.run_until(10.0)
    assert await world_state(api.store, world_id) == frozen


async def test_a_pause_after_the_lease_was_lost_answers_as_for_a_world_run_elsewhere(pg_store: Store) -> None:
    from scheduler_daemon.clock import VirtualClock
    from tests.store.test_leases import TTL, DbClock, lease_runner

    db_clock, clock_a = DbClock(), VirtualClock()
    world_id, _ = await make_world(pg_store, simulation={"timeScale": 60, "alwaysOn": True})
    runner_a = lease_runner(pg_store, "a", db_clock, clock_a)
    runner_b = lease_runner(pg_store, "b", db_clock, VirtualClock())
    admin, _, _ = make_api(pg_store)
    admin.scheduler, admin.runner = runner_a.scheduler, runner_a
    await runner_a.discover()
    await runner_a.run_until(1.0)
    db_clock.advance(TTL + 1)
    await runner_b.discover()  # B owns the world now; A learns it at its next write
    clock_a.set(1.5)
    transport = httpx.ASGITransport(app=create_app(admin, token=lambda: TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as client:
        r = await client.post(f"/api/v1/worlds/{world_id}/scheduler/pause")
    # As for any world this daemon does not run: the stored time (its owner applies the pause), not a 500.
    assert r.status_code == 200 and r.json()["worldTime"] == pytest.approx(60.0), r.text
    assert runner_a.world_ids == [] and runner_a.get_stats()["leases"]["lease_lost"] == 1
    assert await world_state(pg_store, world_id) == (pytest.approx(60.0), 1)


async def test_pause_with_the_loop_running_never_lets_a_tick_through(store: Store) -> None:
    scheduler = WorldScheduler(store)
    runner = SchedulerLoopRunner(scheduler, store, limits=RunnerLimits(discovery_interval_seconds=0.2))
    # One world paused and resumed over and over, one always running (its ticks show the loop moving on).
    sim = {"timeScale": 600, "tickIntervalSeconds": 0.02, "maxCatchUpSeconds": 1, "alwaysOn": True}
    paused_world, _ = await make_world(store, name="paused", simulation=sim, npcs_per_tier={Tier.DETAILED: 2})
    witness, _ = await make_world(store, name="witness", simulation=sim)
    admin, _, _ = make_api(store)
    admin.scheduler, admin.runner = scheduler, runner
    transport = httpx.ASGITransport(app=create_app(admin, token=lambda: TOKEN))
    loop = asyncio.get_running_loop()

    async def witness_ticks_past(n: int) -> None:
        deadline = loop.time() + 30
        while (await world_state(store, witness))[1] < n:
            assert loop.time() < deadline, "the loop stopped ticking"
            await asyncio.sleep(0.005)

    task = asyncio.create_task(runner.start())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as client:
            base = f"/api/v1/worlds/{paused_world}/scheduler"
            await witness_ticks_past(1)
            for _ in range(25):
                r = await client.post(f"{base}/pause")
                assert r.status_code == 200, r.text
                answered = r.json()["worldTime"]
                after_pause = await world_state(store, paused_world)
                assert after_pause[0] == answered
                # More than two of its tick intervals pass: the witness ticks three more times.
                await witness_ticks_past((await world_state(store, witness))[1] + 3)
                assert await world_state(store, paused_world) == after_pause
                assert scheduler.get_context(paused_world).current_world_time == answered
                r = await client.post(f"{base}/resume")
                assert r.status_code == 200 and r.json()["worldTime"] == answered
                # Let it run a little before the next pause: a tick after the resume.
                ticks = after_pause[1]
                deadline = loop.time() + 30
                while (await world_state(store, paused_world))[1] <= ticks:
                    assert loop.time() < deadline, "the resumed world did not tick"
                    await asyncio.sleep(0.002)
    finally:
        runner.stop()
        await task
        await runner.shutdown()
