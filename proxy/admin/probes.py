"""What the kubelet's probes see, computed from state the background checkers keep (never a fan-out).

Readiness is fallback-aware: a critical upstream makes the pod unready only when it is down (every track
that takes traffic has an open breaker or failing active checks) *and* nothing can stand in for it (no
cached entries, no static or degraded answer). A non-critical upstream never does; it shows `degraded`.
One shared dependency going down must not take every pod out of its Service at once.
"""

from __future__ import annotations

from proxy.upstream.health import rfc3339


def _target_down(t) -> bool:
    h = t.health
    return t.breaker.is_open or (h is not None and h.healthy is False)


def fallback_available(up) -> bool:
    """Cached entries, or an answer the protocol can make without the upstream (static, degraded)."""
    return any(len(c) > 0 for c in up.caches()) or up.protocol.stand_in(up)


def _track(t) -> dict:
    h = t.health
    out = {"breaker": t.breaker.state, "weight": t.weight, "check": None}
    if t.models is not None:
        # shown, not judged: an open model breaker sends traffic to the next model, the track is up
        out["model_breakers"] = {m: mb.state for m, mb in t.models.items()}
    if h is not None and h.active:
        out["check"] = "passing" if h.healthy else "failing" if h.healthy is False else "pending"
        if h.healthy is False:
            out["check_error"] = h.last_error
    return out


def dependency(up) -> dict:
    live = [t for t in up.targets if t.weight > 0] or up.targets
    down = all(_target_down(t) for t in live)
    some_down = any(_target_down(t) for t in up.targets)
    fb = fallback_available(up)
    critical = up.spec.health.critical
    if not down:
        status = "degraded" if some_down else "up"
    elif critical and not fb:
        status = "down"
    else:
        status = "degraded"
    first = live[0]
    checks = [t.health.last_check for t in up.targets if t.health is not None and t.health.last_check]
    return {
        "healthy": not down, "status": status, "critical": critical,
        "breaker": first.breaker.state.replace("forced_", ""), "fallback_available": fb,
        "last_check": rfc3339(max(checks)) if checks else None,
        "tracks": {t.name: _track(t) for t in up.targets},
    }


def readiness(app) -> tuple[bool, dict]:
    deps = {name: dependency(up) for name, up in app.runtime.upstreams.items()}
    body: dict = {"dependencies": deps}
    reasons = []
    if app.draining:
        reasons.append("shutting_down")
    if not app.started:
        reasons.append("starting")
    a = app.app_health
    if a is not None and a.spec.ready_url:
        body["app"] = {"configured": True, "ready": bool(a.ready), "status_code": a.status,
                       "last_check": rfc3339(a.last_check)}
        if not a.ready:
            reasons.append("app_not_ready")
    else:
        body["app"] = {"configured": False}
    for name, d in deps.items():
        if d["status"] == "down":
            reasons.append(f"dependency_down:{name}")
    ready = not reasons
    body = {"status": "ready" if ready else "not_ready", "ready": ready, **({"reasons": reasons} if reasons else {}),
            **body}
    return ready, body


def health_samples(app):
    """`upstream_health{name,track}`: 1 when the track can take traffic (checks passing or none, breaker not
    open), else 0. Computed at scrape time from the live state."""
    rt = app.runtime
    if rt is None:
        return
    for name, up in rt.upstreams.items():
        for t in up.targets:
            yield name, t.name, 0.0 if _target_down(t) else 1.0


def in_flight_samples(app):
    rt = app.runtime
    if rt is None:
        return
    for name, up in rt.upstreams.items():
        yield name, float(up.counters.in_flight)


def cache_samples(app, attr: str):
    rt = app.runtime
    if rt is None:
        return
    for name, up in rt.upstreams.items():
        caches = up.caches()
        yield name, float(sum(len(c) if attr == "entries" else c.bytes for c in caches))
