"""Fallback: the outermost policy. The cache answers only when the upstream path failed, never instead
of calling it.

On failure it serves, in order: an entry younger than cache_ttl (`X-Fallback: cache`); with
`fallback.shared`, the workload's shared cache in Redis (proxy/fleet/cache.py: `shared-cache` /
`shared-stale`, when it has something younger than the local stale entry); one younger than stale_ttl
(`stale`), the static response (`static`), else the error. Stored: 2xx answers to the
configured methods, within max_body, without `Cache-Control: no-store|private` or `Set-Cookie`, to
requests without `Authorization`/`Cookie` unless those are listed in `vary` (then they are in the key).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable

from cachetools import TTLCache
from multidict import CIMultiDict, getversion

from proxy.clock import Clock
from proxy.exchange import (
    HOP_BY_HOP,
    Handler,
    ProxyRequest,
    ProxyResponse,
    Reason,
    Verdict,
    connection_listed,
)
from proxy.fleet.cache import digest
from proxy.obs import log
from proxy.settings.spec import FallbackSpec

# Headers that describe one transfer, not the stored representation.
_NOT_STORED = HOP_BY_HOP | {"content-length", "date", "x-request-id", "set-cookie", "age"}
_PRIVATE = ("authorization", "cookie")
_SET_AT_SERVE = frozenset({"age", "x-fallback", "x-fallback-reason"})  # replaced in a served answer
_EPISODE_QUIET = 1.0
_REINSERT_AFTER = 1.0


class Entry:
    __slots__ = ("status", "headers", "body", "stored_at", "inserted", "touched", "size", "_lines")

    def __init__(self, status: int, headers: tuple[tuple[str, str], ...], body: bytes, stored_at: float) -> None:
        self.status, self.headers, self.body, self.stored_at = status, headers, body, stored_at
        self.inserted = stored_at  # when the TTL (stale_ttl) started counting; stored_at is the freshness
        self.touched = stored_at   # when it last moved to the recently-used end (get)
        self.size = len(body) + sum(len(k) + len(v) for k, v in headers) + 64
        self._lines: list[str] | None = None

    @property
    def lines(self) -> list[str]:
        """The stored headers serialised, once, at the first serve (not at store: that runs per success)."""
        lines = self._lines
        if lines is None:
            lines = self._lines = [f"{k}: {v}\r\n" for k, v in self.headers if k.lower() not in _SET_AT_SERVE]
        return lines


class BoundedCache(TTLCache):
    """TTLCache bounded by bytes (maxsize, via getsizeof) and by entry count; `on_evict` hears of every
    entry that leaves by eviction or expiry (the Redis cache keeps a key index in step with it)."""

    def __init__(self, entries: int, max_bytes: int, ttl: float, timer, getsizeof, on_evict=None) -> None:
        super().__init__(maxsize=max(1, max_bytes), ttl=ttl, timer=timer, getsizeof=getsizeof)
        self.max_entries, self.on_evict = entries, on_evict

    def __setitem__(self, key, value) -> None:
        if key not in self:
            while len(self) >= self.max_entries and len(self):
                self.popitem()
        super().__setitem__(key, value)

    def peek(self, key):
        """The stored value, expired or not, without the TTL bookkeeping of `get` (one dict lookup for
        the hot path; the caller checks the entry's age itself)."""
        return self._Cache__data.get(key)

    def popitem(self):
        key, value = super().popitem()
        if self.on_evict is not None:
            self.on_evict(key)
        return key, value

    def expire(self, time=None):
        expired = super().expire(time)
        if self.on_evict is not None:
            for key, _ in expired or ():
                self.on_evict(key)
        return expired


class CacheSize:
    """What /admin/upstreams and the gauges read of a cache held in `self.cache` (a BoundedCache), and
    the fallback episode in progress (for its log lines), whatever the protocol."""

    cache: BoundedCache
    upstream: str
    episode: str | None = None   # the reason of the fallback episode in progress, for logs
    served_in_episode = 0
    last_served = 0.0

    def __len__(self) -> int:
        self.cache.expire()
        return len(self.cache)

    @property
    def bytes(self) -> int:
        return self.cache.currsize


class FallbackCache(CacheSize):
    """Per (upstream, fallback spec); survives reloads that leave both unchanged."""

    def __init__(self, upstream: str, spec: FallbackSpec, clock: Clock, shared=None) -> None:
        self.upstream, self.spec, self.clock = upstream, spec, clock
        self.cache = BoundedCache(spec.cache_entries, spec.cache_bytes, spec.stale_ttl, clock.monotonic,
                                  getsizeof=lambda e: e.size)
        self.shared = shared  # the SharedCache of `fallback.shared` (proxy/fleet/cache.py), else None


    def store(self, key: Hashable, status: int, headers, body: bytes, shared_key=None) -> None:
        """Keep a fresh answer; with `shared_key` (a callable giving the request's shared digest, asked only
        when it is needed), queue it for the shared cache too — unless it is the same answer again within a
        second: the shared copy is as fresh as that."""
        if self.spec.cache_entries == 0 or len(body) > self.spec.max_body:
            return
        drop = _NOT_STORED
        listed = connection_listed(headers)
        if listed:
            drop = drop | listed  # hop-by-hop for this answer: never stored, so never served
        kept = tuple([(k, v) for k, v in headers.items() if k.lower() not in drop])
        now = self.clock.monotonic()
        old = self.cache.peek(key)
        if (old is not None and now - old.inserted < _REINSERT_AFTER and old.body == body
                and old.status == status and old.headers == kept):
            # The same answer again within a second (a hot key): only its freshness moves. A full
            # re-insert costs more than the rest of the fallback policy; doing it at most once a second
            # keeps the entry's expiry (stale_ttl) within a second of the latest answer.
            old.stored_at = now
            return
        entry = Entry(status, kept, body, now)
        if shared_key is not None and self.shared is not None:
            self.shared.put(shared_key(), status, kept, body)
        if entry.size > self.cache.maxsize:
            return
        self.cache[key] = entry

    def get(self, key: Hashable) -> Entry | None:
        """The entry while it is younger than stale_ttl. One dict lookup and the entry's own age, not
        TTLCache's get (three Python calls deep): this is the open-breaker path's every request. Expired
        entries are still evicted by the cache's own expiry (on store, and whenever its size is read).
        An entry in use moves to the recently-used end at most once a second, so a full cache evicts
        idle entries before the ones answering an outage."""
        e = self.cache.peek(key)
        if e is None:
            return None
        now = self.clock.monotonic()
        if now - e.inserted >= self.spec.stale_ttl:
            return None
        if now - e.touched >= _REINSERT_AFTER:
            e.touched = now
            self.cache.get(key)  # TTLCache's own get: it moves the key to the recently-used end
        return e

    def clear(self) -> int:
        n = len(self.cache)
        self.cache.clear()
        return n


def cache_key(req: ProxyRequest, vary: tuple[str, ...]) -> tuple[int, int]:
    """A fixed-size key (the path can be 64 KB; a cache of them must not be): two 64-bit hashes of
    method, path and query, and the `vary` headers' values. Python's string hash is keyed per process
    (SipHash), so a client cannot aim collisions; 128 bits make accidental ones moot. Process-local by
    design: the cache lives in this process only. Cheaper than a hashlib digest by ~2 µs a request."""
    ch = req.client_headers
    t = (req.method, req.path_qs, *(tuple(ch.getall(name, ())) for name in vary)) if vary else (req.method, req.path_qs)
    return hash(t), hash((t, 1))


def storable(resp: ProxyResponse) -> bool:
    if not 200 <= resp.status < 300 or resp.headers is None:
        return False
    if "Set-Cookie" in resp.headers:
        return False
    cc = resp.headers.get("Cache-Control", "").lower()
    return "no-store" not in cc and "private" not in cc


def store_after_body(cache, key, status: int, headers, shared_key, verdict: Verdict | None,
                     body: bytes | None) -> None:
    """After the body: a whole, successful body is stored (one over max_body is not kept)."""
    if verdict is Verdict.SUCCESS and body is not None:
        cache.store(key, status, headers, body, shared_key)


class Fallback:
    __slots__ = ("spec", "cache", "metrics", "clock", "methods", "vary", "private_ok", "static")

    def __init__(self, spec: FallbackSpec, cache: FallbackCache, clock: Clock, metrics) -> None:
        self.spec, self.cache, self.clock, self.metrics = spec, cache, clock, metrics
        self.methods = frozenset(spec.methods)
        self.vary = spec.vary
        self.private_ok = frozenset(h for h in _PRIVATE if h in spec.vary)
        self.static = spec.static

    def _key(self, req: ProxyRequest) -> tuple[int, int] | None:
        if req.method not in self.methods or self.spec.cache_entries == 0:
            return None
        ch = req.client_headers
        for h in _PRIVATE:
            if h in ch and h not in self.private_ok:
                return None  # a per-user answer must never be served to someone else
        return cache_key(req, self.vary)

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        key = self._key(req)
        resp = await call_next(req)
        if resp.verdict is Verdict.SUCCESS:
            self.fresh()
            if key is not None:
                self._keep(req, resp, key)
            return resp
        reason = resp.reason or Reason.UPSTREAM_ERROR
        served = self.serve(key, reason, req) if self.cache.shared is None else await self.recover(key, reason, req)
        if served is None:
            return resp
        resp.release()
        return served

    def _keep(self, req: ProxyRequest, resp: ProxyResponse, key: Hashable) -> None:
        """Store a fresh answer (now, or once its body has streamed through the listener)."""
        if not storable(resp):
            return
        # the digest is worked out only when the answer is really queued (not for a hot key's repeats)
        skey = functools.partial(self.shared_key, req, key) if self.cache.shared is not None else None
        if resp.body is not None and resp.stream is None:
            self.cache.store(key, resp.status, resp.headers, resp.body, skey)
        else:
            resp.after_body(functools.partial(store_after_body, self.cache, key, resp.status, resp.headers, skey),
                            self.spec.max_body)

    def shared_key(self, req: ProxyRequest, key: Hashable) -> str:
        """The request's identity in the shared cache: the same in every sidecar (the local key is
        not: Python's string hash is keyed per process). A digest, never the header values themselves."""
        ch = req.client_headers
        return digest(req.method, req.path_qs, [ch.getall(name, []) for name in self.vary])

    async def recover(self, key: Hashable | None, reason: Reason, req: ProxyRequest | None = None) -> ProxyResponse | None:
        """`serve`, asking the shared cache first when the local one has nothing fresh (only after a
        failure: this is never on the success path)."""
        shared = self.cache.shared
        if shared is None or key is None or req is None:
            return self.serve(key, reason, req)
        entry = self.cache.get(key)
        if entry is not None and self.source(entry.stored_at) == "cache":
            return self.serve(key, reason, req)
        found = await shared.get(self.shared_key(req, key))
        if found is None:
            return self.serve(key, reason, req)
        source, age = shared.source(found)
        if entry is not None and self.clock.monotonic() - entry.stored_at <= age:
            return self.serve(key, reason, req)  # the local stale copy is the younger one
        out = ProxyResponse(found.status, h := CIMultiDict(found.headers), found.body, outcome="fallback")
        h["Age"] = str(int(age))
        h["X-Fallback"] = source
        h["X-Fallback-Reason"] = reason.value
        out.source, out.reason = source, reason
        self.served(source, reason)
        return self.cached(out, reason)

    def cached(self, out: ProxyResponse, reason: Reason) -> ProxyResponse:
        """A hook for a cached answer on its way out (the LLM path marks the completion as a fallback)."""
        return out

    def source(self, stored_at: float) -> str:
        """`cache` while an entry is younger than cache_ttl, `stale` after (until stale_ttl evicts it)."""
        return "cache" if self.clock.monotonic() - stored_at < self.spec.cache_ttl else "stale"

    def served(self, source: str, reason: Reason) -> None:
        """A fallback answered (any protocol): the metric, and the episode's log lines."""
        self.metrics.fallback(source, reason.value)
        self._count_episode(reason)

    def fresh(self) -> None:
        """A fresh upstream answer: the fallback episode in progress (if any) may be over."""
        if self.cache.episode is not None:
            self._end_episode()

    def serve(self, key: Hashable | None, reason: Reason, req: ProxyRequest | None = None) -> ProxyResponse | None:
        entry = self.cache.get(key) if key is not None else None
        if entry is not None:
            source = self.source(entry.stored_at)
            out = ProxyResponse(entry.status, h := CIMultiDict(entry.headers), entry.body, outcome="fallback")
            h["Age"] = age = str(int(self.clock.monotonic() - entry.stored_at))
            h["X-Fallback"] = source
            h["X-Fallback-Reason"] = reason.value
            # the head as the listener will write it, without serialising the map again per answer
            out.head = [*entry.lines, f"Age: {age}\r\nX-Fallback: {source}\r\nX-Fallback-Reason: {reason.value}\r\n"]
            out.head_version = getversion(h)
            out.source, out.reason = source, reason
            self.served(source, reason)
            return out
        if self.static is not None:
            source = "static"
            st = self.static
            out = ProxyResponse(st.status, CIMultiDict(st.headers), st.body.encode(), outcome="fallback")
            out.headers["Content-Type"] = st.content_type
        else:
            return None
        out.source, out.reason = source, reason
        out.headers["X-Fallback"] = source
        out.headers["X-Fallback-Reason"] = reason.value
        self.served(source, reason)
        return out

    def _count_episode(self, reason: Reason) -> None:
        c = self.cache
        c.last_served = self.clock.monotonic()
        if c.episode is None:
            c.episode, c.served_in_episode = reason.value, 0
            log.warning("fallback_started", upstream=c.upstream, reason=reason.value)
        c.served_in_episode += 1

    def _end_episode(self) -> None:
        """An episode ends at a fresh answer at least a second after the last fallback: scattered errors
        make one episode, not a log line per request."""
        c = self.cache
        if self.clock.monotonic() - c.last_served < _EPISODE_QUIET:
            return
        log.info("fallback_ended", upstream=c.upstream, reason=c.episode, served=c.served_in_episode)
        c.episode = None
