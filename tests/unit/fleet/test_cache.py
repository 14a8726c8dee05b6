"""The shared fallback cache without Redis: what a value decodes to (hostile values are misses), the
write queue (bounded, coalesced per key, dropped and counted when full), the breaker that keeps a dead
Redis off the failure path, and the config rules."""

from __future__ import annotations

import asyncio

import pytest

from proxy.clock import ManualClock
from proxy.fleet.cache import SharedCache, decode, digest, encode
from proxy.settings.loader import Settings
from proxy.settings.spec import SharedCacheSpec


def test_a_value_round_trips_and_anything_else_is_a_miss():
    raw = encode(200, [("Content-Type", "application/json"), ("X-A", "caf\udce9")], b"\x00body\r\n", 1700000000.5)
    e = decode(raw)
    assert (e.status, e.headers, e.body, e.stored_wall) == (
        200, [("Content-Type", "application/json"), ("X-A", "caf\udce9")], b"\x00body\r\n", 1700000000.5)
    for bad in (b"", b"hello", raw[:8], b"RPSC1\n99999\n{}", b"RPSC1\nxx\n{}",
                encode(500, [], b"", 1.0), encode(200, [("Bad\r\nName", "v")], b"", 1.0),
                encode(200, [("X", "v\r\nInjected: 1")], b"", 1.0), encode(200, [("", "v")], b"", 1.0),
                b'RPSC1\n9\n{"s":200}', b'RPSC1\n2\n[]', b'RPSC1\n24\n{"s":200,"h":[1],"t":1}'):
        assert decode(bad) is None, bad


def test_digests_are_stable_and_hide_what_they_stand_for():
    d = digest("GET", "/users/42?token=abc", [["Bearer secret"]])
    assert d == digest("GET", "/users/42?token=abc", [["Bearer secret"]]) and len(d) == 64
    assert "secret" not in d and d != digest("GET", "/users/43?token=abc", [["Bearer secret"]])


class FakeRedis:
    """Records pipelined SETs; `fail` makes every call raise, `gate` holds them."""

    def __init__(self):
        self.sets, self.fail, self.gate, self.gets = [], False, None, 0

    def pipeline(self, transaction=False):
        outer = self

        class Pipe:
            def __init__(self):
                self.batch = []

            def set(self, key, value, px):
                self.batch.append((key, value, px))

            async def execute(self):
                if outer.gate is not None:
                    await outer.gate.wait()
                if outer.fail:
                    raise ConnectionError("down")
                outer.sets.append(self.batch)

        return Pipe()

    async def get(self, key):
        self.gets += 1
        if self.fail:
            raise ConnectionError("down")
        return None

    async def aclose(self):
        pass


class Events:
    def __init__(self):
        self.reads, self.writes, self.latency = [], [], []

    def shared_read(self, result):
        self.reads.append(result)

    def shared_write(self, result, n=1):
        self.writes.append((result, n))

    def shared_latency(self, op, s):
        self.latency.append(op)


def make(**spec):
    fake, events = FakeRedis(), Events()
    cache = SharedCache("db", SharedCacheSpec(url="redis://127.0.0.1:1", **spec), "spec", ManualClock(), events,
                        make_client=lambda s: fake)
    return cache, fake, events


async def test_writes_are_coalesced_per_key_bounded_and_batched():
    cache, fake, events = make(write_queue=3)
    fake.gate = asyncio.Event()
    cache.put("k1", 200, [], b"one")
    await asyncio.sleep(0)  # the writer takes k1 and waits on Redis
    cache.put("k2", 200, [], b"old")
    cache.put("k2", 200, [], b"new")  # coalesced: one write, the newest answer
    cache.put("k3", 200, [], b"3")
    cache.put("k4", 200, [], b"4")
    cache.put("k5", 200, [], b"5")  # the queue holds 3: dropped
    assert events.writes == [("dropped", 1)] and list(cache.pending) == ["resilience-proxy:db:spec:" + k
                                                                        for k in ("k2", "k3", "k4")]
    fake.gate.set()
    await asyncio.wait_for(_until(lambda: not cache.pending and len(fake.sets) == 2), 10)
    first, second = fake.sets
    assert [k for k, _, _ in first] == ["resilience-proxy:db:spec:k1"]
    assert [k for k, _, _ in second] == ["resilience-proxy:db:spec:" + k for k in ("k2", "k3", "k4")]  # one round trip
    assert decode(second[0][1]).body == b"new" and second[0][2] == 3600 * 1000  # expires after stale_ttl
    assert ("written", 3) in events.writes
    await cache.close()


async def test_a_dead_redis_opens_the_caches_breaker_and_is_not_asked_again():
    cache, fake, events = make()
    fake.fail = True
    for _ in range(3):
        assert await cache.get("k") is None
    assert events.reads == ["error"] * 3 and cache.breaker.state == "open"
    assert await cache.get("k") is None and fake.gets == 3 and events.reads[-1] == "skipped"
    cache.put("k", 200, [], b"x")
    await asyncio.wait_for(_until(lambda: ("dropped", 1) in events.writes), 10)  # not sent while it rests
    await cache.close()


async def test_a_body_over_max_body_is_not_shared():
    cache, fake, events = make(max_body=4)
    cache.put("k", 200, [], b"12345")
    assert not cache.pending and events.writes == []
    await cache.close()


async def _until(cond):
    while not cond():
        await asyncio.sleep(0.001)


def _settings(**up):
    return Settings(admin={"listen": "127.0.0.1:19901"}, upstreams={"u": {"listen": "127.0.0.1:19902", **up}})


def test_config_rules_for_the_shared_cache():
    with pytest.raises(ValueError, match="must be a redis:// or rediss:// URL"):
        SharedCacheSpec(url="http://cache:6379")
    with pytest.raises(ValueError, match="stale_ttl must be >= cache_ttl"):
        SharedCacheSpec(url="redis://cache", cache_ttl=10, stale_ttl=5)
    with pytest.raises(Exception, match="fallback.shared: not for protocol redis"):
        _settings(protocol="redis", targets=[{"name": "s", "url": "redis://db:6379"}],
                  fallback={"shared": {"url": "redis://cache:6379"}})
    ok = _settings(targets=[{"name": "s", "url": "http://db"}], fallback={"shared": {"url": "rediss://cache:6380"}})
    assert ok.upstreams["u"].fallback.shared.url == "rediss://cache:6380"
