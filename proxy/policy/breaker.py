"""Circuit breaker, one per upstream target (track): policy + state.

pybreaker keeps the state machine (closed → open → half-open → closed, success_threshold, listeners);
this module adds what it lacks for asyncio (see shared/NOTES.md): admission is decided before the
await and the outcome recorded after it, the open → half-open move runs on the injected clock (pybreaker
reads the wall clock, so its own reset is pushed out of reach), half-open admits at most
`half_open_max_calls` probes, `mode: ratio` opens on a failure ratio over a sliding window, slow calls can
count, and an operator can force the state. Open means no upstream I/O at all.
"""

from __future__ import annotations

import collections
import functools
import math
import time

from proxy.clock import Clock
from proxy.exchange import Call, Failure, Handler, ProxyRequest, ProxyResponse, Verdict, open_response
from proxy.obs import log
from proxy.settings.spec import BreakerSpec


def _import_pybreaker():
    """pybreaker imports redis-py (and tornado) when they are installed, only for its optional Redis
    state storage, which blocks the event loop and is never used here: that import alone is ~17 MB of
    RSS. Hide them while pybreaker loads, then put everything back as it was."""
    import sys

    hidden = {m: sys.modules.get(m) for m in ("redis", "tornado")}
    for m, mod in hidden.items():
        if mod is None:
            sys.modules[m] = None  # type: ignore[assignment]  # makes `import m` raise ImportError
    try:
        import pybreaker
    finally:
        for m, mod in hidden.items():
            if mod is None:
                del sys.modules[m]
    return pybreaker


pybreaker = _import_pybreaker()

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}
_NEVER = 10**9  # pybreaker's own wall-clock reset: out of reach, our clock decides


class _Trip(Exception):
    """Raised into pybreaker to record one failure."""


def _ok() -> None:
    return None


def _fail() -> None:
    raise _Trip()


class _Window:
    """Outcomes in the last `window` seconds, in one-second buckets: O(1) per record."""

    __slots__ = ("window", "buckets")

    def __init__(self, window: float) -> None:
        self.window = window
        self.buckets: collections.deque[list] = collections.deque()  # [second, total, failures, slow]

    def add(self, now: float, failed: bool, slow: bool) -> None:
        sec = math.floor(now)
        b = self.buckets
        if not b or b[-1][0] != sec:
            b.append([sec, 0, 0, 0])
        last = b[-1]
        last[1] += 1
        last[2] += failed
        last[3] += slow
        horizon = now - self.window
        while b and b[0][0] + 1 <= horizon:
            b.popleft()

    def totals(self) -> tuple[int, int, int]:
        n = f = s = 0
        for _, t, fl, sl in self.buckets:
            n += t
            f += fl
            s += sl
        return n, f, s

    def clear(self) -> None:
        self.buckets.clear()


