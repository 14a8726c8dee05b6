"""Total and attempt timeouts: both bound the wait for response headers.

Total sets the deadline of all tries and backoff; attempt bounds one try under the breaker and is cut
to what is left of the total, so the one timer always fires inside the breaker and counts. Body
streaming after the headers is bounded by the idle timeout in the listener instead. A fired timeout is a
Failure value, and the in-flight upstream call is cancelled, which releases its connection.

Attempt timeouts run on a coarse timer wheel (`Deadlines`): arming and disarming an asyncio timer per
attempt (asyncio.timeout) cost as much as the rest of the chain's policies together, while an attempt
timeout that fires up to 10 ms late changes nothing a caller can see.
"""

from __future__ import annotations

import asyncio
import math
import time

from proxy.clock import Clock
from proxy.exchange import Call, Handler, ProxyRequest, ProxyResponse, timeout_response
from proxy.settings.units import format_duration


class TotalTimeout:
    """Sets the request's deadline; it arms no timer of its own. Every attempt below is capped at what
    is left of it (AttemptTimeout) and retry never waits past it, so the total holds with one timer per
    attempt instead of two per request (asyncio timers cost ~15% of the hot path)."""

    __slots__ = ("seconds", "clock")

    def __init__(self, seconds: float, clock: Clock) -> None:
        self.seconds, self.clock = seconds, clock

    def start(self, req: Call, now: float | None = None) -> None:
        """Fix the request's deadline: `now` is when the proxy has the request (default: the clock now)."""
        seconds = self.seconds
        if req.timeout is not None:  # a per-request cap, never longer than the config's
            seconds = min(seconds, req.timeout)
        req.deadline = (self.clock.monotonic() if now is None else now) + seconds
        req.total = seconds

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        self.start(req)
        return await call_next(req)


class _Armed:
    __slots__ = ("slot", "task", "cancelling", "fired")

    def __init__(self, slot: int, task: asyncio.Task) -> None:
        self.slot, self.task = slot, task
        self.cancelling = task.cancelling()
        self.fired = False


class Deadlines:
    """Attempt deadlines in slots of `resolution` seconds, swept by one timer per event loop while any
    is armed. Arming is a dict lookup and a set insert; an expired attempt's task is cancelled and the
    policy turns that cancellation (and only that one) into a timeout."""

    def __init__(self, resolution: float = 0.01) -> None:
        self.resolution = resolution
        self._slots: dict[int, set[_Armed]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._swept = 0

    def arm(self, seconds: float) -> _Armed:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests): timers of the old one are gone
            self._loop, self._slots, self._handle = loop, {}, None
        # time.monotonic, not loop.time(): uvloop's is cached per loop iteration, in whole milliseconds,
        # and a deadline that fires before the request's own deadline would let a retry start after it
        now = time.monotonic()
        slot = int((now + seconds) / self.resolution) + 1
        a = _Armed(slot, asyncio.current_task())
        bucket = self._slots.get(slot)
        if bucket is None:
            bucket = self._slots[slot] = set()
        bucket.add(a)
        if self._handle is None:
            self._swept = int(now / self.resolution)
            self._handle = loop.call_later(self.resolution, self._sweep)
        return a

    def disarm(self, a: _Armed) -> None:
        bucket = self._slots.get(a.slot)
        if bucket is not None:
            bucket.discard(a)
            if not bucket:
                del self._slots[a.slot]

    def _sweep(self) -> None:
        loop = self._loop
        now = int(time.monotonic() / self.resolution)
        slots = self._slots
        if len(slots) < now - self._swept:
            due = [s for s in slots if s <= now]
        else:
            due = [s for s in range(self._swept + 1, now + 1) if s in slots]
        self._swept = now
        for s in due:
            for a in slots.pop(s):
                a.fired = True
                a.task.cancel()
        self._handle = loop.call_later(self.resolution, self._sweep) if slots else None


class AttemptTimeout:
    __slots__ = ("seconds", "which", "clock", "deadlines")

    def __init__(self, seconds: float, clock: Clock, deadlines: Deadlines, which: str = "attempt") -> None:
        self.seconds, self.clock, self.which = seconds, clock, which  # which: attempt | first_byte
        self.deadlines = deadlines

    def budget(self, req: Call, now: float | None = None) -> tuple[float, str]:
        """How long this attempt may take, and which timeout that is: the attempt's own, cut to a
        per-request cap and to what is left of the total."""
        seconds = self.seconds
        which = self.which
        if req.timeout is not None:
            seconds = min(seconds, req.timeout)
        if req.deadline is not None:
            left = req.deadline - (self.clock.monotonic() if now is None else now)
            if left < seconds:
                seconds, which = max(left, 0.0), "total"
        return seconds, which

    def expired(self, req: Call, which: str) -> ProxyResponse:
        return timeout_response(which, format_duration(self.seconds if which != "total" else req.total))

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        seconds, which = self.budget(req)
        if seconds == math.inf:  # `attempt: .inf`: no deadline to arm
            return await call_next(req)
        deadlines = self.deadlines
        armed = deadlines.arm(seconds)
        try:
            resp = await call_next(req)
        except asyncio.CancelledError:
            # ours only when our deadline fired and nobody else asked to cancel the task meanwhile
            if armed.fired and armed.task.uncancel() <= armed.cancelling:
                return self.expired(req, which)
            raise
        finally:
            deadlines.disarm(armed)
        if armed.fired:
            armed.task.uncancel()  # something below swallowed our cancellation: leave no count behind
        return resp
