"""A client's in-flight slots: how many requests it has out at once.

The number of slots follows the job's adaptive in-flight limit
(:class:`raypipe.llm.limits.JobLimiter`), never above ``llm.concurrency``; when the
limit is cut, requests already out finish, and no new one starts until the count is
under the new limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque


class Slots:
    """Up to ``limit`` requests in flight; retries are served before first attempts.

    A retried request has already waited (its backoff); putting it behind every
    request not yet started would make the slowest request of a batch slower still.
    """

    def __init__(self, limit: int) -> None:
        self.ceiling = limit
        self.limit = limit
        self.busy = 0
        self._retries: deque[asyncio.Future[None]] = deque()
        self._firsts: deque[asyncio.Future[None]] = deque()

    def set_limit(self, limit: float) -> None:
        """The job's limit changed: at least 1, at most ``llm.concurrency``."""
        self.limit = max(1, min(self.ceiling, math.floor(limit)))
        self._hand_out()

    async def acquire(self, retry: bool) -> None:
        if self.busy < self.limit and not self._retries and not self._firsts:
            self.busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        (self._retries if retry else self._firsts).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    (self._retries if retry else self._firsts).remove(waiter)
            raise

    def release(self) -> None:
        self.busy -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        for queue in (self._retries, self._firsts):
            while queue and self.busy < self.limit:
                waiter = queue.popleft()
                if not waiter.done():
                    self.busy += 1
                    waiter.set_result(None)
