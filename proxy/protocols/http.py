"""`protocol: http` — an HTTP/1.1 upstream (a database gateway, any REST service).

listener (proxy/listen/http.py on the HTTP/1.1 server) → route (prefix/method match, track choice) →
the shared chain: fallback → shed → total timeout → retry (budget) → breaker → classify → attempt
timeout → HttpTerminal (proxy/upstream/http.py) over the target's pool.
"""

from __future__ import annotations

from urllib.parse import quote

from multidict import CIMultiDict

from proxy.http1.server import Server
from proxy.listen.http import HttpListener
from proxy.policy.base import build_chain
from proxy.policy.breaker import Breaker
from proxy.policy.classify import Classify
from proxy.policy.fallback import Fallback, FallbackCache
from proxy.policy.retry import Retry
from proxy.policy.shed import Shed
from proxy.policy.timeout import AttemptTimeout, TotalTimeout
from proxy.protocols.base import Listening, Protocol
from proxy.settings.spec import IDEMPOTENT_METHODS, status_matcher
from proxy.upstream.http import HttpTerminal
from proxy.upstream.pool import HttpPool
from proxy.upstream.state import spec_key

_PATH_SAFE = "/%:@!$&'()*+,;=?~-._"  # keeps what is already encoded, and the query


class RouteRuntime:
    """One route of an upstream, built per config load: its sections and its folded chain."""

    __slots__ = ("name", "methods", "prefix", "chain", "stream_chain", "continue_chain", "traced_chain", "timeouts",
                 "retry", "fallback", "cache")

    def __init__(self, name: str, route, timeouts, retry, fallback, chain, cache) -> None:
        self.name = name
        self.methods = frozenset(route.match.methods) if route and route.match.methods else None
        self.prefix = route.match.path_prefix if route else "/"
        self.timeouts, self.retry, self.fallback = timeouts, retry, fallback
        self.chain, self.cache = chain, cache
        self.stream_chain = self.continue_chain = None
        # tracing on: the chain with a client span per attempt, for the requests the sampler picked (the
        # others keep the fused chain)
        self.traced_chain = None

    def idempotent(self, method: str, headers) -> bool:
        return method in IDEMPOTENT_METHODS or self.retry.non_idempotent or "Idempotency-Key" in headers


