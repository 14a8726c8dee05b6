"""Redis down, slow or cut, through a real toxiproxy server and a counting TCP relay (tests/support/relay.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aredis

from proxy.clock import ManualClock
from tests.support.proxy import upstream_config
from tests.support.relay import CountingRelay
from tests.support.toxiproxy import add_toxic, heal
from tests.support.wait import eventually


async def test_redis_down_reads_from_cache_writes_fail_fast_no_connection_attempts(redis_server, start_proxy,
                                                                                   metrics):
    relay = await CountingRelay(int(redis_server.rsplit(":", 1)[1])).start()
    name, cfg = upstream_config(f"redis://127.0.0.1:{relay.port}/0", protocol="redis",
                                breaker={"fail_max": 2, "reset_timeout": "30s"}, retry={"attempts": 1})
    clock = ManualClock()
    p = await start_proxy(cfg, clock=clock)
    port = p.port
    c = aredis.Redis(port=port, protocol=3, retry=None, socket_timeout=30)
    await c.set("warm", "v1")
    assert await c.get("warm") == b"v1"
    assert await c.hgetall("hw") == {}
    relay.cut()
    await c.connection_pool.disconnect()  # the app reconnects: HELLO is answered by the proxy
    for _ in range(3):
        with pytest.raises(redis.ResponseError, match="UNAVAILABLE"):
            await c.get("never-read")
    assert p.upstream.targets[0].breaker.state == "open"
    attempts = relay.accepted
    assert await c.get("warm") == b"v1"           # the last known value
    assert await c.hgetall("hw") == {}
    with pytest.raises(redis.ResponseError, match=rf"UNAVAILABLE redis upstream '{name}' is unavailable \(circuit_breaker_open\)"):
        await c.set("warm", "v2")
    with pytest.raises(redis.ResponseError, match="circuit_breaker_open"):
        await c.get("cold")
    assert relay.accepted == attempts  # open: no upstream connection attempt at all
    assert metrics.delta("fallback_responses_total", name=name, source="cache", reason="circuit_breaker_open") == 2
    relay.down = False
    clock.advance(30)
    assert await c.set("warm", "v3")
    assert await c.get("warm") == b"v3"          # healed, and the cache follows later writes
    assert p.upstream.targets[0].breaker.state == "closed"
    relay.down = True
    await c.connection_pool.disconnect()
    assert await c.get("warm") == b"v3"
    await c.aclose()
    relay.close()


async def test_slow_redis_pipelined_commands_get_errors_not_other_replies(redis_server, start_proxy, toxic_link):
    proxy, url = toxic_link(redis_server)
    name, cfg = upstream_config(url + "/0", protocol="redis", timeouts={"attempt": "1s"},
                                retry={"attempts": 1}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    port = p.port
    c = aredis.Redis(port=port, protocol=2, retry=None, socket_timeout=30)
    for i in range(5):
        await c.set(f"k{i}", f"v{i}")
    await c.get("k0")  # cached
    add_toxic(proxy, "latency", latency=30_000)
    t0 = time.monotonic()
    pipe = c.pipeline(transaction=False)
    for i in range(5):
        pipe.get(f"k{i}")
    res = await pipe.execute(raise_on_error=False)
    assert time.monotonic() - t0 < 10  # timed out at 1 s (plus a loaded machine), never waited 30 s out
    assert res[0] == b"v0"  # the timed-out read answered from the cache
    for r in res[1:]:
        assert isinstance(r, redis.ResponseError) and "UNAVAILABLE" in str(r), res
    heal(proxy)
    assert await c.get("k3") == b"v3"  # a new upstream connection, replies in step again
    await c.aclose()


async def test_reads_retried_on_reset_within_budget_writes_never(redis_server, start_proxy, metrics):
    relay = await CountingRelay(int(redis_server.rsplit(":", 1)[1])).start()
    name, cfg = upstream_config(f"redis://127.0.0.1:{relay.port}/0", protocol="redis", retry={"attempts": 3},
                                breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    port = p.port
    c = aredis.Redis(port=port, protocol=2, retry=None)
    await c.set("r", "1")
    relay.cut()
    shared = p.upstream.by_name["stable"].pool.shared
    await eventually(lambda: not shared.conns, what="the proxy saw its shared connection reset")
    before = relay.accepted
    p.upstream.targets[0].breaker.force("closed")  # keep the breaker out of this test
    with pytest.raises(redis.ResponseError, match="UNAVAILABLE"):
        await c.set("r", "2")  # writes are never retried: one connection attempt
    assert relay.accepted - before == 1
    with pytest.raises(redis.ResponseError, match="UNAVAILABLE"):
        await c.get("r")  # nothing cached for it (only written so far): an error after 3 attempts
    assert relay.accepted - before == 4  # the read was tried 3 times
    assert metrics.delta("upstream_retries_total", name=name, reason="reset") == 2
    await c.aclose()
    relay.close()


async def test_one_timeout_on_a_shared_connection_charges_the_breaker_once(redis_server, start_proxy, toxic_link):
    """Ten clients' commands wait on one shared connection when it times out: all of them fail (or are
    served from the cache), but the breaker hears of one failure, not ten."""
    proxy, url = toxic_link(redis_server)
    name, cfg = upstream_config(url + "/0", protocol="redis", timeouts={"attempt": "1s"},
                                retry={"attempts": 1}, breaker={"fail_max": 3, "reset_timeout": "30s"})
    p = await start_proxy(cfg)
    port = p.port
    cs = [aredis.Redis(port=port, protocol=2, retry=None, socket_timeout=30) for _ in range(10)]
    for i, c in enumerate(cs):
        assert await c.set(f"t{i}", "v") is True  # all on the shared connection
    add_toxic(proxy, "latency", latency=30_000)
    res = await asyncio.gather(*(c.set(f"t{i}", "w") for i, c in enumerate(cs)), return_exceptions=True)
    assert all(isinstance(r, redis.ResponseError) and "UNAVAILABLE" in str(r) for r in res), res
    br = p.upstream.targets[0].breaker
    assert br.state == "closed" and br.cb.fail_counter == 1
    heal(proxy)
    # the latency toxic held the replies back, not the commands: Redis did apply the SET that timed out
    assert await cs[0].get("t0") == b"w"
    for c in cs:
        await c.aclose()


async def test_swapdb_and_move_drop_the_cached_reads_of_every_db(redis_server, start_proxy, another_redis):
    """SWAPDB and MOVE change another db than the client's: a cached read of either must not outlive it
    (served later while Redis is down, it would be a value that is no longer there)."""
    port = another_redis()
    relay = await CountingRelay(port).start()
    name, cfg = upstream_config(f"redis://127.0.0.1:{relay.port}/0", protocol="redis", retry={"attempts": 1})
    p = await start_proxy(cfg)
    redis.Redis(port=port, db=1).set("sk", "in-db1")
    c1 = aredis.Redis(port=p.port, protocol=2, db=1, retry=None, socket_timeout=30)
    assert await c1.get("sk") == b"in-db1"  # cached for db 1
    c0 = aredis.Redis(port=p.port, protocol=2, retry=None, socket_timeout=30)
    await c0.set("sk", "in-db0")
    assert await c0.swapdb(0, 1)  # sent from db 0: db 1 changes too
    relay.cut()
    await c1.connection_pool.disconnect()
    with pytest.raises(redis.ResponseError, match="UNAVAILABLE"):
        await c1.get("sk")  # db 1 now holds "in-db0": the cached "in-db1" must not be served
    await c0.aclose()
    await c1.aclose()
    relay.close()


async def _slow_redis(redis_server, start_proxy, toxic_link, **cfg):
    """A proxy in front of Redis through toxiproxy, a connected client, then Redis made 30 s slow."""
    proxy, url = toxic_link(redis_server)
    name, config = upstream_config(url + "/0", protocol="redis", breaker={"fail_max": 100}, **cfg)
    p = await start_proxy(config)
    c = aredis.Redis(port=p.port, protocol=2, retry=None, socket_timeout=60)
    await c.ping()
    add_toxic(proxy, "latency", latency=30_000)
    return proxy, name, p, c


async def test_a_read_retried_under_latency_ends_within_the_total_timeout(redis_server, start_proxy, toxic_link,
                                                                           metrics):
    """attempt 2 s, total 3 s, ten attempts allowed, Redis 30 s slow: the first attempt times out (the
    breaker hears of it), the one retry is cut by the total — answered on its own, its connection left
    up for the other commands on it — and no third attempt starts."""
    proxy, name, p, c = await _slow_redis(redis_server, start_proxy, toxic_link,
                                          timeouts={"attempt": "2s", "total": "3s"},
                                          retry={"attempts": 10, "backoff_base": 0, "backoff_max": 0})
    with pytest.raises(redis.ResponseError, match=rf"UNAVAILABLE redis upstream '{name}' is unavailable \(timeout\)"):
        await c.get("slow")
    assert metrics.delta("upstream_retries_total", name=name, reason="timeout") == 1
    assert p.breaker.cb.fail_counter == 1  # the attempt timeout counted; the total's cut did not
    conns = list(p.upstream.by_name["stable"].pool.shared.conns.values())
    assert len(conns) == 1 and not conns[0].failed  # the retry's connection was not torn down
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="timeout",
                         outcome="rejected") == 1
    heal(proxy)
    await c.aclose()


async def test_retry_on_is_honoured_a_timeout_not_listed_is_not_retried(redis_server, start_proxy, toxic_link,
                                                                         metrics):
    proxy, name, p, c = await _slow_redis(redis_server, start_proxy, toxic_link,
                                          timeouts={"attempt": "1s", "total": "30s"},
                                          retry={"attempts": 5, "on": ["connect-failure", "reset"]})
    with pytest.raises(redis.ResponseError, match=r"\(timeout\)"):
        await c.get("slow")
    assert metrics.family_delta("upstream_retries_total", name=name) == 0
    heal(proxy)
    proxy.disable()  # now a connect failure: listed, so retried up to the attempts
    await c.connection_pool.disconnect()
    p.upstream.by_name["stable"].pool.shared.conns.clear()
    with pytest.raises(redis.ResponseError, match=r"\(upstream_error\)"):
        await c.get("down")
    assert metrics.delta("upstream_retries_total", name=name, reason="connect-failure") == 4
    proxy.enable()
    await c.aclose()


async def test_commands_over_max_in_flight_wait_unread_then_go(redis_server, start_proxy, toxic_link, metrics):
    """max_in_flight 2 and Redis 1 s slow: of four clients' reads two go out, two wait (the proxy stops
    reading them) and go as the first two are answered. Nobody is refused."""
    proxy, url = toxic_link(redis_server)
    name, cfg = upstream_config(url + "/0", protocol="redis", timeouts={"attempt": "20s", "total": "30s"},
                                limits={"max_in_flight": 2, "pending_timeout": "20s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    clients = [aredis.Redis(port=p.port, protocol=2, retry=None, socket_timeout=60) for _ in range(4)]
    await clients[0].set("k", "v")
    for c in clients:
        await c.ping()
    add_toxic(proxy, "latency", latency=1_000)
    gets = [asyncio.create_task(c.get("k")) for c in clients]
    await eventually(lambda: len(p.upstream.counters.waiting) == 2 and p.upstream.counters.in_flight == 2)
    assert not any(w.transport.is_reading() for w in p.upstream.counters.waiting)  # not read while waiting
    assert await asyncio.gather(*gets) == [b"v"] * 4
    assert metrics.family_delta("upstream_shed_total", name=name) == 0
    assert not p.upstream.counters.waiting
    heal(proxy)
    for c in clients:
        await c.aclose()


async def test_a_command_still_waiting_after_pending_timeout_is_shed_overloaded_or_served_stale(
        redis_server, start_proxy, toxic_link, metrics):
    proxy, url = toxic_link(redis_server)
    name, cfg = upstream_config(url + "/0", protocol="redis", timeouts={"attempt": "20s", "total": "30s"},
                                limits={"max_in_flight": 1, "pending_timeout": "1s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    a, b, c = (aredis.Redis(port=p.port, protocol=2, retry=None, socket_timeout=60) for _ in range(3))
    await a.set("cached", "v")
    assert await b.get("cached") == b"v"
    await c.ping()
    add_toxic(proxy, "latency", latency=15_000)
    stuck = asyncio.create_task(a.get("cached"))  # takes the one slot for 15 s
    await eventually(lambda: p.upstream.counters.in_flight == 1)
    assert await b.get("cached") == b"v"  # waited 1 s for room, then the stale-read cache answered
    with pytest.raises(redis.ResponseError) as ei:
        await c.get("cold")
    assert str(ei.value) == f"UNAVAILABLE redis upstream '{name}' is unavailable (overloaded)"
    assert "BUSY" not in str(ei.value)
    assert metrics.delta("upstream_shed_total", name=name) == 2
    assert metrics.delta("fallback_responses_total", name=name, source="cache", reason="overloaded") == 1
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status="error",
                         outcome="shed") == 1
    heal(proxy)
    assert await stuck == b"v"
    for x in (a, b, c):
        await x.aclose()


async def test_a_client_over_max_in_flight_is_not_read_so_nothing_queues_in_the_proxy(redis_server, start_proxy,
                                                                                      toxic_link):
    """While the client waits for room the proxy does not read its socket: a 64 MB pipeline stops at
    the kernel's buffers instead of piling up in the proxy."""
    proxy, url = toxic_link(redis_server)
    _, cfg = upstream_config(url + "/0", protocol="redis", timeouts={"attempt": "30s", "total": "40s"},
                             limits={"max_in_flight": 1, "pending_timeout": "30s"}, breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    a = aredis.Redis(port=p.port, protocol=2, retry=None, socket_timeout=60)
    await a.ping()
    add_toxic(proxy, "latency", latency=20_000)
    stuck = asyncio.create_task(a.get("x"))
    await eventually(lambda: p.upstream.counters.in_flight == 1)
    import socket

    s = socket.create_connection(("127.0.0.1", p.port))
    s.setblocking(False)
    command = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    chunk = command * 4096
    sent = 0
    deadline = time.monotonic() + 30
    while sent < 64 << 20 and time.monotonic() < deadline:
        try:
            sent += s.send(chunk)
        except BlockingIOError:
            await asyncio.sleep(0.2)
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                break  # the proxy stopped reading: the kernel's buffers are full
    assert sent < 32 << 20, f"the proxy kept reading ({sent} bytes) while over max_in_flight"
    await eventually(lambda: len(p.upstream.counters.waiting) == 1)
    s.close()
    heal(proxy)
    assert await stuck is None
    await a.aclose()
