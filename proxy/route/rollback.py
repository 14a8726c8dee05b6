"""Local automated rollback: a sliding window of outcomes and latencies per canary track. When the
canary's error rate, success rate or p99 crosses its threshold (only once `min_requests` are in the
window), its effective weight goes to 0 until an operator or a config change says otherwise.

The window is a ring of one-second buckets, each with a count, a 5xx count and a small log-scale
latency histogram, so recording is O(1) and the p99 is read without sorting.
"""

from __future__ import annotations

import collections
import math

from proxy.obs import log

# latency buckets: 1 ms · 1.05^i (5% wide, so a p99 near the threshold is judged within 5%), up to ~1 h
_BASE, _GROWTH, _NB = 0.001, 1.05, 312
_LOG_GROWTH = math.log(_GROWTH)


def _lat_bucket(seconds: float) -> int:
    if seconds <= _BASE:
        return 0
    return min(_NB - 1, int(math.log(seconds / _BASE) / _LOG_GROWTH) + 1)


def _bucket_upper(i: int) -> float:
    return _BASE * _GROWTH ** i


class Window:
    __slots__ = ("seconds", "ring", "n", "e")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ring: collections.deque = collections.deque()  # [second, n, errors, hist]
        self.n = self.e = 0  # running totals over the ring: the rate checks are O(1) per request

    def add(self, now: float, error: bool, latency: float) -> None:
        sec = int(now)
        ring = self.ring
        if not ring or ring[-1][0] != sec:
            ring.append([sec, 0, 0, [0] * _NB])
            horizon = now - self.seconds
            while ring and ring[0][0] + 1 <= horizon:
                old = ring.popleft()
                self.n -= old[1]
                self.e -= old[2]
        b = ring[-1]
        b[1] += 1
        b[2] += error
        self.n += 1
        self.e += error
        b[3][_lat_bucket(latency)] += 1

    def stats(self, now: float) -> tuple[int, int, float]:
        horizon = now - self.seconds
        n = e = 0
        hist = [0] * _NB
        for sec, bn, be, bh in self.ring:
            if sec + 1 <= horizon:
                continue
            n += bn
            e += be
            for i, c in enumerate(bh):
                if c:
                    hist[i] += c
        p99 = 0.0
        if n:
            need, acc = math.ceil(0.99 * n), 0
            for i, c in enumerate(hist):
                acc += c
                if acc >= need:
                    p99 = _bucket_upper(i)
                    break
        return n, e, p99

    def clear(self) -> None:
        self.ring.clear()
        self.n = self.e = 0


class CanaryState:
    """Per (upstream, track); survives reloads. `aborted` holds until the track's configured weight or URL
    changes, or an operator sets weights."""

    def __init__(self, upstream: str, track: str, spec, clock, metrics, configured: tuple[int, str]) -> None:
        self.upstream, self.track, self.spec, self.clock, self.metrics = upstream, track, spec, clock, metrics
        self.window = Window(spec.window)
        self.aborted: str | None = None       # the reason
        self.configured = configured          # (weight, url) when last (re)configured
        self._last_eval = 0.0

    def reconfigure(self, spec, configured: tuple[int, str]) -> None:
        if configured != self.configured and self.aborted:
            log.info("canary_abort_cleared", upstream=self.upstream, track=self.track, reason="config_changed")
            self.aborted = None
            self.window.clear()
        self.configured = configured
        if spec != self.spec:
            self.spec = spec
            self.window = Window(spec.window)

    def record(self, error: bool, latency: float) -> bool:
        """→ True when this outcome aborted the canary."""
        now = self.clock.monotonic()
        w = self.window
        w.add(now, error, latency)
        if self.aborted or not self.spec.enabled or w.n < self.spec.min_requests:
            return False
        n, e, p99 = w.n, w.e, 0.0
        reason = None
        if e / n > self.spec.max_error_rate:
            reason = "error_rate"
        elif (n - e) / n < self.spec.min_success_rate:
            reason = "success_rate"
        elif now - self._last_eval >= 0.2 or latency > self.spec.max_p99:
            # the p99 walks the histogram: at most every 200 ms, or when a slow call just came in
            self._last_eval = now
            n, e, p99 = w.stats(now)
            if n >= self.spec.min_requests and p99 > self.spec.max_p99:
                reason = "latency_p99"
        if reason is None:
            return False
        self.aborted = reason
        self.metrics.canary_aborted(self.upstream, self.track, reason)
        log.error("canary_aborted", upstream=self.upstream, track=self.track, reason=reason, requests=n,
                  errors=e, error_rate=round(e / n, 4), p99_seconds=round(p99, 3) if p99 else None,
                  thresholds={"max_error_rate": self.spec.max_error_rate, "min_success_rate": self.spec.min_success_rate,
                              "max_p99": self.spec.max_p99, "window": self.spec.window})
        return True

    def snapshot(self) -> dict:
        n, e, p99 = self.window.stats(self.clock.monotonic())
        return {"aborted": self.aborted, "window_requests": n, "window_errors": e,
                "window_p99_seconds": round(p99, 4) if n else None}
