"""The Redis listener as transparent as a multiplexing proxy can be, with real redis-servers and the real
redis-py client: one upstream event is one breaker failure, CLIENT REPLY is refused rather than waited on,
client metadata follows a client to its own connection, HELLO tells the upstream's real server."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aredis

from tests.support.proxy import upstream_config


def _client(port, **kw):
    return aredis.Redis(port=port, retry=None, socket_timeout=30, **kw)


async def test_one_upstream_stall_is_one_breaker_failure(another_redis, start_proxy):
    """DEBUG SLEEP stalls Redis for everyone: the per-db shared connections and the dedicated ones all
    time out at once. That is one event: one failure for the breaker, not one per connection."""
    port = another_redis("--enable-debug-command", "local")
    name, cfg = upstream_config(f"redis://127.0.0.1:{port}/0", protocol="redis",
                                timeouts={"attempt": "500ms", "total": "10s"}, retry={"attempts": 1},
                                breaker={"fail_max": 2, "reset_timeout": "60s"})
    p = await start_proxy(cfg)
    clients = [_client(p.port, db=db) for db in (0, 1, 2)]                      # three shared connections
    named = [_client(p.port, client_name=f"worker-{i}") for i in range(2)]      # two dedicated ones
    for c in clients + named:
        assert await c.ping()
    direct = aredis.Redis(port=port, retry=None, socket_timeout=30)
    stall = asyncio.ensure_future(direct.execute_command("DEBUG", "SLEEP", "3"))
    await asyncio.sleep(0.3)  # the sleep has begun (or the GETs queue behind it in Redis all the same)
    results = await asyncio.gather(*(c.get("k") for c in clients + named), return_exceptions=True)
    await stall
    assert all(isinstance(r, redis.ResponseError) and "UNAVAILABLE" in str(r) for r in results), results
    breaker = p.app.runtime.upstreams[name].targets[0].breaker
    assert breaker.state == "closed" and breaker.cb.fail_counter == 1
    for c in clients + named:
        assert await c.get("k") is None  # and everyone carries on
        await c.aclose()
    await direct.aclose()


async def test_a_sustained_outage_still_opens_the_breaker(redis_server, start_proxy, toxic_link):
    """One event is one failure, but an upstream that stays black-holed is a failure per attempt timeout:
    the breaker opens within a few of them, for clients on shared and dedicated connections alike."""
    from tests.support.toxiproxy import add_toxic

    link, url = toxic_link(redis_server)
    name, cfg = upstream_config(url + "/0", protocol="redis", timeouts={"attempt": "300ms", "total": "1s"},
                                retry={"attempts": 1}, breaker={"fail_max": 3, "reset_timeout": "60s"})
    p = await start_proxy(cfg)
    shared, named = _client(p.port), _client(p.port, client_name="w")
    assert await shared.ping() and await named.ping()
    add_toxic(link, "timeout", timeout=0)
    breaker = p.app.runtime.upstreams[name].targets[0].breaker

    async def keep_asking():
        for c in (shared, named):
            try:
                await c.get("k")
            except redis.ResponseError:
                pass
        return breaker.state == "open"

    from tests.support.wait import eventually

    assert await eventually(keep_asking, timeout=30)
    for c in (shared, named):
        await c.aclose()


async def test_client_reply_off_and_skip_are_refused_not_waited_on(redis_server, start_proxy):
    name, cfg = upstream_config(redis_server, protocol="redis")
    p = await start_proxy(cfg)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"CLIENT REPLY OFF\r\nCLIENT REPLY SKIP\r\nCLIENT REPLY ON\r\nPING\r\n")
    data = b""
    while data.count(b"\r\n") < 4:
        data += await asyncio.wait_for(reader.read(4096), 30)
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"-ERR CLIENT REPLY OFF") and lines[1].startswith(b"-ERR CLIENT REPLY SKIP")
    assert lines[2:4] == [b"+OK", b"+PONG"]
    # inside MULTI too (it would take effect at EXEC): refused, and the transaction aborts
    writer.write(b"MULTI\r\nCLIENT REPLY OFF\r\nEXEC\r\nPING\r\n")
    data = b""
    while b"PONG" not in data:
        data += await asyncio.wait_for(reader.read(4096), 30)
    assert data.startswith(b"+OK\r\n-ERR CLIENT REPLY") and b"-EXECABORT" in data and b"UNAVAILABLE" not in data
    writer.close()
    breaker = p.app.runtime.upstreams[name].targets[0].breaker
    assert breaker.cb.fail_counter == 0


async def test_client_setinfo_follows_the_client_to_its_own_connection(another_redis, start_proxy):
    port = another_redis(server="redis-server-7.4")  # CLIENT SETINFO is Redis 7.2+
    name, cfg = upstream_config(f"redis://127.0.0.1:{port}", protocol="redis")
    p = await start_proxy(cfg)
    c = _client(p.port)  # redis-py sends CLIENT SETINFO lib-name/lib-ver as it connects
    assert await c.ping()
    await c.execute_command("CLIENT", "SETNAME", "with-info")  # a dedicated connection from here on
    info = await c.client_info()
    assert info["lib-name"] == "redis-py" and info["lib-ver"] == redis.__version__ and info["name"] == "with-info"
    await c.aclose()
    # the other order (redis-py with client_name=: SETNAME first, then SETINFO on the live connection)
    named = _client(p.port, client_name="named-first")
    assert await named.ping()
    info = await named.client_info()
    assert info["name"] == "named-first" and info["lib-name"] == "redis-py"
    await named.aclose()


@pytest.mark.parametrize("proto", [2, 3])
async def test_hello_tells_the_upstreams_real_server(redis_server, start_proxy, proto):
    name, cfg = upstream_config(redis_server, protocol="redis")
    p = await start_proxy(cfg)
    direct = redis.Redis.from_url(redis_server, protocol=3)
    real = direct.execute_command("HELLO")
    via = _client(p.port, protocol=proto)
    got = await via.execute_command("HELLO", str(proto))
    if proto == 2:
        got = dict(zip(got[::2], got[1::2], strict=True))

    def norm(d):
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}

    real, got = norm(real), norm(got)
    for key in ("server", "version", "mode", "role"):
        assert got[key] == real[key], key
    assert got["proto"] == proto and got["modules"] == real["modules"]
    await via.aclose()
    direct.close()


async def test_client_side_caching_works_through_the_proxy_and_a_lost_tracking_connection_closes_the_client(
        another_redis, start_proxy):
    """redis-py's client-side cache needs Redis 7.4 (it reads the version HELLO gives) and CLIENT TRACKING's
    invalidations. Through the proxy both work; when the connection that had tracking on is lost, the
    client is closed rather than left with a cache nobody invalidates."""
    port = another_redis(server="redis-server-7.4")
    name, cfg = upstream_config(f"redis://127.0.0.1:{port}", protocol="redis")
    p = await start_proxy(cfg)
    # redis-py's cache is in its sync client: it runs in a thread, the proxy in this loop
    await asyncio.to_thread(_client_side_caching, p.port, port)


def _client_side_caching(proxy_port: int, redis_port: int) -> None:
    from redis.cache import CacheConfig

    from tests.support.wait import eventually_sync

    cached = redis.Redis(port=proxy_port, protocol=3, cache_config=CacheConfig(), retry=None, socket_timeout=30)
    writer = redis.Redis(port=proxy_port, retry=None, socket_timeout=30)
    direct = redis.Redis(port=redis_port, retry=None, socket_timeout=30)
    writer.set("cc", "one")
    assert cached.get("cc") == b"one" and cached.get("cc") == b"one"
    assert direct.info("commandstats")["cmdstat_get"]["calls"] == 1  # the second came from the local cache
    writer.set("cc", "two")  # Redis invalidates; the proxy relays the push on the tracking connection

    def fresh(want):
        try:
            return cached.get("cc") == want
        except redis.ConnectionError:
            return False  # closed by the proxy: the next call reconnects

    eventually_sync(lambda: fresh(b"two"))
    tracking = [c for c in direct.client_list() if "t" in c["flags"]]
    assert len(tracking) == 1
    direct.client_kill_filter(_id=tracking[0]["id"])  # the upstream connection with tracking on is lost
    writer.set("cc", "three")  # nobody is left to invalidate the client's copy of "two"
    eventually_sync(lambda: fresh(b"three"))
    for c in (cached, writer, direct):
        c.close()
