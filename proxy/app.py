"""Composition root: `run()` starts the proxy; `ProxyApp` binds the listeners (each from its upstream's
protocol) and the admin server, owns the current Runtime, reloads it, and drains on SIGTERM.

Hot reload is build → validate → swap with one assignment → drain the old: a request reads
`app.runtime` once at entry. A changed `listen` binds the new address before the swap and closes the
old one after it; a config that fails to load or bind leaves the running one in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys

from proxy.admin.probes import cache_samples, health_samples, in_flight_samples
from proxy.admin.server import Admin
from proxy.clock import REAL, Clock
from proxy.http1.server import Server as ListenerServer
from proxy.obs import log
from proxy.obs.metrics import METRICS, Metrics
from proxy.runtime import Runtime
from proxy.settings import ConfigError, Loaded, load
from proxy.settings.loader import digest
from proxy.settings.spec import parse_listen
from proxy.upstream.health import AppHealth
from proxy.upstream.state import StateStore

EXIT_CONFIG, EXIT_RUNTIME = 1, 3  # the exit codes of `resilience-proxy run` (proxy/cli.py)


async def run(path: str, loaded: Loaded, ready_hook=None) -> int:
    """Start the proxy on a loaded config, serve until SIGTERM/SIGINT, and return the exit code: 1 for a
    config the runtime refuses (an unreadable certificate), 3 for a runtime failure (a port in use).
    `ready_hook(app)` runs once it is serving (the demo prints its commands)."""
    app = ProxyApp(path)
    try:
        await app.start(loaded)
    except ConfigError as exc:
        print(f"{path}: invalid config, not starting:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if ready_hook is not None:
        await ready_hook(app)
    _settle_memory()
    return await app.serve()


def _settle_memory() -> None:
    """Once started: everything imported and built so far lives as long as the process, so move it out
    of the collector's reach (gc.freeze: later collections walk only what requests allocate) and give
    the heap that start-up freed back to the system (glibc's malloc_trim; absent elsewhere, skipped)."""
    import ctypes
    import gc

    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StartupError(Exception):
    """A runtime failure at start (exit code 3), e.g. a port already in use."""


def os_reason(exc: OSError) -> str:
    """`Address already in use`, whichever loop raised it (uvloop leaves strerror unset)."""
    return os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))


async def listen_on(where: str, address: str, factory, backlog: int = 1024):
    """Bind one listener: every listener of the proxy (egress, inbound, admin) is bound here, and a bind
    that fails is a StartupError naming the config field."""
    host, port = parse_listen(address)
    try:
        return await asyncio.get_running_loop().create_server(factory, host, port, reuse_address=True,
                                                             backlog=backlog)
    except OSError as exc:
        raise StartupError(f"{where} {host}:{port}: {os_reason(exc)}") from None


class _Bound:
    __slots__ = ("key", "server", "web_server")

    def __init__(self, key, server, web_server) -> None:
        self.key, self.server, self.web_server = key, server, web_server


