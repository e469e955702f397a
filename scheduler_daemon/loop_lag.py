"""``LoopLagMonitor``: how late the event loop wakes a periodic sleeper (its responsiveness)."""

from __future__ import annotations

import asyncio
from collections import deque


class LoopLagMonitor:
    """Samples the event loop's wake-up lag every ``interval`` seconds over a short window."""

    def __init__(self, interval: float = 0.1, window: int = 10) -> None:
        self.interval = interval
        self._samples: deque[float] = deque(maxlen=window)
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_seconds(self) -> float:
        """Worst lag over the recent window (0 before the first sample)."""
        return max(self._samples, default=0.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            self._samples.append(max(loop.time() - started - self.interval, 0.0))

    def start(self) -> None:
        """Start sampling in a background task."""
        self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
