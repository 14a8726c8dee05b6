"""Time, injected. Every policy that waits or measures reads a Clock, so tests can run backoff and
breaker resets without sleeping."""

from __future__ import annotations

import asyncio
import time


class Clock:
    """The real clock: monotonic seconds and asyncio sleeps."""

    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, fn, *args) -> asyncio.Handle:
        """`sleep` for code that runs without a coroutine (the Redis path): fn(*args) after `seconds`."""
        return asyncio.get_running_loop().call_later(seconds, fn, *args)


class ManualClock(Clock):
    """A clock that only moves when told to, or when someone sleeps on it (which returns at once).

    `sleeps` records every requested sleep, so a test can assert the backoff schedule.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:  # type: ignore[override]
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)

    def call_later(self, seconds: float, fn, *args) -> asyncio.Handle:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        return asyncio.get_running_loop().call_soon(fn, *args)


REAL = Clock()
