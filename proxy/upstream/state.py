"""Per-upstream and per-target state that outlives a config load: breakers, pools, caches, budgets.

`StateStore` hands out state keyed by what it depends on, so a reload that leaves a key unchanged gets
the same object back (an open breaker stays open, a warm cache stays warm, a weight change resets
nothing); `prune` closes what the new runtime no longer uses.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.clock import Clock
from proxy.policy.breaker import BreakerState
from proxy.policy.fallback import FallbackCache
from proxy.policy.retry import RetryBudget
from proxy.settings.spec import TargetSpec, UpstreamSpec
from proxy.upstream.pool import HttpPool


def _k(spec) -> str:
    """A spec's identity for state keys (specs may hold dicts, so they are not hashable themselves)."""
    return spec.model_dump_json()


class TargetState:
    """One target (track) as the request path sees it. Rebuilt per load, pointing at surviving state."""

    __slots__ = ("name", "spec", "base", "weight", "breaker", "pool")

    def __init__(self, spec: TargetSpec, breaker: BreakerState, pool: Any) -> None:
        self.name, self.spec, self.weight = spec.name, spec, spec.weight
        self.base = spec.url.rstrip("/")
        self.breaker, self.pool = breaker, pool


class Counters:
    """Live per-upstream counts, kept across reloads."""

    __slots__ = ("in_flight", "budget")

    def __init__(self, budget: RetryBudget) -> None:
        self.in_flight = 0
        self.budget = budget


class StateStore:
    def __init__(self, clock: Clock, metrics) -> None:
        self.clock, self.metrics = clock, metrics
        self.breakers: dict[tuple, BreakerState] = {}
        self.pools: dict[tuple, Any] = {}
        self.caches: dict[tuple, FallbackCache] = {}
        self.counters: dict[str, Counters] = {}
        self._used: set[tuple] = set()

    def begin(self) -> None:
        self._used = set()

    def breaker(self, upstream: str, up: UpstreamSpec, target: TargetSpec) -> BreakerState:
        key = ("breaker", upstream, target.name, target.url, _k(up.breaker))
        self._used.add(key)
        b = self.breakers.get(key)
        if b is None:
            b = self.breakers[key] = BreakerState(upstream, target.name, up.breaker, self.clock, self.metrics)
        return b

    def http_pool(self, up: UpstreamSpec, target: TargetSpec) -> HttpPool:
        key = ("pool", target.url, _k(target.tls), _k(up.pool), up.timeouts.connect, up.timeouts.idle,
               up.limits.max_pending, up.limits.pending_timeout)
        self._used.add(key)
        p = self.pools.get(key)
        if p is None:
            p = self.pools[key] = HttpPool(target, up.pool, up.timeouts, up.limits, self.clock)
        return p

    def cache(self, upstream: str, spec, upstream_metrics) -> FallbackCache:
        key = ("cache", upstream, _k(spec))
        self._used.add(key)
        c = self.caches.get(key)
        if c is None:
            c = self.caches[key] = FallbackCache(upstream, spec, self.clock, upstream_metrics)
        return c

    def counters_for(self, upstream: str, up: UpstreamSpec) -> Counters:
        c = self.counters.get(upstream)
        if c is None:
            c = self.counters[upstream] = Counters(RetryBudget(up.retry.budget_ratio, up.retry.budget_min))
        else:
            c.budget.ratio, c.budget.minimum = up.retry.budget_ratio, up.retry.budget_min
        return c

    def prune(self) -> list:
        """Drop state the latest build did not ask for; returns pools to close once drained."""
        closing = []
        for store in (self.breakers, self.caches):
            for key in [k for k in store if k not in self._used]:
                del store[key]
        for key in [k for k in self.pools if k not in self._used]:
            closing.append(self.pools.pop(key))
        return closing

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        self.pools.clear()
