"""The runtime: an immutable snapshot built from one config load, swapped in with one assignment.

listener → route (track choice) → policy chain → upstream pool. Each request reads `app.runtime` once
at entry and uses that snapshot to the end, so a reload never changes a request half way. Chains are
folded here, once per load; state (breakers, caches, pools, budgets) comes from the StateStore and
survives when the spec it depends on did not change.
"""

from __future__ import annotations

import functools
import random
import ssl

from multidict import CIMultiDict

from proxy.clock import Clock
from proxy.llm.policy import FirstEvent, LLMFallback, ModelFailover
from proxy.obs.metrics import METRICS, UpstreamMetrics
from proxy.policy.base import Handler, build_chain
from proxy.policy.breaker import Breaker
from proxy.policy.classify import Classify
from proxy.policy.fallback import Fallback
from proxy.policy.retry import Retry
from proxy.policy.shed import Shed
from proxy.policy.timeout import AttemptTimeout, TotalTimeout
from proxy.redis import commands as redis_commands
from proxy.redis.upstream import RedisTarget
from proxy.route.tracks import TrackChooser
from proxy.settings.loader import ConfigError, Loaded
from proxy.settings.spec import (
    IDEMPOTENT_METHODS,
    FallbackSpec,
    RetrySpec,
    RouteSpec,
    TimeoutsSpec,
    UpstreamSpec,
    status_matcher,
)
from proxy.upstream.http import HttpTerminal
from proxy.upstream.state import StateStore, TargetState


def _current_headers(store: StateStore, name: str):
    """The request headers of the running config (the health check follows a rotated key)."""
    up = store.current.upstreams.get(name) if store.current is not None else None
    return up.request_headers if up is not None else {}


class RouteRuntime:
    __slots__ = ("name", "methods", "prefix", "chain", "stream_chain", "timeouts", "retry", "fallback", "cache")

    def __init__(self, name: str, route: RouteSpec | None, timeouts: TimeoutsSpec, retry: RetrySpec,
                 fallback: FallbackSpec, chain: Handler, cache) -> None:
        self.name = name
        self.methods = frozenset(route.match.methods) if route and route.match.methods else None
        self.prefix = route.match.path_prefix if route else "/"
        self.timeouts, self.retry, self.fallback = timeouts, retry, fallback
        self.chain, self.cache = chain, cache
        self.stream_chain: Handler | None = None

    def idempotent(self, method: str, headers) -> bool:
        return method in IDEMPOTENT_METHODS or self.retry.non_idempotent or "Idempotency-Key" in headers


