"""`resilience-proxy wait-ready` and `resilience-proxy status`: small clients of the admin API for the pod's
start gate and for an operator's terminal. Not on the data path."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from proxy.obs.metrics import bucket_p99

DEFAULT_ADMIN = os.environ.get("PROXY_ADMIN_URL", "http://127.0.0.1:9901")


def wait_ready(admin: str, timeout: float) -> int:
    """Exit 0 once /health/startup is 200 (the sidecar alone, never the app), 1 on timeout."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(admin.rstrip("/") + "/health/startup", timeout=2) as r:
                if r.status == 200:
                    print("resilience-proxy is started")
                    return 0
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.2)
    print(f"resilience-proxy did not start within {timeout:g}s ({last})", file=sys.stderr)
    return 1


def _get(url: str, token: str | None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()


def _scrape(admin: str) -> dict:
    """Per (name, track): totals we need, from /metrics."""
    out: dict = {}
    text = _get(admin.rstrip("/") + "/metrics", None).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name, track = s.labels.get("name"), s.labels.get("track")
            if s.name == "upstream_requests_total":
                row = out.setdefault((name, track), {"req": 0.0, "err": 0.0, "fb": 0.0, "buckets": {}})
                row["req"] += s.value
                st = s.labels.get("status", "")
                if st.startswith("5") or st in ("reset", "error", "timeout"):
                    row["err"] += s.value
                if s.labels.get("outcome") == "fallback":
                    row["fb"] += s.value
            elif s.name == "upstream_request_duration_seconds_bucket":
                row = out.setdefault((name, track), {"req": 0.0, "err": 0.0, "fb": 0.0, "buckets": {}})
                row["buckets"][float(s.labels["le"])] = s.value
            elif s.name == "upstream_retries_total":
                out.setdefault(("_retries", name), {"n": 0.0})["n"] += s.value
    return out


def _p99(b1: dict, b0: dict) -> str:
    le = bucket_p99(b1, b0)
    return "-" if le is None else "inf" if le == float("inf") else f"<{le:g}s"


def render(admin: str, token: str | None, interval: float) -> str:
    s0 = _scrape(admin)
    time.sleep(interval)
    s1 = _scrape(admin)
    try:
        ups = json.loads(_get(admin.rstrip("/") + "/admin/upstreams", token))
    except urllib.error.HTTPError as exc:
        ups = {}
        note = f"(/admin/upstreams: HTTP {exc.code}; pass --token-file)"
    else:
        note = ""
    try:
        ready = json.loads(_get(admin.rstrip("/") + "/health/ready", None))
    except urllib.error.HTTPError as exc:
        ready = json.loads(exc.read() or b"{}")
    deps = ready.get("dependencies", {})
    header = f"{'UPSTREAM':<14}{'TRACK':<10}{'BREAKER':<14}{'REQ/S':>8}{'ERR%':>7}{'P99':>9}{'RETRY/S':>9}{'FALLBK/S':>9}{'CACHE':>7}  HEALTH"
    lines = [f"resilience-proxy at {admin}  ready={ready.get('ready')}  {note}".rstrip(), header]
    names = sorted({n for n, _ in s1 if not n.startswith("_")} | set(ups) | set(deps))
    for name in names:
        tracks = sorted({t for n, t in s1 if n == name} | set((ups.get(name) or {}).get("targets", {})))
        r1, r0 = s1.get(("_retries", name), {"n": 0}), s0.get(("_retries", name), {"n": 0})
        retries = (r1["n"] - r0["n"]) / interval
        cache = sum(c.get("entries", 0) for c in (ups.get(name) or {}).get("cache", {}).values() if isinstance(c, dict))
        for t in tracks:
            a, b = s1.get((name, t), {"req": 0, "err": 0, "fb": 0, "buckets": {}}), s0.get((name, t), {"req": 0, "err": 0, "fb": 0, "buckets": {}})
            req = (a["req"] - b["req"]) / interval
            err = (a["err"] - b["err"]) / max(a["req"] - b["req"], 1) * 100
            fb = (a["fb"] - b["fb"]) / interval
            br = ((ups.get(name) or {}).get("targets", {}).get(t) or {}).get("breaker", {}).get("state") or \
                (deps.get(name, {}).get("tracks", {}).get(t, {}).get("breaker", "?"))
            health = deps.get(name, {}).get("status", "?")
            lines.append(f"{name:<14}{t:<10}{br:<14}{req:>8.1f}{err:>6.1f}%{_p99(a['buckets'], b['buckets']):>9}"
                         f"{retries:>9.1f}{fb:>9.1f}{cache:>7}  {health}")
            models = deps.get(name, {}).get("tracks", {}).get(t, {}).get("model_breakers") or {}
            not_closed = [f"{m} {st}" for m, st in models.items() if st != "closed"]
            if not_closed:  # openai: a model whose breaker is not closed gets its traffic failed over
                lines.append(f"{'':<14}{'':<10}models: {', '.join(not_closed)}")
    return "\n".join(lines)


def status(admin: str, token_file: str | None, watch: bool, interval: float = 1.0) -> int:
    token = None
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    try:
        while True:
            out = render(admin, token, interval)
            if watch:
                sys.stdout.write("\x1b[2J\x1b[H")
            print(out, flush=True)
            if not watch:
                return 0
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach {admin}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 0


