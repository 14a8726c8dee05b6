"""The status page (`/admin/ui`) and what it reads (`/admin/status`): per upstream and track what
`resilience-proxy status --watch` shows — breaker state and its last transitions, request and error
rates, p99, retries, fallbacks by reason, cache entries, weights and canary aborts, health — with the
last ten minutes sampled every five seconds for the sparklines. Off the data path: sampling reads the
counters (proxy/obs/metrics.py `status_totals`) on the admin's own timer.

The page is three static files (proxy/admin/ui/) served with a strict Content-Security-Policy: no inline
script, no external assets (it works offline, through `kubectl port-forward`), data rendered as text
only. The page itself holds no data, so it needs no token; `/admin/status` is an admin read like any
other (a token when the admin listener is not on loopback): the page asks for it once and keeps it in
sessionStorage, sending it as a Bearer header — a browser cannot send one on navigation.
"""

from __future__ import annotations

import asyncio
import collections
import time
from importlib import resources

from proxy import __version__
from proxy.obs.metrics import bucket_p99

SAMPLE_EVERY = 5.0
KEEP = 120  # ten minutes of samples
_FILES = {"ui": ("index.html", "text/html; charset=utf-8"), "ui.js": ("ui.js", "text/javascript; charset=utf-8"),
          "ui.css": ("ui.css", "text/css; charset=utf-8")}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def asset(name: str) -> tuple[bytes, str] | None:
    """(body, content type) of one of the page's files, or None."""
    found = _FILES.get(name)
    if found is None:
        return None
    filename, ctype = found
    return resources.files("proxy.admin").joinpath("ui", filename).read_bytes(), ctype


def _p99(now: dict, then: dict | None) -> float | None:
    le = bucket_p99(now, then)
    return None if le == float("inf") else le  # JSON has no infinity: past the last bound shows as unknown


def _interval(a: dict | None, b: dict | None, seconds: float) -> tuple[float | None, float | None, float | None]:
    """(requests/s, failed share, p99) of one track between two samples (b older; None: no series yet)."""
    if a is None:
        return None, None, None
    n = a["requests"] - (b["requests"] if b else 0.0)
    answered = n - (a["shed"] - (b["shed"] if b else 0.0))
    failed = a["failed"] - (b["failed"] if b else 0.0)
    return (round(n / max(seconds, 1e-9), 3), round(failed / answered, 4) if answered > 0 else None,
            _p99(a["buckets"], b["buckets"] if b else None))


class StatusPage:
    def __init__(self, app) -> None:
        self.app = app
        self.samples: collections.deque[tuple[float, dict]] = collections.deque(maxlen=KEEP)

    def sample(self) -> None:
        self.samples.append((time.monotonic(), self.app.metrics.status_totals()))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)

    # -- what /admin/status answers -----------------------------------------------------------------
    def status(self) -> dict:
        from proxy.admin.probes import _target_down, readiness

        now_t, now = time.monotonic(), self.app.metrics.status_totals()
        points = [*self.samples, (now_t, now)]
        # the current rates: against the newest sample at least one interval old (else the oldest)
        ref_t, ref = next(((t, s) for t, s in reversed(self.samples) if now_t - t >= SAMPLE_EVERY * 0.9),
                          self.samples[0] if self.samples else (now_t, now))
        span = max(now_t - ref_t, 1e-9)
        ready, body = readiness(self.app)
        deps = body.get("dependencies", {})
        out = []
        for name, up in self.app.runtime.upstreams.items():
            u_now, u_ref = now["upstreams"].get(name, {}), ref["upstreams"].get(name, {})
            fallbacks = {reason: round((n - u_ref.get("fallbacks", {}).get(reason, 0.0)) / span, 3)
                         for reason, n in u_now.get("fallbacks", {}).items()}
            dep = deps.get(name, {})
            tracks = []
            for t in up.targets:
                key = (name, t.name)
                a = now["tracks"].get(key)
                rate, err, p99 = _interval(a, ref["tracks"].get(key), span)
                br = t.breaker
                tracks.append({
                    "name": t.name, "weight": t.weight, "effective_weight": up.weights.get(t.name, 0),
                    "breaker": br.state, "last_failure": br.last_failure,
                    "transitions": [{"at": round(at, 3), "from": f, "to": to, "reason": why}
                                    for at, f, to, why in list(br.transitions)[-5:]],
                    "model_breakers": {m: mb.state for m, mb in (t.models or {}).items()},
                    "rate": rate, "error_ratio": err, "p99_seconds": p99,
                    "aborted": bool(t.canary is not None and t.canary.aborted),
                    "aborts": (a or {}).get("aborts", 0.0),
                    "health": "down" if _target_down(t) else "up",
                    "check": dep.get("tracks", {}).get(t.name, {}).get("check"),
                    "series": self._series(points, key),
                })
            out.append({
                "name": name, "protocol": up.spec.protocol, "listen": up.spec.listen, "health": dep.get("status"),
                "in_flight": up.counters.in_flight,
                "retry_rate": round((u_now.get("retries", 0.0) - u_ref.get("retries", 0.0)) / span, 3),
                "fallbacks": fallbacks, "cache_entries": sum(len(c) for c in up.caches()), "tracks": tracks,
            })
        return {"ready": ready, "version": __version__, "config_hash": self.app.runtime.digest,
                "sample_seconds": SAMPLE_EVERY, "generated_at": round(time.time(), 3), "upstreams": out}

    @staticmethod
    def _series(points: list[tuple[float, dict]], key: tuple[str, str]) -> dict:
        """Per interval between consecutive samples: requests/s, failed share, p99 (None where no answer)."""
        steps = [_interval(s1["tracks"].get(key), s0["tracks"].get(key), t1 - t0)
                 for (t0, s0), (t1, s1) in zip(points, points[1:], strict=False)]
        return {"rate": [r or 0.0 for r, _, _ in steps], "error_ratio": [e for _, e, _ in steps],
                "p99_seconds": [p for _, _, p in steps]}
