"""A clock driven by hand, for the LLM limiter's tests: no assert depends on how fast a
shared machine runs."""

from __future__ import annotations

import asyncio


class FakeClock:
    """``now()`` and ``sleep()`` that move only when the test calls ``advance``."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.t + seconds, future))
        await future

    async def settle(self) -> None:
        """Let every task that can run, run (until all wait on the clock or an event)."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        for when, future in list(self.sleepers):
            if future.done():
                self.sleepers.remove((when, future))
            elif when <= self.t + 1e-9:
                future.set_result(None)
                self.sleepers.remove((when, future))
        await self.settle()
