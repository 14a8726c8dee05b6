"""Stale-read fallback for Redis: the last successful reply per (db, protocol version, full command),
bounded by entries and bytes (cachetools), with an index from key to cached commands so a write drops
exactly the reads it affects. State: survives a reload while (upstream, fallback spec) is unchanged. The
fallback policy (proxy/policy/fallback.py) answers from it only when the upstream failed, the breaker
is open or the command was shed."""

from __future__ import annotations

from proxy.clock import Clock
from proxy.policy.fallback import BoundedCache, CacheSize
from proxy.settings.spec import FallbackSpec

_REFRESH = 0.25  # seconds: an unchanged answer is re-stored at most this often (it only ages the entry)


class RedisCache(CacheSize):
    def __init__(self, upstream: str, spec: FallbackSpec, clock: Clock) -> None:
        self.upstream, self.spec, self.clock = upstream, spec, clock
        self.index: dict[tuple[int, bytes], set[tuple]] = {}   # (db, key) → cache keys
        self.by_db: dict[int, set[tuple]] = {}
        self.cache = BoundedCache(spec.cache_entries, spec.cache_bytes, spec.stale_ttl, clock.monotonic,
                                  getsizeof=lambda v: len(v[1]) + len(v[0]) + 64, on_evict=self._forget)
        self._refresh = min(_REFRESH, spec.stale_ttl)  # never skip re-storing an entry that has expired


    def _forget(self, ckey: tuple) -> None:
        db = ckey[0]
        s = self.by_db.get(db)
        if s is not None:
            s.discard(ckey)
        for k in ckey[3]:
            ix = self.index.get((db, k))
            if ix is not None:
                ix.discard(ckey)
                if not ix:
                    del self.index[(db, k)]

    def store(self, db: int, proto: int, raw_command: bytes, keys: list[bytes], reply: bytes) -> None:
        if self.spec.cache_entries == 0 or len(reply) > self.spec.max_body:
            return
        if len(reply) + len(raw_command) + 64 > self.cache.maxsize:
            return  # larger than the whole cache: never stored (cachetools would raise)
        ckey = (db, proto, raw_command, tuple(keys))
        now = self.clock.monotonic()
        old = self.cache.peek(ckey)  # one dict lookup, expired or not (an expired one is older than this)
        if old is not None and old[1] == reply and now - old[2] < self._refresh:
            return  # the same answer stored a moment ago: a hot key costs a lookup, not an insert
        self.cache[ckey] = (raw_command, reply, now)
        self.by_db.setdefault(db, set()).add(ckey)
        for k in keys:
            self.index.setdefault((db, k), set()).add(ckey)

    def get(self, db: int, proto: int, raw_command: bytes, keys: list[bytes]) -> tuple[bytes, float] | None:
        """→ (the reply, when it was stored): the fallback policy says whether that is fresh or stale."""
        hit = self.cache.get((db, proto, raw_command, tuple(keys)))
        return (hit[1], hit[2]) if hit is not None else None

    def invalidate(self, db: int, keys: list[bytes]) -> None:
        for k in keys:
            for ckey in list(self.index.get((db, k), ())):
                self.cache.pop(ckey, None)
                self._forget(ckey)
        # keyless reads (DBSIZE, KEYS, SCAN) of this db are affected by any write
        for ckey in [c for c in self.by_db.get(db, ()) if not c[3]]:
            self.cache.pop(ckey, None)
            self._forget(ckey)

    def clear_db(self, db: int | None) -> None:
        for ckey in list(self.cache.keys()):
            if db is None or ckey[0] == db:
                self.cache.pop(ckey, None)
                self._forget(ckey)

    def clear(self) -> int:
        n = len(self.cache)
        self.cache.clear()
        self.index.clear()
        self.by_db.clear()
        return n