class BreakerState:
    """Survives reloads while (upstream, track, url, breaker spec) is unchanged."""

    def __init__(self, upstream: str, track: str, spec: BreakerSpec, clock: Clock, metrics=None,
                 model: str | None = None) -> None:
        self.upstream, self.track, self.spec, self.clock = upstream, track, spec, clock
        consecutive = spec.mode == "consecutive"
        self.cb = pybreaker.CircuitBreaker(
            fail_max=spec.fail_max if consecutive else _NEVER,
            reset_timeout=_NEVER,
            success_threshold=spec.success_threshold,
            name=f"{upstream}/{track}" + (f"/{model}" if model else ""),
            throw_new_error_on_trip=False,
        )
        self.cb.add_listener(_Listener(self))
        self.window = _Window(spec.ratio.window) if (not consecutive or spec.slow_call.duration) else None
        self.forced: str | None = None        # "open" | "closed" | None (automatic)
        self.opened_at: float | None = None
        self.probes = 0
        self.episode = 0      # half-open episodes so far: a probe's token
        self.opened_total = 0
        self.last_failure: str | None = None
        # the last few changes (wall time, from, to, why) for the status page; never read on the data path
        self.transitions: collections.deque[tuple[float, str, str, str | None]] = collections.deque(maxlen=8)
        self.model = model  # a model's breaker on this target (protocol: openai), else the target's
        self.events = None if metrics is None else (
            metrics.breaker_events(upstream, track) if model is None else metrics.model_breaker_events(upstream, track, model))
        self.clean = False  # closed, automatic, no failure on record, nothing to count: the fast path
        self._refresh_clean()

    def activate(self) -> None:
        """Made live by a config load: the gauge now speaks for this breaker."""
        if self.events is not None:
            self.events.changed(self.state)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """closed | open | half_open | forced_open | forced_closed, after applying the reset timeout."""
        if self.forced:
            return f"forced_{self.forced}"
        s = self.cb.current_state
        if s == OPEN and self._reset_due():
            return "half_open"
        return _NAMES[s]

    @property
    def is_open(self) -> bool:
        return self.forced == "open" or (self.forced is None and self.cb.current_state == OPEN
                                         and not self._reset_due())

    def retry_after(self) -> float:
        if self.forced == "open" or self.opened_at is None:
            return self.spec.reset_timeout
        return max(1.0, self.opened_at + self.spec.reset_timeout - self.clock.monotonic())

    def _reset_due(self) -> bool:
        return self.opened_at is not None and self.clock.monotonic() >= self.opened_at + self.spec.reset_timeout

    # -- the call protocol ---------------------------------------------------------------------------
    def _refresh_clean(self, state: str | None = None) -> None:
        """Called wherever the state or the failure count can change (pybreaker calls, transitions,
        forcing), so that the common case — closed, nothing failed — costs one attribute read."""
        self.clean = (self.forced is None and self.window is None and self.spec.slow_call.duration is None
                      and (state or self.cb.current_state) == CLOSED and self.cb._state_storage.counter == 0)

    def admit(self) -> int | None:
        """May one attempt go upstream now? None: no. Otherwise a token for record()/cancel(): 0 for a
        normal call, or the half-open episode number for a probe (so a stale probe frees nothing)."""
        if self.clean:
            return 0
        if self.forced is not None:
            return 0 if self.forced == "closed" else None
        s = self.cb.current_state
        if s == CLOSED:
            return 0
        if s == OPEN:
            if not self._reset_due():
                return None
            self.cb.half_open()
        if self.probes >= self.spec.half_open_max_calls:
            return None
        self.probes += 1
        return self.episode

    def cancel(self, token: int) -> None:
        """The attempt ended without an outcome (cancelled, client gone): free its probe slot."""
        if token and token == self.episode and self.probes:
            self.probes -= 1

    def settle(self, token: int, duration: float, verdict: Verdict | None) -> None:
        """The deferred verdict of an answer whose body has finished (or failed, or was abandoned)."""
        if verdict is None:
            self.cancel(token)
        else:
            self.record(token, verdict, duration, "the answer failed after its headers were sent")

    def record(self, token: int, verdict: Verdict, duration: float, failure: Failure | str | None = None) -> None:
        if self.clean and verdict is Verdict.SUCCESS and not token:
            return  # a success on a clean record changes nothing
        probe = bool(token)
        if probe:
            if token != self.episode:
                return  # a probe from an earlier half-open episode: its verdict is stale
            if self.probes:
                self.probes -= 1
        if self.forced is not None:
            return
        if verdict is Verdict.RETRYABLE or verdict is Verdict.REJECTED:
            return  # a rate limit or our own rejection is not an outage
        state = self.cb.current_state
        failed = verdict is Verdict.FAILURE
        slow_limit = self.spec.slow_call.duration
        slow = slow_limit is not None and duration > slow_limit
        if failed:
            self.last_failure = failure if isinstance(failure, str) else failure.message if failure else "failure"
        if state == HALF_OPEN:
            if probe:  # only probes decide
                self._call(_fail if failed or slow else _ok)
            return
        if state == OPEN:
            return  # a call admitted before the breaker opened: it changes nothing now
        if self.window is not None:
            self.window.add(self.clock.monotonic(), failed, slow)
            if self._window_trips():
                self.trip()
                return
        if self.spec.mode == "consecutive":
            if not failed and self.cb._state_storage.counter == 0:
                return  # a success on a clean record changes nothing: skip pybreaker's lock and listeners
            self._call(_fail if failed else _ok)

    def _window_trips(self) -> bool:
        n, f, s = self.window.totals()
        ratio = self.spec.ratio
        if n < ratio.min_requests:
            return False
        if self.spec.mode == "ratio" and f / n >= ratio.failure_ratio:
            return True
        return self.spec.slow_call.duration is not None and s / n >= self.spec.slow_call.ratio

    def _call(self, fn) -> None:
        try:
            self.cb.call(fn)
        except (_Trip, pybreaker.CircuitBreakerError):
            pass
        self._refresh_clean()

    def trip(self) -> None:
        """Open now (ratio or slow-call rule); pybreaker notifies the listener."""
        self.cb.open()

    # -- operator control ----------------------------------------------------------------------------
    def force(self, mode: str) -> None:
        """mode: open | closed | auto."""
        prev = self.state
        self.transitions.append((time.time(), prev, "closed" if mode == "auto" else f"forced_{mode}", "operator"))
        self.forced = None if mode == "auto" else mode
        if mode == "auto":
            self.cb.close()
            self.opened_at = None
            self.probes = 0
            if self.window is not None:
                self.window.clear()
        elif mode == "open":
            self.opened_total += 1
            if self.events is not None:
                self.events.opened()
        self._refresh_clean()
        if self.events is not None:
            self.events.changed(self.state)
        log.warning("breaker_forced", upstream=self.upstream, track=self.track, state=self.state, previous=prev,
                    **({"model": self.model} if self.model else {}))

    def _on_state(self, old: str, new: str) -> None:
        # pybreaker tells its listeners before its storage holds the new state: pass it explicitly
        self._refresh_clean(new)
        if new == HALF_OPEN:
            self.episode += 1
            self.probes = 0
        if new == OPEN:
            self.opened_at = self.clock.monotonic()
            self.opened_total += 1
            self.probes = 0
            if self.events is not None:
                self.events.opened()
        elif new == CLOSED:
            self.opened_at = None
            self.probes = 0
            if self.window is not None:
                self.window.clear()
        if self.events is not None:
            self.events.changed(_NAMES[new])
        self.transitions.append((time.time(), _NAMES.get(old, old), _NAMES[new],
                                 self.last_failure if new == OPEN else None))
        fields = dict(upstream=self.upstream, track=self.track, state=_NAMES[new], previous=_NAMES.get(old, old),
                      failures=self.cb.fail_counter, **({"model": self.model} if self.model else {}))
        if new == OPEN:
            log.warning("breaker_opened", reason=self.last_failure, reset_timeout=self.spec.reset_timeout, **fields)
        else:
            log.info("breaker_" + ("closed" if new == CLOSED else "half_open"), **fields)


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, state: BreakerState) -> None:
        self.state = state

    def state_change(self, cb, old_state, new_state) -> None:
        self.state._on_state(old_state.name if old_state else CLOSED, new_state.name)


