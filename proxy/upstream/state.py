"""Per-upstream and per-target state that outlives a config load: breakers, pools, caches, budgets.

`StateStore` hands out state keyed by what it depends on, so a reload that leaves a key unchanged gets
the same object back (an open breaker stays open, a warm cache stays warm, a weight change resets
nothing); `prune` closes what the new runtime no longer uses.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from proxy.clock import Clock
from proxy.policy.breaker import BreakerState
from proxy.policy.retry import RetryBudget
from proxy.policy.timeout import Deadlines
from proxy.route.rollback import CanaryState
from proxy.settings.spec import TargetSpec, UpstreamSpec
from proxy.upstream.health import TargetHealth


def spec_key(spec) -> str:
    """A spec's identity for state keys (specs may hold dicts, so they are not hashable themselves)."""
    return spec.model_dump_json()


class TargetState:
    """One target (track) as the request path sees it. Rebuilt per load, pointing at surviving state."""

    __slots__ = ("name", "spec", "base", "weight", "breaker", "pool", "health", "canary", "models")

    def __init__(self, spec: TargetSpec, breaker: BreakerState, pool: Any, health: Any = None,
                 canary: Any = None) -> None:
        self.name, self.spec, self.weight = spec.name, spec, spec.weight
        self.base = spec.url.rstrip("/")
        self.breaker, self.pool, self.health = breaker, pool, health
        self.canary = canary  # rollback watchdog state, for every track but the first
        self.models: dict[str, BreakerState] | None = None  # protocol: openai — a breaker per model label


class Counters:
    """Live per-upstream counts, kept across reloads. `waiting` holds the listeners' clients that wait
    for room under max_in_flight (Redis), woken as commands finish."""

    __slots__ = ("in_flight", "budget", "waiting", "waking")

    def __init__(self, budget: RetryBudget) -> None:
        self.in_flight = 0
        self.budget = budget
        self.waiting: collections.deque = collections.deque()
        self.waking = False  # a wake-up loop is running: a nested one returns, the running one carries on
        budget.counters = self


class StateStore:
    """Builds are side-effect free: state a build creates is staged, and only `commit()` (at the swap)
    makes it live, updates gauges and budgets, and prunes what the new runtime no longer uses. A
    failed reload calls `abort()` and the running process is exactly as it was."""

    def __init__(self, clock: Clock, metrics) -> None:
        self.clock, self.metrics = clock, metrics
        self.deadlines = Deadlines()    # the attempt-timeout wheel every chain of this process arms
        self.shared: dict[str, Any] = {}  # process-wide helpers a protocol keeps here (built once, by it)
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
        key = ("breaker", upstream, target.name, target.url, spec_key(up.breaker))
        return self._get(key, lambda: BreakerState(upstream, target.name, up.breaker, self.clock, self.metrics))

    def model_breaker(self, upstream: str, up: UpstreamSpec, target: TargetSpec, model: str) -> BreakerState:
        key = ("model-breaker", upstream, target.name, target.url, model, spec_key(up.breaker))
        return self._get(key, lambda: BreakerState(upstream, target.name, up.breaker, self.clock, self.metrics, model))

    def pool(self, key: tuple, make):
        """A transport (connection pool) keyed by what it depends on; closed once a reload drops it."""
        return self._get(("pool", *key), make)

    def keep(self, key: tuple, make):
        """State of another kind (nothing to close or start), kept while a build asks for it."""
        return self._get(("keep", *key), make)

    def cache(self, key: tuple, make):
        """A fallback cache keyed by (upstream, spec): a warm cache survives an unrelated reload."""
        return self._get(("cache", *key), make)

    def health(self, upstream: str, up: UpstreamSpec, target: TargetSpec, protocol, transport, headers):
        key = ("health", upstream, target.name, target.url, up.protocol, spec_key(up.health))
        return self._get(key, lambda: TargetHealth(upstream, target, up.health, protocol, transport, headers))

    def canary(self, upstream: str, up: UpstreamSpec, target: TargetSpec):
        key = ("canary", upstream, target.name)  # not keyed by spec: an abort holds across reloads
        state = self._get(key, lambda: CanaryState(upstream, target.name, up.canary.rollback, self.clock, self.metrics,
                                                   (target.weight, target.url)))
        self.reconfigure_at_commit(state, up.canary.rollback, (target.weight, target.url))
        return state

    def operator_weights(self, upstream: str, configured: dict[str, int]) -> dict[str, int] | None:
        """Weights set through the admin API, while the configured weights are the ones they overrode."""
        entry = self.weights.get(upstream)
        if entry is None or entry[0] != configured:
            return None
        return entry[1]

    def reconfigure_at_commit(self, state, spec, configured=None) -> None:
        """`state.reconfigure(spec, configured)` at the swap, not during a build that may be abandoned."""
        self._reconfigure.append((state, spec, configured))

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
