"""A private event loop in a background thread, for an async client used from plain
code: an async HTTP client must stay on the loop that made it, and Ray actors call
stages from ordinary threads."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """One event loop running forever in a daemon thread until :meth:`stop`."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="raypipe-llm-loop", daemon=True
        )
        self.thread.start()

    def on_loop(self) -> bool:
        return threading.current_thread() is self.thread

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it (from any other thread)."""
        if self.on_loop():
            coro.close()
            raise RuntimeError(f"{self.owner}: call the async methods from its own loop")
        if self.closed:
            coro.close()
            raise RuntimeError(f"{self.owner} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def bridge(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the loop, from any event loop (this one included)."""
        if self.on_loop():
            return await coro
        if self.closed:
            coro.close()
            raise RuntimeError(f"{self.owner} is closed")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self, shutdown: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Run ``shutdown()`` on the loop (at most 10 s), then stop it (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.on_loop():
            self.loop.call_soon(self.loop.stop)
            return
        if shutdown is not None:
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
            except Exception as e:  # closing must not mask the caller's own error
                log.debug("closing %s failed: %s", self.owner, type(e).__name__)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


async def cancel_others() -> None:
    """Cancel every other task of the running loop and wait for them: calls still
    running (from other threads) end as cancelled instead of hanging."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