class Breaker:
    """The policy. Reads the request's target breaker: one chain serves every track of an upstream.

    A success whose body is still to be streamed is not recorded at the headers: its verdict waits for
    the end of the body (the response's after-body phase), so a failure after the headers counts, and a
    half-open probe holds its slot until it is really done."""

    __slots__ = ("clock",)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    @staticmethod
    def admit(req: Call) -> int | None:
        """May this attempt go upstream? None: the breaker is open (no I/O at all); else the token
        `record` needs."""
        return req.target.breaker.admit()

    @staticmethod
    def refusal(req: Call) -> ProxyResponse:
        br: BreakerState = req.target.breaker
        return open_response(br.track, br.last_failure, br.retry_after())

    @staticmethod
    def record(req: Call, token: int, verdict: Verdict | None, elapsed: float, failure: Failure | str | None = None) -> None:
        """The attempt's verdict (None: it ended without one — cancelled, or lost with a shared
        connection another attempt broke: it frees its probe slot and counts nothing)."""
        br: BreakerState = req.target.breaker
        if verdict is None:
            br.cancel(token)
        else:
            br.record(token, verdict, elapsed, failure)

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        br: BreakerState = req.target.breaker
        token = br.admit()
        if token is None:
            return self.refusal(req)
        start = self.clock.monotonic()
        try:
            resp = await call_next(req)
        except BaseException:
            br.cancel(token)
            raise
        resp.elapsed = elapsed = self.clock.monotonic() - start
        if resp.verdict is Verdict.SUCCESS and resp.stream is not None:
            resp.after_body(functools.partial(_settle, br, token, elapsed))
        else:
            br.record(token, resp.verdict, elapsed, resp.failure)
        return resp


def _settle(br: BreakerState, token: int, elapsed: float, verdict: Verdict | None, body: bytes | None) -> None:
    br.settle(token, elapsed, verdict)
