"""The shared fallback cache (`fallback.shared`): a second level of the fallback cache in Redis, shared by
every sidecar of a workload, so a pod that started during an outage serves what its neighbours stored.

Where it sits: beside the local cache of the fallback policy (proxy/policy/fallback.py), never on the
success path. A fresh, storable answer the local cache keeps is also queued here (a bounded queue,
coalesced per key: a hot key is written at most as often as the local cache re-stores it, once a second)
and written by one task per cache, in pipelined batches. It is read only when the path below failed and
the local cache has nothing fresh; the read is bounded by `timeout` and guarded by a breaker of its own,
so Redis down or slow means "no shared entry", never an error or a hang.

Keys are `<key_prefix><upstream>:<spec>:<digest>`: the upstream's name, a digest of the key spec
(methods, vary, the LLM key fields), and a SHA-256 digest of what identifies the request — never raw
header values. A value is the answer's status, kept headers and wall-clock storage time (JSON) and its
body, expiring in Redis after `stale_ttl`; anything in Redis that does not decode as one is a miss.

redis-py's asyncio client (standalone or Redis Cluster) does the talking, with its own retries off: the
breaker and the timeout decide here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from typing import Any

from proxy.clock import Clock
from proxy.exchange import Verdict
from proxy.obs import log
from proxy.policy.breaker import BreakerState
from proxy.settings.spec import BreakerSpec

_MAGIC = b"RPSC1\n"
_BATCH = 64           # writes per pipelined round trip
_WRITE_TIMEOUT = 1.0  # a batch of writes may take this long at least (they are off the request path)
# The breaker of the cache itself: three failures in a row and it rests for five seconds.
_BREAKER = BreakerSpec(fail_max=3, reset_timeout=5.0, half_open_max_calls=1)


class SharedEntry:
    __slots__ = ("status", "headers", "body", "stored_wall")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, stored_wall: float) -> None:
        self.status, self.headers, self.body, self.stored_wall = status, headers, body, stored_wall


def encode(status: int, headers, body: bytes, stored_wall: float) -> bytes:
    head = json.dumps({"s": status, "h": [[k, v] for k, v in headers], "t": stored_wall},
                      separators=(",", ":")).encode()
    return b"%s%d\n%s%s" % (_MAGIC, len(head), head, body)


def decode(raw: bytes) -> SharedEntry | None:
    """A stored value, or None for anything else (another writer's key, a truncated or hostile value)."""
    if not raw.startswith(_MAGIC):
        return None
    nl = raw.find(b"\n", len(_MAGIC), len(_MAGIC) + 12)
    if nl < 0:
        return None
    try:
        n = int(raw[len(_MAGIC):nl])
        doc = json.loads(raw[nl + 1:nl + 1 + n])
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    status, headers, stored = doc.get("s"), doc.get("h"), doc.get("t")
    if (type(status) is not int or not 200 <= status < 300 or not isinstance(headers, list)
            or type(stored) not in (int, float)):
        return None
    kept = []
    for h in headers:
        if not (isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], str)):
            return None
        if "\r" in h[0] or "\n" in h[0] or "\r" in h[1] or "\n" in h[1] or ":" in h[0] or not h[0]:
            return None  # would split the head it is written into
        kept.append((h[0], h[1]))
    return SharedEntry(status, kept, raw[nl + 1 + n:], float(stored))