class ProxyApp:
    def __init__(self, config_path: str, clock: Clock = REAL, metrics: Metrics = METRICS) -> None:
        self.config_path, self.clock, self.metrics = config_path, clock, metrics
        self.store = StateStore(clock, metrics)
        self.runtime: Runtime | None = None
        self.started = False
        self.draining = False
        self.last_reload_error: list[str] | None = None
        self.access_log = False
        self._bound: dict[str, _Bound] = {}
        self._admin: Admin | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()
        self._failed_digest: str | None = None  # a broken config is reported once, not every poll
        self._reload_lock = asyncio.Lock()
        self._admin_bound: _Bound | None = None
        self.app_health: AppHealth | None = None
        self.inbound = None  # the InboundListener, made when an inbound listener is configured
        self._inbound_bound: _Bound | None = None
        self.loop_lag = 0.0
        self.checks_done = False   # the first round of active upstream checks has finished
        self._sources = [
            (self.metrics.upstream_health, functools.partial(health_samples, self)),
            (self.metrics.in_flight, functools.partial(in_flight_samples, self)),
            (self.metrics.cache_entries, functools.partial(cache_samples, self, "entries")),
            (self.metrics.cache_bytes, functools.partial(cache_samples, self, "bytes")),
        ]

    def _secrets_of(self, loaded: Loaded) -> frozenset[str]:
        # Old and new values both: a log line about the switch may still carry the rotated-out one.
        old = self.runtime.loaded.sensitive if self.runtime is not None else frozenset()
        return loaded.sensitive | old

    # -- start / stop ----------------------------------------------------------------------------------
    async def start(self, loaded: Loaded) -> None:
        log.set_secrets(loaded.sensitive)
        try:
            runtime = Runtime(loaded, self.store, self.clock)
            await self._bind(runtime)
        except BaseException:
            self.store.abort()
            raise
        self._swap(runtime)
        self._admin = Admin(self)
        try:
            await self._bind_admin(loaded.settings.admin.listen)
        except StartupError:
            await self.close()
            raise
        self.started = True
        for family, source in self._sources:
            family.sources.append(source)
        self._spawn(self._watch())
        self._spawn(self._watch_loop_lag())
        self._spawn(self._admin.status_page.run())
        self._spawn(self._first_checks())
        log.info("started", upstreams=sorted(runtime.upstreams), admin=loaded.settings.admin.listen,
                 config_hash=runtime.digest)

    async def _first_checks(self) -> None:
        """/health/startup waits for the first round of upstream checks (each bounded by its timeout)."""
        await asyncio.gather(*(h.first_round.wait() for h in self.store.healths()))
        self.checks_done = True
        log.info("first_checks_done", checks=sum(1 for h in self.store.healths() if h.active))

    async def _watch_loop_lag(self) -> None:
        """Event-loop lag, measured the simple way: how late a 250 ms sleep wakes up."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.25)
            self.loop_lag = max(0.0, loop.time() - t - 0.25)

    def _sync_app_health(self, runtime: Runtime) -> None:
        spec = runtime.settings.app
        if self.app_health is not None and self.app_health.spec == spec:
            return
        if self.app_health is not None:
            self.app_health.stop()
        self.app_health = AppHealth(spec)
        self.app_health.start()

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _bind_admin(self, listen: str) -> None:
        ws = ListenerServer(self._admin.handle, max_header_bytes=65536)
        server = await listen_on("admin.listen", listen, ws, backlog=100)
        old, self._admin_bound = self._admin_bound, _Bound(listen, server, ws)
        if old is not None:
            self._spawn(self._close_listener(old, timeout=1.0))

    def _swap(self, runtime: Runtime) -> None:
        """The one assignment that switches every new request to the new config."""
        old = self.runtime
        closing = self.store.commit()  # staged state goes live; what the new runtime dropped goes
        for up in runtime.upstreams.values():
            up.activate()
        self.runtime = runtime
        self.store.current = runtime
        self._sync_app_health(runtime)
        self.access_log = runtime.settings.log.access
        log.set_level(runtime.settings.log.level)
        self.metrics.set_config_hash(runtime.digest)
        if old is not None:
            self._spawn(self._close_after_drain(closing))

    async def _close_after_drain(self, pools) -> None:
        if not pools:
            return
        deadline = self.clock.monotonic() + self.runtime.settings.shutdown.drain_timeout
        while any(p.busy for p in pools) and self.clock.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)

    async def _bind(self, runtime: Runtime) -> None:
        """Open listeners the runtime needs and do not exist yet; close the ones it dropped (after swap)."""
        opened: dict[str, _Bound] = {}
        try:
            for name, up in runtime.upstreams.items():
                key = (up.spec.listen, up.spec.protocol)
                current = self._bound.get(name)
                if current is not None and current.key == key:
                    if current.web_server is not None:
                        up.protocol.reconfigure_listener(current.web_server, up.spec)  # new timeouts, live
                    continue
                for other_name, other in list(self._bound.items()):
                    # the same address, held by a listener this runtime replaces: hand it over
                    if other.key[0] == up.spec.listen and (other_name != name or other.key != key):
                        other.server.close()
                listening = up.protocol.listener(self, name, up.spec)
                server = await listen_on(f"upstreams.{name}.listen", up.spec.listen, listening.factory)
                opened[name] = _Bound(key, server, listening.server)
        except BaseException:
            for b in opened.values():
                b.server.close()
            raise
        await self._bind_inbound(runtime)
        stale = [b for n, b in self._bound.items() if n not in runtime.upstreams or n in opened]
        self._bound = {n: b for n, b in self._bound.items() if n in runtime.upstreams and n not in opened}
        self._bound.update(opened)
        for b in stale:
            self._spawn(self._close_listener(b))

    async def _bind_inbound(self, runtime: Runtime) -> None:
        spec = runtime.settings.inbound
        listen = spec.listen if spec is not None else None
        current = self._inbound_bound
        if current is not None and current.key == listen:
            return
        if listen is not None:
            if current is not None and parse_listen(current.key)[1] == parse_listen(listen)[1]:
                current.server.close()
            from aiohttp import web  # the inbound listener (WebSockets to the app) stays on aiohttp's server

            from proxy.listen.inbound import InboundListener

            if self.inbound is None:
                self.inbound = InboundListener(self)
            ws = web.Server(self.inbound.handle, access_log=None, max_line_size=65536, max_field_size=65536)
            server = await listen_on("inbound.listen", listen, ws)
            self._inbound_bound = _Bound(listen, server, ws)
        else:
            self._inbound_bound = None
        if current is not None:
            self._spawn(self._close_listener(current))

    async def _close_listener(self, b: _Bound, timeout: float | None = None) -> None:
        b.server.close()
        if timeout is None:
            timeout = self.runtime.settings.shutdown.drain_timeout if self.runtime else 5.0
        if b.web_server is not None:
            await b.web_server.shutdown(timeout)

    async def close(self) -> None:
        for family, source in self._sources:
            if source in family.sources:
                family.sources.remove(source)
        if self.app_health is not None:
            self.app_health.stop()
        for t in list(self._tasks):
            t.cancel()
        bound = list(self._bound.values()) + ([self._inbound_bound] if self._inbound_bound else [])
        for b in bound:
            b.server.close()
        await asyncio.gather(*(b.web_server.shutdown(1.0) for b in bound if b.web_server is not None),
                             return_exceptions=True)
        self._inbound_bound = None
        if self.inbound is not None:
            await self.inbound.close()
        self._bound.clear()
        if self._admin_bound is not None:
            self._admin_bound.server.close()
            await self._admin_bound.web_server.shutdown(1.0)
            self._admin_bound = None
        await self.store.close()
        self._stopped.set()

    # -- reload ----------------------------------------------------------------------------------------
    async def reload(self, reason: str) -> tuple[bool, str]:
        """Build → validate → bind → swap. Anything failing leaves the running config serving. One at a
        time: SIGHUP, the admin call and the file watcher may race, and a build owns the staged state."""
        async with self._reload_lock:
            return await self._reload(reason)

    async def _reload(self, reason: str) -> tuple[bool, str]:
        attempted = digest(self.config_path, self.runtime.loaded.files)
        try:
            # parsing and validating a file runs in a thread: a large or hostile file must not stall
            # every listener while it is read (the build below touches live state: it stays here)
            loaded = await asyncio.to_thread(load, self.config_path)
            runtime = Runtime(loaded, self.store, self.clock)
            await self._bind(runtime)
            if loaded.settings.admin.listen != self.runtime.settings.admin.listen:
                await self._bind_admin(loaded.settings.admin.listen)
        except Exception as exc:  # noqa: BLE001 — whatever a config does, the running one stays
            self.store.abort()
            if isinstance(exc, ConfigError):
                errors = exc.errors
            elif isinstance(exc, StartupError):
                errors = [str(exc)]
            else:
                # not a config error the loader knows how to word: say what broke, not its text (which
                # may quote the config), and keep serving
                errors = [f"<reload>: the new config could not be built ({type(exc).__name__}); the running one stays"]
            self.last_reload_error = errors
            self._failed_digest = attempted
            self.metrics.reloads.labels("failure").inc()
            log.error("reload_failed", reason=reason, errors=errors, kept_config_hash=self.runtime.digest)
            return False, "; ".join(errors)
        log.set_secrets(self._secrets_of(loaded))
        self._swap(runtime)
        self.last_reload_error = None
        self.metrics.reloads.labels("success").inc()
        log.info("reloaded", reason=reason, config_hash=runtime.digest)
        return True, "reloaded"

    async def _watch(self) -> None:
        """Poll a content hash of the config and every referenced file: a ConfigMap update swaps a
        `..data` symlink, which a watch on the file itself would miss."""
        while True:
            await asyncio.sleep(self.runtime.settings.reload.interval)
            try:
                current = digest(self.config_path, self.runtime.loaded.files)
                if current != self.runtime.digest and current != self._failed_digest:
                    await self.reload("file_changed")
            except Exception as exc:  # noqa: BLE001 — the watcher must outlive anything a reload meets
                log.error("config_watch_failed", error=type(exc).__name__)

    # -- shutdown --------------------------------------------------------------------------------------
    def in_flight(self) -> int:
        return sum(up.counters.in_flight for up in self.runtime.upstreams.values()) + (self.inbound.in_flight if self.inbound is not None else 0)

    async def drain(self) -> None:
        """SIGTERM: readiness turns 503 at once, listeners keep serving (the app may still be finishing
        its calls); return once nothing has been in flight for quiet_period, or at drain_timeout."""
        self.draining = True
        spec = self.runtime.settings.shutdown
        log.info("draining", in_flight=self.in_flight(), quiet_period=spec.quiet_period,
                 drain_timeout=spec.drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.drain_timeout
        quiet_since = loop.time() if self.in_flight() == 0 else None
        while loop.time() < deadline:
            now = loop.time()
            if self.in_flight() == 0:
                quiet_since = quiet_since or now
                if now - quiet_since >= spec.quiet_period:
                    break
            else:
                quiet_since = None
            await asyncio.sleep(0.05)
        log.info("drained", in_flight=self.in_flight())

    async def serve(self) -> int:
        """Run until SIGTERM (drain, exit 0) or SIGINT / a second SIGTERM (exit at once)."""
        loop = asyncio.get_running_loop()
        term = asyncio.Event()
        hard = asyncio.Event()

        def on_term() -> None:
            if term.is_set():
                hard.set()
            term.set()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, hard.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("sighup")))
        waiter = loop.create_task(term.wait())
        hard_waiter = loop.create_task(hard.wait())
        await asyncio.wait({waiter, hard_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not hard.is_set():
            drain = loop.create_task(self.drain())
            await asyncio.wait({drain, hard_waiter}, return_when=asyncio.FIRST_COMPLETED)
            drain.cancel()
        for t in (waiter, hard_waiter):
            t.cancel()
        log.info("stopping", forced=hard.is_set())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.close(), 2.0 if hard.is_set() else 5.0)
        return 0
