"""Memory the Redis listener holds for its clients is bounded (limits.max_request_body for a whole command,
redis.client_output_limit per client, redis.max_client_memory per upstream), with a real redis-server:
the client that exceeds a bound is refused or closed, never the process, and the others carry on."""

from __future__ import annotations

import asyncio
import os

import psutil
import redis.asyncio as aredis

from tests.support.proxy import upstream_config
from tests.support.wait import eventually


async def _rp(start_proxy, redis_server, **sections):
    name, cfg = upstream_config(redis_server + "/0", protocol="redis", **sections)
    return await start_proxy(cfg)


async def test_a_command_over_the_bound_is_refused_as_a_whole_not_per_bulk(redis_server, start_proxy):
    p = await _rp(start_proxy, redis_server, limits={"max_request_body": "1MiB"})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    part = b"x" * 400_000
    key = f"whole-{os.getpid()}".encode()
    # each bulk under the bound, the command over it (MSET of three 400 KB values)
    writer.write(b"*7\r\n$4\r\nMSET\r\n" + b"".join(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key) + 1, key + b"%d" % i, len(part), part)
                                                      for i in range(3)))
    data = await asyncio.wait_for(reader.read(), 30)  # answered, then closed
    assert data.startswith(b"-ERR Protocol error: command larger than 1048576 bytes")
    direct = aredis.Redis.from_url(redis_server)
    assert await direct.exists(key + b"0", key + b"1", key + b"2") == 0
    # under the bound it goes through, the large argument sent as it is
    ok = aredis.Redis(port=p.port, retry=None, socket_timeout=30)
    assert await ok.mset({key + b"0": part, key + b"1": part}) is True
    assert await direct.get(key + b"1") == part
    await ok.aclose()
    await direct.aclose()


async def test_a_client_that_never_reads_large_replies_is_closed_at_its_output_limit(redis_server, start_proxy, metrics):
    """30 pipelined GETs of a 4 MiB value, none read: once its unread replies pass client_output_limit the
    client is closed and what it was owed is dropped; the proxy's memory does not grow by 120 MB."""
    p = await _rp(start_proxy, redis_server, redis={"client_output_limit": "8MiB"})
    key = f"big-out-{os.getpid()}"
    direct = aredis.Redis.from_url(redis_server)
    await direct.set(key, b"v" * (4 << 20))
    proc = psutil.Process()
    before = proc.memory_info().rss
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode() * 30)
    await eventually(lambda: metrics.family_delta("redis_clients_evicted_total", name=p.name, limit="client_output_limit") == 1,
                     what="the client closed at its output limit")
    assert proc.memory_info().rss - before < 80 * 1024 * 1024
    other = aredis.Redis(port=p.port, retry=None, socket_timeout=30)
    assert len(await other.get(key)) == 4 << 20  # the shared connection carries on for the others
    memory = p.app.runtime.upstreams[p.name].wire.memory
    await eventually(lambda: memory.total < 1 << 20, what="its memory given back")
    counters = p.app.runtime.upstreams[p.name].counters
    await eventually(lambda: counters.in_flight == 0, what="its commands uncounted, once each")
    writer.close()
    await other.aclose()
    await direct.aclose()


async def test_many_clients_together_stay_under_max_client_memory(redis_server, start_proxy, metrics):
    """Eight clients, each under its own output limit, together past the upstream's bound: the ones holding
    most are closed until the rest fit; a client that reads its replies is served throughout."""
    p = await _rp(start_proxy, redis_server, redis={"client_output_limit": "32MiB", "max_client_memory": "16MiB"})
    key = f"big-many-{os.getpid()}"
    direct = aredis.Redis.from_url(redis_server)
    await direct.set(key, b"v" * (1 << 20))
    memory = p.app.runtime.upstreams[p.name].wire.memory
    conns = []
    for _ in range(8):
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode() * 8)  # 8 MiB each, unread
        conns.append(writer)
    reading = aredis.Redis(port=p.port, retry=None, socket_timeout=30)
    for _ in range(5):
        assert len(await reading.get(key)) == 1 << 20
    await eventually(lambda: metrics.family_delta("redis_clients_evicted_total", name=p.name, limit="max_client_memory") >= 1,
                     what="a client closed at max_client_memory")
    assert memory.total <= memory.limit
    assert len(await reading.get(key)) == 1 << 20
    for w in conns:
        w.close()
    await reading.aclose()
    await direct.aclose()


async def test_a_refused_client_with_replies_still_owed_gives_its_room_back(another_redis, start_proxy):
    """A GET still out on the shared connection (Redis busy), then bytes that are not RESP: the client is
    refused and closed, and when the GET's reply comes, nothing stays counted against max_in_flight."""
    port = another_redis("--enable-debug-command", "local")
    name, cfg = upstream_config(f"redis://127.0.0.1:{port}/0", protocol="redis", timeouts={"attempt": "5s", "total": "10s"})
    p = await start_proxy(cfg)
    direct = aredis.Redis(port=port, retry=None, socket_timeout=30)
    busy = asyncio.ensure_future(direct.execute_command("DEBUG", "SLEEP", "0.5"))
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"*x\r\n")  # not RESP
    data = await asyncio.wait_for(reader.read(), 30)
    assert b"Protocol error" in data
    await busy
    counters = p.app.runtime.upstreams[name].counters
    await eventually(lambda: counters.in_flight == 0, what="in_flight back to 0")
    c = aredis.Redis(port=p.port, retry=None, socket_timeout=30)
    assert await c.ping()
    await c.aclose()
    await direct.aclose()