class HttpProtocol(Protocol):
    name = "http"
    schemes = ("http", "https")
    listener_class = HttpListener

    def transport(self, store, upstream: str, spec, target):
        t, limits = spec.timeouts, spec.limits
        key = (target.url, spec_key(target.tls), spec_key(spec.pool), t.connect, t.idle, limits.max_pending,
               limits.pending_timeout)
        return store.pool(key, lambda: HttpPool(target, spec.pool, t, limits, store.clock))

    # -- the chains, once per route and config load ---------------------------------------------------
    def build(self, up, store, clock) -> None:
        for route in (*up.spec.routes, None):
            timeouts, retry, fallback = up.spec.route_sections(route)
            shared = self.shared_cache(up, store, clock, fallback)
            cache = store.cache((up.name, spec_key(fallback)), lambda f=fallback, s=shared: FallbackCache(up.name, f, clock, s))
            chain, *more = self.chains(up, store, clock, timeouts, retry, fallback, cache)
            rr = RouteRuntime(route.name if route else "default", route, timeouts, retry, fallback, chain, cache)
            rr.stream_chain, rr.continue_chain = (*more, None, None)[:2]
            rr.traced_chain = self.traced_chain(up, store, clock, timeouts, retry, fallback, cache)
            up.routes.append(rr)
        up.default_route = up.routes[-1]

    def shared_cache(self, up, store, clock, fallback):
        """`fallback.shared`'s state (proxy/fleet/cache.py), a pool to the StateStore: closed when a reload
        drops it. Keyed like the local cache it backs, so the two always come and go together."""
        if fallback.shared is None:
            return None
        from proxy.fleet.cache import SharedCache, digest  # redis-py only with a shared cache configured

        key_spec = digest(fallback.methods, fallback.vary, self.cache_key_fields(up))[:16]
        return store.pool(("shared-cache", up.name, spec_key(fallback)),
                          lambda: SharedCache(up.name, fallback.shared, key_spec, clock, up.metrics))

    def cache_key_fields(self, up) -> tuple[str, ...]:
        """What of a request body identifies it in the cache, beyond method, path and `vary` (none here)."""
        return ()

    def fallback_policy(self, up, fallback, cache, clock):
        return Fallback(fallback, cache, clock, up.metrics)

    def failover_policy(self, up, clock):
        return None

    def breaker_policy(self, clock):
        return Breaker(clock)

    def retry_policy(self, up, retry, clock):
        return Retry(retry, up.counters.budget, clock, up.metrics)

    def policies(self, up, store, clock, timeouts, retry, fallback, cache, traced: bool = True) -> list:
        """A route's chain, outer to inner: fallback → shed → total timeout → (model failover) → retry
        (budget) → breaker → (the attempt's span, tracing on) → classify → attempt timeout."""
        spec = up.spec
        return [
            self.fallback_policy(up, fallback, cache, clock),
            Shed(up.counters, spec.limits.max_in_flight, up.metrics),
            TotalTimeout(timeouts.total, clock),
            self.failover_policy(up, clock),
            self.retry_policy(up, retry, clock) if retry.attempts > 1 else None,
            self.breaker_policy(clock),
            self.trace_policy(up) if traced else None,
            Classify(status_matcher(spec.breaker.failure_statuses)),
            AttemptTimeout(timeouts.attempt, clock, store.deadlines),
        ]

    def trace_policy(self, up):
        if up.tracing is None:
            return None
        from proxy.policy.trace import AttemptSpan  # the OpenTelemetry SDK only with tracing on

        return AttemptSpan(up.tracing.tracer, up.name, up.targets)

    def chains(self, up, store, clock, timeouts, retry, fallback, cache):
        """→ (the route's chain, its chain for streamed answers or None, its chain that continues a
        broken stream or None). The attempt span is left out: traced requests take `traced_chain`."""
        ps = self.policies(up, store, clock, timeouts, retry, fallback, cache, traced=False)
        return build_chain(ps, HttpTerminal()), None, None

    def traced_chain(self, up, store, clock, timeouts, retry, fallback, cache):
        """The route's chain with the attempt span (tracing on), else None."""
        if up.tracing is None:
            return None
        return build_chain(self.policies(up, store, clock, timeouts, retry, fallback, cache), HttpTerminal())

    # -- the listener ----------------------------------------------------------------------------------
    def listener(self, app, name: str, spec) -> Listening:
        # Parser limits well above max_header_bytes, so an oversized header gets our JSON 431.
        max_field = max(65536, 4 * spec.limits.max_header_bytes)
        server = Server(self.listener_class(app, name).handle, max_header_bytes=max_field, max_line=max_field)
        self.reconfigure_listener(server, spec)
        return Listening(server, server)

    def reconfigure_listener(self, server, spec) -> None:
        server.keepalive_timeout = spec.limits.client_idle_timeout
        server.header_timeout = spec.limits.client_header_timeout

    # -- health ----------------------------------------------------------------------------------------
    def checks(self, health_spec) -> bool:
        return health_spec.enabled and health_spec.path is not None  # no path: passive only

    async def probe(self, health) -> None:
        pool = health.transport
        if not pool.fast:  # through an egress proxy: aiohttp's client knows how
            return await _probe_via_aiohttp(health)
        # The lean client on a connection of its own (a check must not take a request's pool slot, and
        # a fresh connection is what it should prove works)
        head = pool.request_head("GET", quote(health.spec.path, safe=_PATH_SAFE), CIMultiDict(health.headers()))
        head.append("Connection: close\r\n\r\n")
        conn = await pool.h1_connect()
        try:
            r = await conn.request("".join(head).encode("utf-8", "surrogateescape"))
            await r.read()
            if not 200 <= r.status < 400:
                raise ConnectionError(f"health check answered {r.status}")
        finally:
            conn.close()

    def stand_in(self, up) -> bool:
        return any(r.fallback.static is not None for r in up.routes)


async def _probe_via_aiohttp(health) -> None:
    import aiohttp  # only behind an egress proxy

    pool = health.transport
    gen = pool.session()
    try:
        async with gen.session.get(health.base + health.spec.path, headers=health.headers(), allow_redirects=False,
                                   proxy=pool.proxy, proxy_auth=pool.proxy_auth,
                                   server_hostname=pool.server_hostname) as r:
            await r.read()
            if not 200 <= r.status < 400:
                raise aiohttp.ClientResponseError(r.request_info, (), status=r.status,
                                                  message=f"health check answered {r.status}")
    finally:
        pool.done(gen)


HTTP = HttpProtocol()
