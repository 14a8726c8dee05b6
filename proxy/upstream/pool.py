"""HTTP connection pool per target: one aiohttp ClientSession per (url, TLS, pool spec), kept for the
process's life and across reloads.

Concurrency is bounded here rather than inside aiohttp's connector so the proxy can see, and shed,
what would otherwise queue invisibly: at most `max_connections` requests hold a connection, at most
`max_pending` wait for one, for at most `pending_timeout`. Connections are retired after
`max_lifetime` by rotating to a fresh session (the old one closes once its last response is released),
so traffic rebalances across the pods behind a ClusterIP.
"""

from __future__ import annotations

import asyncio
import collections
import ssl

from yarl import URL

from proxy.clock import Clock
from proxy.http1.client import ClientConnection
from proxy.settings.spec import LimitsSpec, PoolSpec, TargetSpec, TimeoutsSpec
from proxy.settings.units import format_duration


def egress_proxy(url: str):
    """HTTPS_PROXY/HTTP_PROXY/NO_PROXY for this target, read once → (proxy URL, BasicAuth) or (None, None).
    (aiohttp's trust_env re-reads the environment and ~/.netrc in a thread on every request, which costs
    more than the rest of the proxy.)"""
    import urllib.request

    u = URL(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get("https" if u.scheme in ("https", "wss") else "http")
    if not proxy or urllib.request.proxy_bypass_environment(u.host or "", proxies):
        return None, None
    p = URL(proxy if "://" in proxy else f"http://{proxy}")
    if p.scheme != "http":
        # as aiohttp's env handling did: only plain-HTTP proxies (CONNECT inside) are supported
        from proxy.obs import log

        log.warning("egress_proxy_ignored", proxy=str(p.with_user(None)), reason="only http:// proxies are supported")
        return None, None
    import aiohttp  # requests through an egress proxy go through aiohttp's client

    user, password = p.user, p.password
    if user is None:  # credentials for the proxy from ~/.netrc (or $NETRC), as aiohttp's trust_env did
        try:
            import netrc
            import os

            found = netrc.netrc(os.environ.get("NETRC")).authenticators(p.host or "")
            if found:
                user, password = found[0], found[2]
        except (OSError, netrc.NetrcParseError):
            pass
    auth = aiohttp.BasicAuth(user, password or "") if user else None
    return p.with_user(None), auth


def ssl_context(target: TargetSpec) -> ssl.SSLContext | None:
    if not target.url.startswith(("https://", "rediss://")):
        return None
    ctx = ssl.create_default_context(cafile=target.tls.ca_file)  # system store when ca_file is None
    if target.tls.cert_file:
        ctx.load_cert_chain(target.tls.cert_file, target.tls.key_file)
    return ctx


class _Generation:
    __slots__ = ("session", "created", "users", "retired")

    def __init__(self, session, created: float) -> None:
        self.session, self.created = session, created
        self.users = 0
        self.retired = False


class ConnectFailed(Exception):
    """Opening a connection failed (refused, unreachable, TLS, timeout): nothing reached the upstream."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc) or type(exc).__name__)  # a bare TimeoutError has no text
        self.exc = exc


class Overloaded(Exception):
    """No connection slot within max_pending/pending_timeout."""


class HttpPool:
    def __init__(self, target: TargetSpec, pool: PoolSpec, timeouts: TimeoutsSpec, limits: LimitsSpec,
                 clock: Clock) -> None:
        self.target, self.spec, self.clock = target, pool, clock
        self.ssl = ssl_context(target)
        self.server_hostname = target.tls.server_name
        self.connect_timeout = timeouts.connect
        self.idle_timeout = timeouts.idle
        self.max_pending, self.pending_timeout = limits.max_pending, limits.pending_timeout
        self.max_connections = pool.max_connections
        self.busy = 0                     # requests holding a connection slot
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._gen: _Generation | None = None
        self._closing: set[asyncio.Task] = set()
        self.proxy, self.proxy_auth = egress_proxy(target.url)
        u = URL(target.url)
        self.host, self.port = u.host, u.port
        default = 443 if u.scheme == "https" else 80
        raw = u.raw_host or ""  # IDNA-encoded, as it goes on the wire
        host = f"[{raw}]" if ":" in raw else raw  # IPv6 literals are bracketed
        self.host_header = host if u.port == default else f"{host}:{u.port}"
        self.path_prefix = u.raw_path.rstrip("/")  # still percent-encoded
        # credentials in the target URL (http://user:pw@svc) become Basic auth, as aiohttp made them
        self.basic_auth = None
        if u.user is not None:
            import base64

            self.basic_auth = "Basic " + base64.b64encode(f"{u.user}:{u.password or ''}".encode()).decode()
        self.fast = self.proxy is None  # the lean client (proxy/http1/client.py) unless an egress proxy is set
        self._idle_conns: list = []
        self._idle_timer: asyncio.TimerHandle | None = None

    def request_head(self, method: str, target: str, headers) -> list[str]:
        """The request line and headers for the lean client (requests and active checks alike): the
        target's Host unless one is configured, the target URL's credentials over the app's."""
        head = [f"{method} {self.path_prefix}{target} HTTP/1.1\r\n"]
        if "Host" not in headers:  # a configured Host (request_headers) replaces the target's
            head.append(f"Host: {self.host_header}\r\n")
        items = headers.items()
        if self.basic_auth is not None:
            head.append(f"Authorization: {self.basic_auth}\r\n")
            items = [(k, v) for k, v in items if k.lower() != "authorization"]
        head += [f"{k}: {v}\r\n" for k, v in items]
        return head

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def snapshot(self) -> dict:
        """For /admin/upstreams."""
        return {"busy": self.busy, "pending": self.pending, "max_connections": self.max_connections}

    def _new_generation(self) -> _Generation:
        import aiohttp  # only for what the lean client does not do (egress proxy, HEAD, streamed bodies)

        from proxy.upstream import aio

        connector = aiohttp.TCPConnector(
            limit=0,  # bounded by our own slots
            keepalive_timeout=self.spec.idle_timeout,
            ssl=self.ssl if self.ssl is not None else True,
            enable_cleanup_closed=False,
        )
        session = aio.session(  # the replay rule is aio.request's
            connector=connector,
            auto_decompress=False,      # compressed bodies pass through untouched
            trust_env=False,            # egress proxy resolved once in __init__, not per request
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                          connect=self.connect_timeout, sock_read=self.idle_timeout),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type", "Accept"),
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=2**16,
            max_line_size=65536, max_field_size=65536,
        )
        return _Generation(session, self.clock.monotonic())

    def session(self) -> _Generation:
        """The current generation, rotated when older than max_lifetime. Caller must `done(gen)`."""
        gen = self._gen
        if gen is None or self.clock.monotonic() - gen.created >= self.spec.max_lifetime:
            if gen is not None:
                gen.retired = True
                if gen.users == 0:
                    self._close(gen)
            gen = self._gen = self._new_generation()
        gen.users += 1
        return gen

    def done(self, gen: _Generation) -> None:
        gen.users -= 1
        if gen.retired and gen.users == 0:
            self._close(gen)

    def _close(self, gen: _Generation) -> None:
        t = asyncio.get_running_loop().create_task(gen.session.close())
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    def try_acquire(self) -> bool:
        """Take a free connection slot now, without waiting (a plain call: no coroutine when one is free)."""
        if self.busy < self.max_connections and not self._waiters:
            self.busy += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a connection slot or raise Overloaded."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_pending:
            raise Overloaded(f"{self.max_pending} requests already wait for a connection")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.pending_timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # handed a slot in the same tick the wait expired: keep it
            raise Overloaded(f"no connection free within pending_timeout ({format_duration(self.pending_timeout)})") from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed the slot as we were cancelled: pass it on
            raise
        finally:
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over directly: busy stays the same
                return
        self.busy -= 1

    # -- the lean HTTP/1.1 client's connections ----------------------------------------------------------
    async def h1_connect(self):
        loop = asyncio.get_running_loop()
        now = self.clock.monotonic()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: ClientConnection(self, now), self.host, self.port, ssl=self.ssl,
                    server_hostname=(self.server_hostname or self.host) if self.ssl else None)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(exc) from None
        return conn

    def h1_get(self, max_idle: float | None = None):
        """A kept-alive connection, the most recently used first (LIFO). `max_idle` narrows it for a
        request that cannot be replayed if the upstream closed the connection meanwhile (common
        keep-alive timeouts are 2-5 s): then only a connection used within `max_idle` will do."""
        now = self.clock.monotonic()
        idle = self._idle_conns
        while idle:
            c = idle[-1]
            if c.closed or now - c.last_used > self.spec.idle_timeout or now - c.created > self.spec.max_lifetime:
                idle.pop().close()
                continue
            if max_idle is not None and now - c.last_used > max_idle:
                return None  # the freshest is too old for this request (the rest are older): open a new one
            idle.pop()
            c.reused = True
            return c
        return None

    def h1_idle(self, conn) -> None:
        now = self.clock.monotonic()
        if now - conn.created >= self.spec.max_lifetime or len(self._idle_conns) >= self.max_connections:
            conn.close()  # retired: new connections rebalance across the pods behind a ClusterIP
            return
        conn.last_used = now
        self._idle_conns.append(conn)
        if self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(self.spec.idle_timeout, self._close_idle)

    def _close_idle(self) -> None:
        """Kept-alive connections idle past `pool.idle_timeout` are closed on time, not only when a
        request next looks at the pool: after a burst, the connections it opened go (fds, the upstream's
        connection slots), as Envoy's idle_timeout does. The oldest are at the front (LIFO reuse)."""
        self._idle_timer = None
        now, idle = self.clock.monotonic(), self._idle_conns
        while idle and (idle[0].closed or now - idle[0].last_used >= self.spec.idle_timeout):
            idle.pop(0).close()
        if idle:
            left = max(0.05, self.spec.idle_timeout - (now - idle[0].last_used))
            self._idle_timer = asyncio.get_running_loop().call_later(left, self._close_idle)

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for c in self._idle_conns:
            c.close()
        self._idle_conns.clear()
        if self._gen is not None:
            await self._gen.session.close()
            self._gen = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
