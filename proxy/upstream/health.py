"""Active health checks, in the background: one task per target (the protocol's probe: an HTTP GET of
`health.path`, a Redis PING) and one for the app's own readiness URL. Probes only read the last results,
so the kubelet probing 200 times a second costs nothing upstream. A checker survives a reload while its (upstream, track, url,
health spec) is unchanged."""

from __future__ import annotations

import asyncio
import time

from proxy.obs import log


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class TargetHealth:
    def __init__(self, upstream: str, target, spec, protocol, transport, headers) -> None:
        self.upstream, self.track, self.spec, self.protocol = upstream, target.name, spec, protocol
        self.base = target.url.rstrip("/")
        self.transport, self.headers = transport, headers  # headers(): the running config's, at each check
        self.active = protocol.checks(spec)
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
                    await self.protocol.probe(self)
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
