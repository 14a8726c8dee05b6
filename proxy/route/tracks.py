"""Track choice, per request, first match wins:

1. The override header: `always` → the canary (the second track), `never` → the first track, or a
   track's name. Anything else is the client's mistake (400).
2. A sticky key (a header, or a cookie if configured) hashes into 10,000 buckets; the canary tracks own
   the lowest buckets in proportion to their weight. Monotonic: a key on the canary at 5% stays on it at
   20% and 50%, because raising the weight only adds buckets.
3. Otherwise weighted random.

A track whose breaker is open hands its share to the healthy tracks, unless the request forced it.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from http.cookies import CookieError, SimpleCookie

BUCKETS = 10_000


class BadOverride(Exception):
    pass


def bucket(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") % BUCKETS


class TrackChooser:
    """Built per config load (and whenever effective weights change) from (target, weight) pairs."""

    def __init__(self, targets, weights: dict[str, int], canary) -> None:
        self.targets = targets
        self.by_name = {t.name: t for t in targets}
        self.canary = canary
        self.first = targets[0]
        self.second = targets[1] if len(targets) > 1 else targets[0]
        live = [(t, weights.get(t.name, 0)) for t in targets if weights.get(t.name, 0) > 0]
        if not live:  # every weight 0 (all aborted?): the first track keeps the traffic
            live = [(self.first, 1)]
        self.live = [t for t, _ in live]
        total = sum(w for _, w in live)
        self.cum = []
        acc = 0
        for _, w in live:
            acc += w
            self.cum.append(acc)
        self.total = total
        # Sticky ranges: canary tracks (all but the first) from bucket 0 up, the first track above them.
        self.sticky: list[tuple[int, object]] = []
        edge = 0
        for t in targets[1:]:
            w = weights.get(t.name, 0)
            if w > 0:
                edge += round(BUCKETS * w / total)
                self.sticky.append((edge, t))
        self.single = self.live[0] if len(self.live) == 1 else None

    def forced(self, headers) -> object | None:
        c = self.canary
        if c is None or not c.override_header:
            return None
        value = headers.get(c.override_header)
        if value is None:
            return None
        v = value.strip()
        lv = v.lower()
        if lv == "always":
            return self.second
        if lv == "never":
            return self.first
        t = self.by_name.get(v)
        if t is None:
            names = ", ".join(self.by_name)
            raise BadOverride(f"{c.override_header} must be always, never or a track name ({names}), got {v[:64]!r}")
        return t

    def sticky_key(self, headers) -> str | None:
        c = self.canary
        if c is None:
            return None
        if c.sticky_header:
            v = headers.get(c.sticky_header)
            if v:
                return v
        if c.sticky_cookie and "Cookie" in headers:
            try:
                jar = SimpleCookie(headers.get("Cookie"))
            except CookieError:
                return None
            m = jar.get(c.sticky_cookie)
            if m is not None and m.value:
                return m.value
        return None

    def choose(self, headers=None, rand=random.random):
        """→ (target, forced)."""
        if headers is not None:
            forced = self.forced(headers)
            if forced is not None:
                return forced, True
            key = self.sticky_key(headers)
            if key is not None:
                b = bucket(key)
                for edge, t in self.sticky:
                    if b < edge:
                        return self._healthy(t), False
                return self._healthy(self.first if self.first in self.live else self.live[0]), False
        if self.single is not None:
            return self._healthy(self.single), False
        t = self.live[bisect_right(self.cum, rand() * self.total)]
        return self._healthy(t), False

    def _healthy(self, t):
        if t.breaker.is_open:
            for other in self.live:
                if not other.breaker.is_open:
                    return other
        return t
