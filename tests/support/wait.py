"""Waiting for a condition instead of sleeping for a guess: tests hold on a busy machine because they
wait for the state itself, bounded by a deadline far above what an idle machine needs."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

DEADLINE = 30.0  # seconds: what an idle machine does in milliseconds, a loaded one does well within this


async def eventually(condition: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.02,
                     what: str | None = None) -> Any:
    """Poll `condition` (a function, or a coroutine function) until it returns something truthy, and
    return that. Fails the test with `what` when the deadline passes first."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or getattr(condition, '__name__', condition)}"
                                 f" (last: {last!r})")
        await asyncio.sleep(interval)


def eventually_sync(condition: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.02,
                    what: str | None = None) -> Any:
    """`eventually` for code outside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or condition} (last: {last!r})")
        time.sleep(interval)
