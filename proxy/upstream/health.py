"""Active health checks, in the background: one task per target (HTTP GET of `health.path`, or PING for
Redis) and one for the app's own readiness URL. Probes only read the last results, so the kubelet probing
200 times a second costs nothing upstream. A checker survives a reload while its (upstream, track, url,
health spec) is unchanged."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

from multidict import CIMultiDict

from proxy.obs import log
from proxy.redis.codec import ReplyFramer, encode_command


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


_PATH_SAFE = "/%:@!$&'()*+,;=?~-._"  # keeps what is already encoded, and the query


class TargetHealth:
    def __init__(self, upstream: str, target, spec, protocol: str, pool, redis_target, headers) -> None:
        self.upstream, self.track, self.spec, self.protocol = upstream, target.name, spec, protocol
        self.base = target.url.rstrip("/")
        self.pool, self.redis_target, self.headers = pool, redis_target, headers
        self.active = spec.enabled and (protocol == "redis" or spec.path is not None)
        self.healthy: bool | None = None      # None: no active check (or none finished yet)
        self.last_check: float | None = None
        self.last_error: str | None = None
        self._ok = self._bad = 0
        self.first_round = asyncio.Event()
        self.task: asyncio.Task | None = None
        if not self.active:
            self.first_round.set()

    def start(self) -> None:
        if self.active and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.spec.timeout):
                    await (self._ping() if self.protocol == "redis" else self._get())
                ok, err = True, None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the check is "unhealthy", never a crash
                ok, err = False, f"{type(exc).__name__}: {exc}"[:200]
            self._observe(ok, err)
            self.first_round.set()
            await asyncio.sleep(self.spec.interval)

    def _observe(self, ok: bool, err: str | None) -> None:
        self.last_check = time.time()
        if ok:
            self._ok, self._bad = self._ok + 1, 0
            if self.healthy is not True and (self.healthy is None or self._ok >= self.spec.healthy_threshold):
                if self.healthy is False:
                    log.info("health_check_passing", upstream=self.upstream, track=self.track)
                self.healthy = True
        else:
            self._ok, self._bad = 0, self._bad + 1
            self.last_error = err
            if self.healthy is not False and (self.healthy is None or self._bad >= self.spec.unhealthy_threshold):
                log.warning("health_check_failing", upstream=self.upstream, track=self.track, error=err,
                            failures=self._bad)
                self.healthy = False

    async def _get(self) -> None:
        pool = self.pool
        if not pool.fast:  # through an egress proxy: aiohttp's client knows how
            return await self._get_via_aiohttp()
        # The lean client on a connection of its own (a check must not take a request's pool slot, and
        # a fresh connection is what it should prove works)
        head = pool.request_head("GET", quote(self.spec.path, safe=_PATH_SAFE), CIMultiDict(self.headers()))
        head.append("Connection: close\r\n\r\n")
        conn = await pool.h1_connect()
        try:
            r = await conn.request("".join(head).encode("utf-8", "surrogateescape"))
            await r.read()
            if not 200 <= r.status < 400:
                raise ConnectionError(f"health check answered {r.status}")
        finally:
            conn.close()

    async def _get_via_aiohttp(self) -> None:
        import aiohttp

        gen = self.pool.session()
        try:
            async with gen.session.get(self.base + self.spec.path, headers=self.headers(), allow_redirects=False,
                                       proxy=self.pool.proxy, proxy_auth=self.pool.proxy_auth,
                                       server_hostname=self.pool.server_hostname) as r:
                await r.read()
                if not 200 <= r.status < 400:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status,
                                                      message=f"health check answered {r.status}")
        finally:
            self.pool.done(gen)

    async def _ping(self) -> None:
        t = self.redis_target
        reader, writer = await asyncio.open_connection(t.host, t.port, ssl=t.ssl, server_hostname=t.server_hostname)
        try:
            cmds = []
            if t.password is not None:
                cmds.append([b"AUTH", t.username.encode(), t.password.encode()] if t.username
                            else [b"AUTH", t.password.encode()])
            cmds.append([b"PING"])
            writer.write(b"".join(encode_command(c) for c in cmds))
            framer, replies = ReplyFramer(), []
            while len(replies) < len(cmds):
                data = await reader.read(4096)
                if not data:
                    raise ConnectionError("connection closed")
                replies += framer.feed(data)
            for raw, kind in replies:
                if kind == "error":
                    raise ConnectionError(raw.decode(errors="replace").strip())
            if not replies[-1][0].startswith(b"+PONG"):
                raise ConnectionError(f"unexpected PING answer {replies[-1][0][:20]!r}")
        finally:
            writer.close()


class AppHealth:
    """The app's readiness (`app.ready_url`), polled in the background."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.ready: bool | None = None
        self.status: int | None = None
        self.last_check: float | None = None
        self.error: str | None = None
        self.task: asyncio.Task | None = None
        self._session = None

    def start(self) -> None:
        if self.spec.ready_url and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import aiohttp  # only when the app's readiness is polled

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.spec.timeout))
        try:
            while True:
                try:
                    async with self._session.get(self.spec.ready_url) as r:
                        await r.read()
                        self.status, self.ready, self.error = r.status, 200 <= r.status < 400, None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.status, self.ready, self.error = None, False, f"{type(exc).__name__}"
                self.last_check = time.time()
                await asyncio.sleep(self.spec.interval)
        finally:
            await self._session.close()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
