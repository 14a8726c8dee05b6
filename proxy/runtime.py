"""The runtime: an immutable snapshot built from one config load, swapped in with one assignment.

listener → route (track choice) → policy chain → upstream pool. Each request reads `app.runtime` once
at entry and uses that snapshot to the end, so a reload never changes a request half way. Chains are
folded once per load by each upstream's protocol (proxy/protocols); state (breakers, caches, pools,
budgets) comes from the StateStore and survives when the spec it depends on did not change.
"""

from __future__ import annotations

import functools
import random
import ssl

from multidict import CIMultiDict

from proxy import protocols
from proxy.clock import Clock
from proxy.obs.metrics import METRICS, UpstreamMetrics
from proxy.route.tracks import TrackChooser
from proxy.settings.loader import ConfigError, Loaded
from proxy.settings.spec import UpstreamSpec
from proxy.upstream.state import StateStore, TargetState


def _current_headers(store: StateStore, name: str):
    """The request headers of the running config (the health check follows a rotated key)."""
    up = store.current.upstreams.get(name) if store.current is not None else None
    return up.request_headers if up is not None else {}


class UpstreamRuntime:
    """One upstream as the data path sees it, for one config load. The protocol (proxy/protocols) builds
    its transports and its routes' chains; the rest is the same for every protocol."""

    def __init__(self, name: str, spec: UpstreamSpec, store: StateStore, clock: Clock, metrics=METRICS,
                 tracing=None) -> None:
        self.name, self.spec = name, spec
        # the OpenTelemetry tracer when `tracing` is on (proxy/obs/tracing.py), else None: read by the
        # listener (server spans) and by the chains the protocol builds (a client span per attempt)
        self.tracing = tracing
        self.protocol = protocol = protocols.get(spec.protocol)
        self.metrics = UpstreamMetrics(name, [t.name for t in spec.targets], spec.metrics.buckets, metrics)
        self.counters = store.counters_for(name, spec)
        self.targets = []
        for i, t in enumerate(spec.targets):
            try:
                transport = protocol.transport(store, name, spec, t)
            except (OSError, ssl.SSLError) as exc:  # unreadable CA, certificate or key
                raise ConfigError([f"upstreams.{name}.targets[{i}].tls: {getattr(exc, 'strerror', None) or exc}"
                                   + (f": {exc.filename}" if getattr(exc, "filename", None) else "")]) from None
            except ValueError as exc:
                raise ConfigError([f"upstreams.{name}.targets[{i}].url: {exc}"]) from None
            health = store.health(name, spec, t, protocol, transport, functools.partial(_current_headers, store, name))
            canary = store.canary(name, spec, t) if i > 0 else None
            self.targets.append(TargetState(t, store.breaker(name, spec, t), transport, health, canary))
        self.by_name = {t.name: t for t in self.targets}
        self.store = store
        self.configured_weights = {t.name: t.weight for t in self.targets}
        self.track_header = spec.canary.track_header
        self.refresh_tracks(publish=False)
        self.request_headers = CIMultiDict(spec.request_headers)
        self.limits = spec.limits
        self.routes: list = []     # HTTP-style protocols: matched by method and path prefix
        self.default_route = None
        self.cache = None          # a protocol with one cache for the whole upstream (Redis)
        self.wire = None           # what else the protocol built for this upstream (Redis: its chain)
        self.connections = 0       # client connections, where the listener counts them
        protocol.build(self, store, clock)

    def caches(self) -> list:
        if self.cache is not None:
            return [self.cache]
        return list({id(r.cache): r.cache for r in self.routes}.values())

    def match(self, method: str, path: str):
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
            m.track_weight(self.name, t.name, self.weights.get(t.name, 0))

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
        from proxy.obs.tracing import tracing_for

        tracing = tracing_for(loaded.settings, store, store.metrics or METRICS)
        self.upstreams = {name: UpstreamRuntime(name, spec, store, clock, tracing=tracing)
                          for name, spec in loaded.settings.upstreams.items()}
