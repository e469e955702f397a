"""Game work a tick carries besides NPCs: firing due chain steps, handing claimed generation requests out.

Chain steps fire inside the tick's transaction (they commit with the world
time they happened at). Generation requests claimed by a tick are handed to
the sink only after its COMMIT (transactional outbox).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler_daemon.context import WorldSimulationContext
from scheduler_daemon.logs import get_logger
from scheduler_daemon.scheduler.base import SchedulerBase
from scheduler_daemon.scheduler.results import _World
from scheduler_daemon.simulation import chains as chain_logic
from scheduler_daemon.simulation import generation as gen_logic
from scheduler_daemon.store.chains import ChainUpdate
from scheduler_daemon.store.generation import GenerationRequest

log = get_logger("scheduler_daemon.scheduler")


class ChainsAndGeneration(SchedulerBase):
    """Advances a world's due chains (in the tick) and hands its outbox to the sink (after it)."""

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
                    "chain_steps_fired",
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
                    "chains_failed",
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
                        "generation_handoff_failed",
                        world_id=ctx.world_id,
                        request_id=request.id,
                        attempts=decision.attempts,
                        gave_up=decision.failed,
                        retry_at_world_time=decision.not_before,
                        error=error,
                    )
        except Exception as exc:
            log.error(
                "generation_handoff_interrupted",
                world_id=ctx.world_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        entry.outbox_pending = len(batch) >= limit or len(accepted) + len(failed) < len(batch)
        if accepted:
            log.info("generation_handed_off", world_id=ctx.world_id, count=len(accepted), request_ids=accepted)
