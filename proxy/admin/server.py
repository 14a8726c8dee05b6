"""Admin listener (off the data path), on the same small HTTP/1.1 server as the egress listeners (aiohttp
is not even imported unless something needs its client): `/health/*` and `/metrics` never need a token; `/admin/*` needs
`Authorization: Bearer <token>` for every mutating call, and for reads too when the admin listener binds
a non-loopback address. With no token configured those calls get 403. Tokens are compared in constant
time and re-read from `admin.token_file` on each call, so a rotated Secret applies at once."""

from __future__ import annotations

import asyncio
import hmac
import re
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import __version__
from proxy.admin import bodies
from proxy.admin.probes import readiness
from proxy.admin.ui import HEADERS as UI_HEADERS
from proxy.admin.ui import StatusPage, asset
from proxy.http1.server import BodyTooLarge, Request, Response, json_response
from proxy.obs import log, redact
from proxy.settings import redacted
from proxy.settings.spec import is_loopback, parse_listen

_PAGE = frozenset({"/admin/ui", "/admin/ui.js", "/admin/ui.css"})


def _json_error(status: int, message: str) -> Response:
    return json_response({"error": {"type": "admin", "message": message}}, status=status)


class _NotFound(Exception):
    pass


class Admin:
    def __init__(self, app) -> None:
        self.app = app
        self.started = time.monotonic()
        self.status_page = StatusPage(app)

        r = re.compile
        # (method, path pattern, handler); GET routes answer HEAD too
        self.routes = [
            ("GET", r(r"/metrics"), self.metrics),
            ("GET", r(r"/health/live"), self.live),
            ("GET", r(r"/health/ready"), self.ready),
            ("GET", r(r"/health/startup"), self.startup),
            ("GET", r(r"/health"), self.health),
            ("GET", r(r"/app-health/(?P<kind>live|ready)"), self.app_health),
            ("GET", r(r"/admin/(?P<asset>ui|ui\.js|ui\.css)"), self.ui),
            ("GET", r(r"/admin/status"), self.status),
            ("GET", r(r"/admin/upstreams"), self.upstreams),
            ("GET", r(r"/admin/config"), self.config),
            ("POST", r(r"/admin/upstreams/(?P<name>[^/]+)/breaker"), self.breaker),
            ("DELETE", r(r"/admin/upstreams/(?P<name>[^/]+)/cache"), self.purge),
            ("POST", r(r"/admin/upstreams/(?P<name>[^/]+)/weights"), self.set_weights),
            ("POST", r(r"/admin/log-level"), self.log_level),
            ("POST", r(r"/admin/reload"), self.reload),
        ]

    async def handle(self, request: Request) -> Response:
        path, method = request.path, request.method
        denied = self._auth(request)  # before routing: without a token, /admin/* tells nothing, not even 404s
        if denied is not None:
            return denied
        allowed = []
        for m, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if m == method or (m == "GET" and method == "HEAD"):
                if request.body_exists and request.headers.get("Expect", "").lower() == "100-continue":
                    await request.send_continue()
                try:
                    return await handler(request, match.groupdict())
                except _NotFound:
                    return _json_error(404, "no such upstream")
                except bodies.BadBody as exc:
                    return _json_error(400, str(exc))
                except BodyTooLarge as exc:
                    return _json_error(413, str(exc))
                except ConnectionResetError:
                    return _json_error(400, "the request body was malformed or cut short")
            allowed.append(m)
        if allowed:
            r = _json_error(405, f"{method} is not allowed here")
            r.headers["Allow"] = ", ".join(sorted(set(allowed) | ({"HEAD"} if "GET" in allowed else set())))
            return r
        return _json_error(404, f"no such path: {path}")

    # -- auth ----------------------------------------------------------------------------------------
    def _token(self) -> str | None:
        path = self.app.runtime.settings.admin.token_file
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _auth(self, request: Request) -> Response | None:
        if not request.path.startswith("/admin/"):
            return None
        if request.path in _PAGE and request.method in ("GET", "HEAD"):
            return None  # the page's files hold no data: its fetches of /admin/status carry the token
        mutating = request.method not in ("GET", "HEAD")
        host, _ = parse_listen(self.app.runtime.settings.admin.listen)
        if mutating or not is_loopback(host):
            token = self._token()
            if token is None:
                return _json_error(403, "admin calls need a token: set admin.token_file")
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return _json_error(401, "missing or wrong bearer token")
        return None

    # -- probes and metrics ----------------------------------------------------------------------------
    async def metrics(self, request: Request, params: dict) -> Response:
        body = generate_latest(self.app.metrics.registry)
        return Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(self, request: Request, params: dict) -> Response:
        """The process and its event loop answer. Never depends on upstreams or the app."""
        lag = self.app.loop_lag
        limit = self.app.runtime.settings.liveness.max_loop_lag
        ok = lag <= limit
        return json_response({"status": "alive" if ok else "event_loop_stalled", "loop_lag_seconds": round(lag, 4),
                                  "max_loop_lag_seconds": limit}, status=200 if ok else 503)

    async def ready(self, request: Request, params: dict) -> Response:
        ok, body = readiness(self.app)
        return json_response(body, status=200 if ok else 503)

    async def startup(self, request: Request, params: dict) -> Response:
        """The sidecar alone (config loaded, listeners bound, first checks done), never the app: the
        app's start may be gated on this."""
        ok = self.app.started and self.app.checks_done
        return json_response({"started": ok, "listeners_bound": self.app.started,
                                  "first_checks_done": self.app.checks_done}, status=200 if ok else 503)

    async def health(self, request: Request, params: dict) -> Response:
        ok, body = readiness(self.app)
        live = self.app.loop_lag <= self.app.runtime.settings.liveness.max_loop_lag
        body.update({"live": live, "version": __version__,
                     "uptime_seconds": round(time.monotonic() - self.started, 1), "config_hash": self.app.runtime.digest})
        if self.app.last_reload_error:
            body["last_reload_error"] = self.app.last_reload_error  # field paths and reasons; secrets scrubbed
        return json_response(body, status=200 if ok and live else 503)

    async def app_health(self, request: Request, params: dict) -> Response:
        """The app's own probe endpoint, proxied, so its probes can point at the sidecar's port without
        coupling the sidecar's liveness to the app."""
        spec = self.app.runtime.settings.app
        url = spec.live_url if params["kind"] == "live" else spec.ready_url
        if not url:
            return json_response({"error": f"app.{params['kind']}_url is not configured"}, status=404)
        import aiohttp  # only when the app's probes are proxied

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=spec.timeout)) as s:
                async with s.get(url) as r:
                    body = await r.read()
                    return Response(status=r.status, body=body,
                                    content_type=r.content_type or "application/octet-stream")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return json_response({"error": f"app did not answer: {type(exc).__name__}"}, status=503)

    # -- /admin ----------------------------------------------------------------------------------------
    def _upstream(self, params: dict):
        up = self.app.runtime.upstreams.get(params["name"])
        if up is None:
            raise _NotFound
        return up

    # -- the status page ---------------------------------------------------------------------------------
    async def ui(self, request: Request, params: dict) -> Response:
        body, ctype = asset(params["asset"])
        return Response(body=body, headers={"Content-Type": ctype, **UI_HEADERS})

    async def status(self, request: Request, params: dict) -> Response:
        r = json_response(self.status_page.status())
        r.headers["Cache-Control"] = "no-store"
        return r

    async def upstreams(self, request: Request, params: dict) -> Response:
        out = {}
        for name, up in self.app.runtime.upstreams.items():
            c = up.counters
            targets = {}
            for t in up.targets:
                b = t.breaker
                targets[t.name] = {
                    "url": redact.url(t.spec.url), "weight": t.weight, "effective_weight": up.weights.get(t.name, 0),
                    "canary": t.canary.snapshot() if t.canary is not None else None,
                    "breaker": {"state": b.state, "failures": b.cb.fail_counter, "opened_total": b.opened_total,
                                "last_failure": b.last_failure},
                }
                if t.models is not None:
                    targets[t.name]["model_breakers"] = {
                        m: {"state": mb.state, "failures": mb.cb.fail_counter, "opened_total": mb.opened_total,
                            "last_failure": mb.last_failure} for m, mb in t.models.items()}
                pool = t.pool.snapshot()
                if pool is not None:
                    targets[t.name]["pool"] = pool
            caches = {r.name: {"entries": len(r.cache), "bytes": r.cache.bytes} for r in up.routes}
            if up.cache is not None:
                caches = {"default": {"entries": len(up.cache), "bytes": up.cache.bytes},
                          "client_connections": up.connections}
            out[name] = {"protocol": up.spec.protocol, "listen": up.spec.listen, "in_flight": c.in_flight,
                         "retries_in_flight": c.budget.retries, "retry_budget": c.budget.limit,
                         "retry_budget_exhausted": c.budget.exhausted, "targets": targets, "cache": caches}
        return json_response(out)

    async def config(self, request: Request, params: dict) -> Response:
        body = {"hash": self.app.runtime.digest, "config": redacted(self.app.runtime.loaded)}
        if self.app.last_reload_error:
            body["last_reload_error"] = self.app.last_reload_error
        return json_response(body)

    async def breaker(self, request: Request, params: dict) -> Response:
        up = self._upstream(params)
        raw = await request.read()  # over its limit: 413 (handle), not a 400 about the JSON
        body = bodies.parse(bodies.BreakerBody, raw, '{"track": "<name>", "state": "open|closed|auto"}')
        state, track = body.state, body.track or up.targets[0].name
        target = up.by_name.get(track)
        if target is None:
            return _json_error(404, f"no track {track!r} on upstream {up.name!r}")
        if body.model is not None:
            br = (target.models or {}).get(body.model)
            if br is None:
                known = ", ".join(target.models) if target.models else "none: not an openai upstream"
                return _json_error(404, f"no model breaker {body.model!r} on track {track!r} (known: {known})")
            br.force(state)
            return json_response({"upstream": up.name, "track": track, "model": body.model, "state": br.state})
        target.breaker.force(state)
        return json_response({"upstream": up.name, "track": track, "state": target.breaker.state})

    async def set_weights(self, request: Request, params: dict) -> Response:
        """`{"stable": 100, "canary": 0}`: a blue/green switch or a rollback by hand. Holds until the
        configured weights change; clears an automatic abort of the tracks it names."""
        up = self._upstream(params)
        raw = await request.read()
        weights = bodies.parse(bodies.WEIGHTS, raw, '{"stable": 95, "canary": 5}: whole numbers 0..100')
        unknown = [k for k in weights if k not in up.by_name]
        if unknown:
            return _json_error(400, f"{unknown[0]}: no such track (tracks: {', '.join(sorted(up.by_name))})")
        merged = {**up.configured_weights, **weights}
        if sum(merged.values()) == 0:
            return _json_error(400, "at least one track needs a weight above 0")
        self.app.store.weights[up.name] = (dict(up.configured_weights), merged)
        for name in weights:
            c = up.by_name[name].canary
            if c is not None and c.aborted:
                c.aborted = None
                c.window.clear()
        up.refresh_tracks()
        log.warning("weights_set", upstream=up.name, weights=merged)
        return json_response({"upstream": up.name, "weights": up.weights})

    async def purge(self, request: Request, params: dict) -> Response:
        up = self._upstream(params)
        removed = sum(c.clear() for c in up.caches())
        log.info("cache_purged", upstream=up.name, entries=removed)
        return json_response({"upstream": up.name, "removed": removed})

    async def log_level(self, request: Request, params: dict) -> Response:
        raw = await request.read()
        level = bodies.parse(bodies.LogLevelBody, raw, '{"level": "debug|info|warning|error"}').level.lower()
        log.set_level(level)
        log.info("log_level_changed", level=level)
        return json_response({"level": level})

    async def reload(self, request: Request, params: dict) -> Response:
        # shielded: a caller that hangs up must not cancel a reload half-way through its binds
        ok, message = await asyncio.shield(self.app.reload(reason="admin"))
        return json_response({"reloaded": ok, "message": message, "hash": self.app.runtime.digest},
                                 status=200 if ok else 422)