def digest(*parts: Any) -> str:
    """A stable digest of a request's identity (JSON of its parts): the same in every sidecar."""
    text = json.dumps(parts, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def client_for(spec):
    """redis-py's asyncio client for `spec.url` (a cluster client with `cluster: true`), its own
    retries off and every socket operation bounded by the read timeout."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # max_connections: redis-py's own default (100) fails the next call at once, which would read as
    # Redis being down in the very burst of an outage; callers wait on `Slots` for one instead
    kw: dict[str, Any] = dict(socket_timeout=max(spec.timeout, 0.05), socket_connect_timeout=max(spec.timeout, 0.05),
                              retry=Retry(NoBackoff(), 0), decode_responses=False,
                              max_connections=spec.max_connections)
    if spec.url.startswith("rediss://"):
        tls = spec.tls
        kw.update(ssl_ca_certs=tls.ca_file, ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file,
                  ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_check_hostname=True)
    if spec.cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(spec.url, **kw)
    return aredis.Redis.from_url(spec.url, **kw)


def slots(spec) -> asyncio.Semaphore:
    """As many calls in flight as the client has connections: one more waits (within the caller's
    timeout) instead of failing, so a burst of reads in an outage is served, not counted as Redis down."""
    return asyncio.Semaphore(spec.max_connections)


class SharedCache:
    """State per (upstream, fallback spec): survives a reload that leaves both unchanged; registered as a
    pool, so a reload that drops it closes it (its queued writes are given a moment to go)."""

    def __init__(self, upstream: str, spec, key_spec: str, clock: Clock, events, make_client=client_for) -> None:
        self.upstream, self.spec, self.clock, self.events = upstream, spec, clock, events
        self.prefix = f"{spec.key_prefix}{upstream}:{key_spec}:"
        self._make_client = make_client
        try:  # at the config load: redis-py's import (~200 ms with OpenTelemetry) is not a request's to wait for
            self._client = make_client(spec)
        except Exception:  # noqa: BLE001 — made again at the first use, where a failure is "no shared entry"
            self._client = None
        self._slots = slots(spec)
        self.breaker = BreakerState("shared-cache", upstream, _BREAKER, clock)
        self.pending: dict[str, tuple] = {}  # key → answer, oldest first; a newer answer keeps its place
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task | None = None
        self.closed = False
        self._px = max(1, int(spec.stale_ttl * 1000))

    # -- what a pool is asked (StateStore, app drain) ------------------------------------------------------
    @property
    def busy(self) -> int:
        return len(self.pending)

    def snapshot(self) -> dict:
        return {"pending_writes": len(self.pending), "breaker": self.breaker.state}

    @property
    def client(self):
        if self._client is None:
            self._client = self._make_client(self.spec)
        return self._client

    # -- writes ------------------------------------------------------------------------------------------
    def put(self, digest_: str, status: int, headers, body: bytes) -> None:
        """Queue a fresh answer for the shared cache (never waits, never raises)."""
        if self.closed or len(body) > self.spec.max_body:
            return
        key = self.prefix + digest_
        value = (status, headers, body, time.time())  # encoded by the writer, off the request path
        if key in self.pending:
            self.pending[key] = value  # coalesced: the newest answer for the key, written once
            return
        if len(self.pending) >= self.spec.write_queue:
            self.events.shared_write("dropped")
            return
        self.pending[key] = value
        if self._writer is None or self._writer.done():
            self._wake = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        self._wake.set()

    async def _write_loop(self) -> None:
        wake = self._wake
        while not self.closed:
            await wake.wait()
            wake.clear()
            while self.pending and not self.closed:
                batch = []
                while self.pending and len(batch) < _BATCH:
                    key = next(iter(self.pending))
                    batch.append((key, self.pending.pop(key)))
                await self._write(batch)

    async def _write(self, batch: list[tuple[str, tuple]]) -> None:
        token = self.breaker.admit()
        if token is None:
            self.events.shared_write("dropped", len(batch))  # Redis is resting: these answers are not shared
            return
        start = self.clock.monotonic()
        try:
            async with asyncio.timeout(max(_WRITE_TIMEOUT, self.spec.timeout)), self._slots:
                pipe = self.client.pipeline(transaction=False)
                for key, (status, headers, body, stored) in batch:
                    pipe.set(key, encode(status, headers, body, stored), px=self._px)
                await pipe.execute()
        except asyncio.CancelledError:
            self.breaker.cancel(token)
            raise
        except Exception as exc:  # noqa: BLE001 — redis-py's errors, OSError, a timeout: all "not written"
            self._failed(token, "write", exc, start)
            self.events.shared_write("error", len(batch))
            return
        elapsed = self.clock.monotonic() - start
        self.breaker.record(token, Verdict.SUCCESS, elapsed)
        self.events.shared_latency("write", elapsed)
        self.events.shared_write("written", len(batch))

    # -- reads -------------------------------------------------------------------------------------------
    async def get(self, digest_: str) -> SharedEntry | None:
        """The shared entry for this request, or None: missing, undecodable, Redis down, slow or resting."""
        token = self.breaker.admit()
        if token is None:
            self.events.shared_read("skipped")
            return None
        start = self.clock.monotonic()
        try:
            async with asyncio.timeout(self.spec.timeout), self._slots:
                raw = await self.client.get(self.prefix + digest_)
        except asyncio.CancelledError:
            self.breaker.cancel(token)
            raise
        except Exception as exc:  # noqa: BLE001 — any failure of the shared cache is a miss
            self._failed(token, "read", exc, start)
            self.events.shared_read("error")
            return None
        elapsed = self.clock.monotonic() - start
        self.breaker.record(token, Verdict.SUCCESS, elapsed)
        self.events.shared_latency("read", elapsed)
        entry = decode(raw) if isinstance(raw, bytes) else None
        if entry is None:
            self.events.shared_read("miss" if raw is None else "invalid")
            return None
        if time.time() - entry.stored_wall >= self.spec.stale_ttl:
            self.events.shared_read("miss")  # Redis keeps it a little longer than it is worth
            return None
        self.events.shared_read("hit")
        return entry

    def source(self, entry: SharedEntry) -> tuple[str, float]:
        """(`shared-cache` while younger than cache_ttl, else `shared-stale`; its age in seconds)."""
        age = max(0.0, time.time() - entry.stored_wall)
        return ("shared-cache" if age < self.spec.cache_ttl else "shared-stale"), age

    def _failed(self, token: int, op: str, exc: BaseException, start: float) -> None:
        was = self.breaker.state
        self.breaker.record(token, Verdict.FAILURE, self.clock.monotonic() - start, f"{op}: {type(exc).__name__}")
        if was != "open" and self.breaker.state == "open":
            # the URL is never logged: it may carry a password
            log.warning("shared_cache_unavailable", upstream=self.upstream, op=op, error=type(exc).__name__)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def close(self) -> None:
        if self.pending and not self.closed and self._writer is not None and not self._writer.done():
            try:  # what was queued before the reload gets a short chance to go
                async with asyncio.timeout(_WRITE_TIMEOUT):
                    while self.pending and not self._writer.done():
                        await asyncio.sleep(0.01)
            except TimeoutError:
                pass
        self.closed = True
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except BaseException:  # noqa: BLE001 — cancelled, or it had failed: it is gone either way
                pass
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:  # noqa: BLE001 — closing a client of a Redis that is gone
                pass