class UpstreamRuntime:
    def __init__(self, name: str, spec: UpstreamSpec, store: StateStore, clock: Clock, metrics=METRICS) -> None:
        self.name, self.spec = name, spec
        self.metrics = UpstreamMetrics(name, [t.name for t in spec.targets], spec.metrics.buckets, metrics)
        self.counters = store.counters_for(name, spec)
        self.targets = []
        self.redis_targets = {}
        self.redis_shared = {}
        for i, t in enumerate(spec.targets):
            try:
                if spec.protocol == "redis":
                    self.redis_targets[t.name] = RedisTarget(t)
                    self.redis_shared[t.name] = store.redis_shared(spec, t, self.redis_targets[t.name])
                    pool = None
                else:
                    pool = store.http_pool(spec, t)
            except (OSError, ssl.SSLError) as exc:  # unreadable CA, certificate or key
                raise ConfigError([f"upstreams.{name}.targets[{i}].tls: {getattr(exc, 'strerror', None) or exc}"
                                   + (f": {exc.filename}" if getattr(exc, "filename", None) else "")]) from None
            except ValueError as exc:
                raise ConfigError([f"upstreams.{name}.targets[{i}].url: {exc}"]) from None
            health = store.health(name, spec, t, pool, self.redis_targets.get(t.name),
                                  functools.partial(_current_headers, store, name))
            canary = store.canary(name, spec, t) if i > 0 else None
            self.targets.append(TargetState(t, store.breaker(name, spec, t), pool, health, canary))
        self.by_name = {t.name: t for t in self.targets}
        self.store = store
        self.configured_weights = {t.name: t.weight for t in self.targets}
        self.track_header = spec.canary.track_header
        self.refresh_tracks(publish=False)
        self.request_headers = CIMultiDict(spec.request_headers)
        self.limits = spec.limits
        self.routes: list[RouteRuntime] = []
        self.cache = None
        if spec.protocol == "redis":
            self._build_redis(name, spec, store, clock)
            return
        terminal = HttpTerminal()
        classify = Classify(status_matcher(spec.breaker.failure_statuses))
        breaker = Breaker(clock)
        llm = spec.protocol == "openai"
        if llm:
            self.metrics.llm_models((*spec.llm.models, *spec.llm.fallback_models))
        for route in (*spec.routes, None):
            timeouts, retry, fallback = spec.route_sections(route)
            cache = store.cache(name, fallback)
            if llm:
                fb = LLMFallback(fallback, cache, clock, self.metrics, spec.llm.degraded)
                failover = ModelFailover(spec.llm.fallback_models, clock) if spec.llm.fallback_models else None
            else:
                fb, failover = Fallback(fallback, cache, clock, self.metrics), None
            shed = Shed(self.counters, spec.limits.max_in_flight, self.metrics.shed)
            retrying = Retry(retry, self.counters.budget, clock, self.metrics) if retry.attempts > 1 else None
            policies = [fb, shed, TotalTimeout(timeouts.total, clock), failover, retrying, breaker, classify,
                        AttemptTimeout(timeouts.attempt, clock)]
            rr = RouteRuntime(route.name if route else "default", route, timeouts, retry, fallback,
                              build_chain(policies, terminal), cache)
            if llm:
                # Streams: no total/attempt timeout (they run for minutes); the attempt ends at the
                # first event, bounded by first_byte; after that the idle timeout guards each event.
                rr.stream_chain = build_chain(
                    [fb, shed, failover, retrying, breaker, classify,
                     AttemptTimeout(timeouts.first_byte, clock, "first_byte")], FirstEvent(terminal))
            self.routes.append(rr)
        self.default_route = self.routes[-1]

    def _build_redis(self, name: str, spec: UpstreamSpec, store: StateStore, clock: Clock) -> None:
        self.cache = store.redis_cache(name, spec.fallback)
        self.connections = 0
        self.client_password = None
        if spec.client_auth.password_file:
            try:
                with open(spec.client_auth.password_file, "rb") as f:
                    self.client_password = f.read().strip()
            except OSError as exc:
                raise ConfigError([f"upstreams.{name}.client_auth.password_file: cannot read "
                                   f"{spec.client_auth.password_file}: {exc.strerror}"]) from None
        m = self.metrics.m
        self._counts = {}
        for t in self.targets:
            for cls in redis_commands.CLASSES:
                for status, outcome in (("ok", "upstream"), ("error", "upstream"), ("ok", "fallback"),
                                        ("error", "rejected"), ("timeout", "rejected")):
                    self._counts[(t.name, cls, status, outcome)] = (
                        m.requests.labels(name, t.name, "default", status, outcome),
                        m.redis_commands.labels(name, cls, outcome))

    def count(self, track: str, cls: str, status: str, outcome: str) -> None:
        a, b = self._counts[(track, cls, status, outcome)]
        a.inc()
        b.inc()

    def caches(self) -> list:
        if self.cache is not None:
            return [self.cache]
        return list({id(r.cache): r.cache for r in self.routes}.values())

    def match(self, method: str, path: str) -> RouteRuntime:
        for r in self.routes:
            if (r.methods is None or method in r.methods) and path.startswith(r.prefix):
                return r
        return self.default_route

    def effective_weights(self) -> dict[str, int]:
        weights = dict(self.store.operator_weights(self.name, self.configured_weights) or self.configured_weights)
        for t in self.targets:
            if t.canary is not None and t.canary.aborted:
                weights[t.name] = 0
        return weights

    def refresh_tracks(self, publish: bool = True) -> None:
        """Rebuild the track chooser from the effective weights (one assignment; requests in flight keep
        the chooser they started with)."""
        weights = self.effective_weights()
        self.weights = weights
        self.chooser = TrackChooser(self.targets, weights, self.spec.canary)
        if publish:
            self._publish_weights()

    def _publish_weights(self) -> None:
        m = self.metrics.m
        for t in self.targets:
            m.canary_weight.labels(self.name, t.name).set(self.weights.get(t.name, 0))

    def activate(self) -> None:
        """This runtime went live: its series speak for the upstream now."""
        self.refresh_tracks()  # aborts or operator weights may have changed since the build
        self.metrics.activate()

    def pick(self, rand=random.random) -> TargetState:
        """Weighted choice without request headers (Redis picks once per connection)."""
        return self.chooser.choose(None, rand)[0]

    def record_outcome(self, target: TargetState, error: bool, latency: float) -> None:
        """Feed the canary watchdog; an abort takes the track out at once."""
        if target.canary is not None and target.canary.record(error, latency):
            self.refresh_tracks()


class Runtime:
    def __init__(self, loaded: Loaded, store: StateStore, clock: Clock) -> None:
        self.loaded = loaded
        self.settings = loaded.settings
        self.digest = loaded.digest
        store.begin()
        self.upstreams = {name: UpstreamRuntime(name, spec, store, clock)
                          for name, spec in loaded.settings.upstreams.items()}
