"""`protocol: redis` — Redis (RESP2/RESP3), e.g. 127.0.0.1:6380 → redis://redis:6379/0.

listener (proxy/redis/listener.py, one asyncio protocol per client connection) → track chosen when the
connection opens → per command, the shared chain as plain calls (proxy/redis/resilience.py): stale-read
fallback → shed → total timeout → retry (budget) → breaker → classify → attempt timeout → the upstream
connection (proxy/redis/upstream.py: a connection shared by all clients, or one of the client's own).
Owns the `client_auth:` section and the targets' `password_file`.
"""

from __future__ import annotations

import asyncio
import functools

from proxy.protocols.base import Listening, Protocol
from proxy.redis.cache import RedisCache
from proxy.redis.codec import ReplyFramer, encode_command
from proxy.redis.flow import ClientMemory
from proxy.redis.guard import AuthThrottle, CommandGuard
from proxy.redis.listener import RedisClientProtocol
from proxy.redis.replies import SharedBatch
from proxy.redis.resilience import CommandChain
from proxy.redis.upstream import RedisTarget, SharedRedis
from proxy.settings.loader import ConfigError
from proxy.upstream.state import spec_key


class RedisEndpoint:
    """One target as the Redis path uses it: what its URL says (per load) and its shared connections
    (state, surviving reloads)."""

    __slots__ = ("info", "shared")

    def __init__(self, info: RedisTarget, shared: SharedRedis) -> None:
        self.info, self.shared = info, shared

    def snapshot(self) -> None:
        return None  # no pool slots to show: commands are pipelined, not queued for a connection


class RedisUpstream:
    """The Redis part of an upstream runtime, built per config load."""

    __slots__ = ("chain", "client_password", "guard", "auth", "memory", "output_limit")

    def __init__(self, chain: CommandChain, client_password: bytes | None, guard: CommandGuard,
                 auth: AuthThrottle, memory: ClientMemory, output_limit: int) -> None:
        self.chain, self.client_password, self.guard, self.auth = chain, client_password, guard, auth
        self.memory, self.output_limit = memory, output_limit


class RedisProtocol(Protocol):
    name = "redis"
    # A Redis read's stale answer lives in the local cache (RedisCache); a second Redis to share it would
    # mirror the dependency itself, which is what a replica is for
    no_shared_cache = "a Redis upstream's stale reads stay in the local cache; use a replica to share them"
    schemes = ("redis", "rediss")
    sections = ("client_auth", "redis")
    target_keys = ("password_file",)
    defaults = {
        "timeouts": {"connect": 1.0, "attempt": 1.0, "total": 3.0},
        # the largest command a client may send (its arguments together): well below the sidecar's limit
        "limits": {"max_request_body": 64 * 1024 * 1024},
        "retry": {"backoff_base": 0.01, "backoff_max": 0.2},
        "metrics": {"buckets": [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0]},
    }

    def transport(self, store, upstream: str, spec, target) -> RedisEndpoint:
        info = RedisTarget(target)
        batch = store.shared.get("redis_batch")
        if batch is None:
            batch = store.shared["redis_batch"] = SharedBatch()
        key = ("redis", target.url, target.password_file, spec_key(target.tls), spec.timeouts.connect)
        shared = store.pool(key, lambda: SharedRedis(info, spec.timeouts.connect, batch))
        store.reconfigure_at_commit(shared, info)  # a rotated password applies from the swap on
        return RedisEndpoint(info, shared)

    def build(self, up, store, clock) -> None:
        spec = up.spec
        cache = store.cache(("redis", up.name, spec_key(spec.fallback)),
                            lambda: RedisCache(up.name, spec.fallback, clock))
        up.cache = cache
        password = None
        if spec.client_auth.password_file:
            try:
                with open(spec.client_auth.password_file, "rb") as f:
                    password = f.read().strip()
            except OSError as exc:
                raise ConfigError([f"upstreams.{up.name}.client_auth.password_file: cannot read "
                                   f"{spec.client_auth.password_file}: {exc.strerror}"]) from None
        auth = store.keep(("redis-auth", up.name), AuthThrottle)  # failures outlive a reload
        memory = store.keep(("redis-memory", up.name), lambda: ClientMemory(spec.redis.max_client_memory))
        store.reconfigure_at_commit(memory, spec.redis)
        up.wire = RedisUpstream(CommandChain(up, cache, store.deadlines, clock), password,
                                CommandGuard(up.name, spec.redis), auth, memory, spec.redis.client_output_limit)

    def listener(self, app, name: str, spec) -> Listening:
        return Listening(functools.partial(RedisClientProtocol, app, name))

    async def probe(self, health) -> None:
        t = health.transport.info
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


REDIS = RedisProtocol()
