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

    __slots__ = ("name", "spec", "base", "weight", "breaker", "pool", "health", "canary")

    def __init__(self, spec: TargetSpec, breaker: BreakerState, pool: Any, health: Any = None,
                 canary: Any = None) -> None:
        self.name, self.spec, self.weight = spec.name, spec, spec.weight
        self.base = spec.url.rstrip("/")
        self.breaker, self.pool, self.health = breaker, pool, health
        self.canary = canary  # rollback watchdog state, for every track but the first


class Counters:
    """Live per-upstream counts, kept across reloads."""

    __slots__ = ("in_flight", "budget")

    def __init__(self, budget: RetryBudget) -> None:
        self.in_flight = 0
        self.budget = budget
        budget.counters = self


class StateStore:
    """Builds are side-effect free: state a build creates is staged, and only `commit()` (at the swap)
    makes it live, updates gauges and budgets, and prunes what the new runtime no longer uses. A
    failed reload calls `abort()` and the running process is exactly as it was."""

    def __init__(self, clock: Clock, metrics) -> None:
        self.clock, self.metrics = clock, metrics
        self.live: dict[tuple, Any] = {}          # breakers, pools, caches, counters by key
        self._staged: dict[tuple, Any] = {}
        self._used: set[tuple] = set()
        self._budgets: list[tuple[RetryBudget, float, int]] = []
        self.current = None   # the live Runtime, set by the app at each swap
        self._reconfigure: list = []
        self.weights: dict[str, tuple[dict[str, int], dict[str, int]]] = {}  # upstream → (configured, operator)

    def begin(self) -> None:
        self._used, self._staged, self._budgets, self._reconfigure = set(), {}, [], []

    def _get(self, key: tuple, make):
        self._used.add(key)
        obj = self.live.get(key)
        if obj is None:
            obj = self._staged.get(key)
            if obj is None:
                obj = self._staged[key] = make()
        return obj

    def breaker(self, upstream: str, up: UpstreamSpec, target: TargetSpec) -> BreakerState:
        key = ("breaker", upstream, target.name, target.url, _k(up.breaker))
        return self._get(key, lambda: BreakerState(upstream, target.name, up.breaker, self.clock, self.metrics))

    def http_pool(self, up: UpstreamSpec, target: TargetSpec) -> HttpPool:
        key = ("pool", target.url, _k(target.tls), _k(up.pool), up.timeouts.connect, up.timeouts.idle,
               up.limits.max_pending, up.limits.pending_timeout)
        return self._get(key, lambda: HttpPool(target, up.pool, up.timeouts, up.limits, self.clock))

    def cache(self, upstream: str, spec) -> FallbackCache:
        key = ("cache", upstream, _k(spec))
        return self._get(key, lambda: FallbackCache(upstream, spec, self.clock))

    def health(self, upstream: str, up: UpstreamSpec, target: TargetSpec, pool, redis_target, headers):
        from proxy.upstream.health import TargetHealth

        key = ("health", upstream, target.name, target.url, up.protocol, _k(up.health))
        return self._get(key, lambda: TargetHealth(upstream, target, up.health, up.protocol, pool, redis_target,
                                                   headers))

    def canary(self, upstream: str, up: UpstreamSpec, target: TargetSpec):
        from proxy.route.rollback import CanaryState

        key = ("canary", upstream, target.name)  # not keyed by spec: an abort holds across reloads
        state = self._get(key, lambda: CanaryState(upstream, target.name, up.canary.rollback, self.clock, self.metrics,
                                                   (target.weight, target.url)))
        self._reconfigure.append((state, up.canary.rollback, (target.weight, target.url)))
        return state

    def operator_weights(self, upstream: str, configured: dict[str, int]) -> dict[str, int] | None:
        """Weights set through the admin API, while the configured weights are the ones they overrode."""
        entry = self.weights.get(upstream)
        if entry is None or entry[0] != configured:
            return None
        return entry[1]

    def redis_shared(self, up: UpstreamSpec, target: TargetSpec, redis_target):
        from proxy.redis.upstream import SharedRedis

        key = ("pool", "redis", target.url, target.password_file, _k(target.tls), up.timeouts.connect)
        shared = self._get(key, lambda: SharedRedis(redis_target, up.timeouts.connect))
        self._reconfigure.append((shared, redis_target, None))  # the new target info, at commit only
        return shared

    def redis_cache(self, upstream: str, spec):
        from proxy.redis.cache import RedisCache

        key = ("rcache", upstream, _k(spec))
        return self._get(key, lambda: RedisCache(spec, self.clock))

    def counters_for(self, upstream: str, up: UpstreamSpec) -> Counters:
        c = self._get(("counters", upstream),
                      lambda: Counters(RetryBudget(up.retry.budget_ratio, up.retry.budget_min)))
        self._budgets.append((c.budget, up.retry.budget_ratio, up.retry.budget_min))
        return c

    def commit(self) -> list:
        """Make the latest build's state live; returns the pools it dropped, to close once drained."""
        self.live.update(self._staged)
        for budget, ratio, minimum in self._budgets:
            budget.ratio, budget.minimum = ratio, minimum
        for state, spec, configured in self._reconfigure:
            state.reconfigure(spec, configured)
        closing = []
        for key in [k for k in self.live if k not in self._used]:
            obj = self.live.pop(key)
            if key[0] == "pool":
                closing.append(obj)
            elif key[0] == "health":
                obj.stop()
        for key, obj in self._staged.items():
            if isinstance(obj, BreakerState):
                obj.activate()
            elif key[0] == "health":
                obj.start()
        self._staged = {}
        return closing

    def abort(self) -> None:
        self._staged, self._budgets, self._reconfigure = {}, [], []

    @property
    def pools(self) -> list:
        return [v for k, v in self.live.items() if k[0] == "pool"]

    def healths(self) -> list:
        return [v for k, v in self.live.items() if k[0] == "health"]

    async def close(self) -> None:
        for h in self.healths():
            h.stop()
        await asyncio.gather(*(p.close() for p in self.pools), return_exceptions=True)
        for k in [k for k in self.live if k[0] == "pool"]:
            del self.live[k]
