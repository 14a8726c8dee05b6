"""`protocol: redis` with a real redis-server and the real redis-py client (RESP2 and its default RESP3).
redis-py retries silently by default (shared/NOTES.md): every client here has retries off."""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest
import redis
import redis.asyncio as aredis

from proxy.clock import ManualClock
from tests.support.proxy import upstream_config
from tests.support.redis import read_len, read_until
from tests.support.wait import eventually


def redis_config(url, **sections):
    return upstream_config(url, protocol="redis", **sections)


@pytest.fixture
async def rp(redis_server, start_proxy):
    name, cfg = redis_config(redis_server + "/0")
    p = await start_proxy(cfg)
    p.direct_port = int(redis_server.rsplit(":", 1)[1])
    return p


def clients(p, proto):
    kw = dict(protocol=proto, retry=None, socket_timeout=30)
    return aredis.Redis(port=p.port, **kw), aredis.Redis(port=p.direct_port, **kw)


@pytest.mark.parametrize("proto", [2, 3])
async def test_same_replies_as_direct(rp, proto):
    via, direct = clients(rp, proto)
    await direct.flushall()
    for c in (via, direct):
        prefix = f"{'via' if c is via else 'dir'}{proto}"
        await c.set(f"{prefix}:s", "v")
        await c.hset(f"{prefix}:h", mapping={"a": "1", "b": "2"})
        await c.rpush(f"{prefix}:l", "x", "y", "z")
        await c.sadd(f"{prefix}:set", "m1", "m2")
        await c.zadd(f"{prefix}:z", {"a": 1, "b": 2})

    async def observe(c, prefix):
        return [await c.get(f"{prefix}:s"), await c.mget(f"{prefix}:s", f"{prefix}:none"), await c.hgetall(f"{prefix}:h"),
                await c.lrange(f"{prefix}:l", 0, -1), sorted(await c.smembers(f"{prefix}:set")),
                await c.zrange(f"{prefix}:z", 0, -1, withscores=True), await c.ttl(f"{prefix}:s"),
                await c.type(f"{prefix}:h"), await c.exists(f"{prefix}:s", f"{prefix}:none"),
                await c.strlen(f"{prefix}:s"), await c.ping()]

    assert await observe(via, f"via{proto}") == await observe(direct, f"dir{proto}")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await via.lpush(f"via{proto}:s", "x")
    await via.aclose()
    await direct.aclose()


@pytest.mark.parametrize("proto", [2, 3])
async def test_pipeline_transaction_watch_select_blpop(rp, proto):
    via, _ = clients(rp, proto)
    pipe = via.pipeline(transaction=False)
    for i in range(1000):
        pipe.set(f"p{proto}:{i}", i)
    for i in range(1000):
        pipe.get(f"p{proto}:{i}")
    res = await pipe.execute()
    assert res[:1000] == [True] * 1000 and res[1000:] == [str(i).encode() for i in range(1000)]
    async with via.pipeline(transaction=True) as tx:
        tx.incr(f"c{proto}")
        tx.incr(f"c{proto}")
        assert await tx.execute() == [1, 2]
    # WATCH: a change by another client aborts the transaction
    other = aredis.Redis(port=rp.port, protocol=proto, retry=None)
    async with via.pipeline(transaction=True) as tx:
        await tx.watch(f"w{proto}")
        await other.set(f"w{proto}", "changed")
        tx.multi()
        tx.set(f"w{proto}", "mine")
        with pytest.raises(redis.WatchError):
            await tx.execute()
    sel = aredis.Redis(port=rp.port, protocol=proto, db=5, retry=None)
    await sel.set("only-in-5", "x")
    assert await sel.get("only-in-5") == b"x" and await via.get("only-in-5") is None
    t0 = time.monotonic()
    assert await via.blpop(f"empty{proto}", timeout=1) is None
    assert time.monotonic() - t0 >= 0.9  # the blocking command kept its own timeout
    for c in (via, other, sel):
        await c.aclose()


async def test_pubsub_both_protocols(rp):
    for proto in (2, 3):
        sub, _ = clients(rp, proto)
        ps = sub.pubsub()
        await ps.subscribe(f"ch{proto}")
        assert (await ps.get_message(timeout=2))["type"] == "subscribe"
        pub, _ = clients(rp, proto)
        assert await pub.publish(f"ch{proto}", "hello") == 1  # the subscriber is there, through the proxy
        msg = await eventually(lambda ps=ps: ps.get_message(timeout=0.5), what="the published message")
        assert msg["data"] == b"hello" and msg["channel"] == f"ch{proto}".encode()
        await ps.aclose()
        await sub.aclose()
        await pub.aclose()


async def test_ten_mb_value_round_trips(rp):
    via, _ = clients(rp, 3)
    big = os.urandom(10 * 1024 * 1024)
    await via.set("big", big)
    assert await via.get("big") == big
    await via.aclose()


async def test_malformed_resp_gets_an_error_and_closed_others_carry_on(rp):
    via, _ = clients(rp, 2)
    await via.set("still", "here")
    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss
    for bad in (b"*1\r\n$10000000000\r\n", b"*1\r\n$-5\r\nxx\r\n", b"*2\r\n$3\r\nGETxx\r\n\r\n",
                b"*1\r\n:5\r\n", b"*abc\r\n", b"\x00\xff" * 100 + b"\r\n*1\r\n$x\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
        writer.write(bad)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1000), 30)
        rest = await asyncio.wait_for(reader.read(1000), 30)  # then EOF: the connection is closed
        writer.close()
        assert b"-ERR" in data and rest == b"", (bad, data)
    assert proc.memory_info().rss - base < 20 * 1024 * 1024
    assert await via.get("still") == b"here"
    await via.aclose()


async def test_client_auth_required_when_configured(redis_server, start_proxy, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("app-secret\n")
    name, cfg = redis_config(redis_server, client_auth={"password_file": str(pw)})
    p = await start_proxy(cfg)
    port = p.port
    anon = aredis.Redis(port=port, protocol=2, retry=None)
    with pytest.raises(redis.AuthenticationError, match="Authentication required"):
        await anon.get("x")
    wrong = aredis.Redis(port=port, protocol=3, password="nope", retry=None)
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        await wrong.ping()
    ok = aredis.Redis(port=port, protocol=3, password="app-secret", retry=None)
    assert await ok.ping()
    for c in (anon, wrong, ok):
        await c.aclose()


async def test_upstream_password_from_the_url(start_proxy, tmp_path, another_redis, metrics):
    port = another_redis("--requirepass", "s3cr3t")
    secret = tmp_path / "redis-pass"
    secret.write_text("s3cr3t")
    name, cfg = redis_config(f"redis://:${{file:{secret}}}@127.0.0.1:{port}/2")
    p = await start_proxy(cfg)
    lport = p.port
    # a password with URL-hostile characters, from a file (re-read by the reload watcher)
    pw = tmp_path / "pw"
    pw.write_text("s3cr3t\n")
    n2, cfg2 = redis_config(f"redis://127.0.0.1:{port}/2")
    cfg2["upstreams"][n2]["targets"][0]["password_file"] = str(pw)
    p2 = await start_proxy(cfg2)
    c2 = aredis.Redis(port=p2.port, protocol=3, retry=None)
    assert await c2.ping()
    await c2.aclose()
    for proto in (2, 3):
        c = aredis.Redis(port=lport, protocol=proto, password="anything", retry=None)  # the app's AUTH is answered locally
        await c.set("k", "v")
        assert await c.get("k") == b"v"
        await c.aclose()
    direct = aredis.Redis(port=port, password="s3cr3t", db=2)
    assert await direct.get("k") == b"v"  # the URL's db
    await direct.aclose()
    assert metrics.delta("redis_commands_total", name=name, command_class="write", outcome="upstream") == 2


async def test_client_gone_mid_command_frees_the_half_open_probe(redis_server, start_proxy):
    clock = ManualClock()
    name, cfg = redis_config(redis_server, breaker={"fail_max": 1, "reset_timeout": "30s"}, retry={"attempts": 1})
    p = await start_proxy(cfg, clock=clock)
    port = p.port
    br = p.upstream.targets[0].breaker
    br.trip()
    clock.advance(30)
    # a client sends a blocking probe and goes away before the answer
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"*3\r\n$5\r\nBLPOP\r\n$7\r\nnothing\r\n$2\r\n60\r\n")
    await writer.drain()
    await eventually(lambda: br.state == "half_open" and br.probes == 1, what="the BLPOP is the probe")
    writer.close()
    await eventually(lambda: br.probes == 0, what="the abandoned probe freed its slot")
    c = aredis.Redis(port=port, protocol=2, retry=None)
    assert await c.ping()
    assert br.state == "closed"
    await c.aclose()


async def test_hello_and_reset_behind_pipelined_commands_answer_everything(rp):
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"*3\r\n$3\r\nSET\r\n$2\r\nhk\r\n$1\r\nv\r\n*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n*2\r\n$3\r\nGET\r\n$2\r\nhk\r\n"
                 b"*1\r\n$5\r\nRESET\r\n*2\r\n$3\r\nGET\r\n$2\r\nhk\r\n")
    await writer.drain()
    data = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # replies may come in several writes: read until the last one
        chunk = await asyncio.wait_for(reader.read(4096), 30)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"$1\r\nv\r\n") and b"+RESET" in data:
            break
    writer.close()
    assert data.startswith(b"+OK\r\n%7\r\n") and b"+RESET\r\n" in data and data.endswith(b"$1\r\nv\r\n")


async def test_two_subscribes_in_one_packet_and_tunnel_end_closes_the_client(redis_server, start_proxy, toxic_link):
    proxy, url = toxic_link(redis_server)
    name, cfg = redis_config(url + "/0")
    p = await start_proxy(cfg)
    port = p.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nb\r\n")
    await writer.drain()
    data = b""
    while data.count(b"subscribe") < 2:
        data += await asyncio.wait_for(reader.read(4096), 30)
    assert b"$1\r\na\r\n" in data and b"$1\r\nb\r\n" in data
    proxy.disable()  # the upstream side of the tunnel dies
    rest = await asyncio.wait_for(reader.read(4096), 30)
    assert rest == b""  # the subscriber is told: its connection is closed
    proxy.enable()
    writer.close()


async def test_writes_inside_multi_invalidate_the_cache(redis_server, start_proxy, toxic_link):
    proxy, url = toxic_link(redis_server)
    name, cfg = redis_config(url + "/0", retry={"attempts": 1}, breaker={"fail_max": 1, "reset_timeout": "1h"})
    p = await start_proxy(cfg)
    port = p.port
    c = aredis.Redis(port=port, protocol=3, retry=None)
    await c.set("mk", "old")
    assert await c.get("mk") == b"old"  # cached
    async with c.pipeline(transaction=True) as tx:
        tx.set("mk", "new")
        await tx.execute()
    proxy.disable()
    with pytest.raises(redis.ResponseError, match="UNAVAILABLE"):
        await c.get("mk")  # never the value from before the committed write
    proxy.enable()
    await c.aclose()


async def test_a_bad_select_fails_that_client_only(rp):
    bad = aredis.Redis(port=rp.port, protocol=2, db=999, retry=None)
    with pytest.raises(redis.ResponseError):
        await bad.get("x")
    good = aredis.Redis(port=rp.port, protocol=2, retry=None)
    for _ in range(10):
        await good.get("x")
    assert rp.upstream.targets[0].breaker.state == "closed"
    for c in (bad, good):
        await c.aclose()


async def test_large_aggregate_replies(rp):
    c, _ = clients(rp, 3)
    mapping = {f"f{i}": f"v{i}" for i in range(50_000)}
    await c.hset("bighash", mapping=mapping)
    assert await c.hgetall("bighash") == {k.encode(): v.encode() for k, v in mapping.items()}
    await c.aclose()


async def test_existing_connections_follow_a_reload(redis_server, start_proxy, another_redis):
    port2 = another_redis()
    name, cfg = redis_config(redis_server + "/0")
    p = await start_proxy(cfg)
    lport = p.port
    c = aredis.Redis(port=lport, protocol=2, retry=None, single_connection_client=True)
    await c.set("where", "first")
    cfg["upstreams"][name]["targets"][0]["url"] = f"redis://127.0.0.1:{port2}/0"

    p.rewrite(cfg)
    ok, _ = await p.app.reload("test")
    assert ok
    assert await c.get("where") is None  # the same client connection now talks to the new Redis
    await c.set("where", "second")
    direct = aredis.Redis(port=port2, retry=None)
    assert await direct.get("where") == b"second"
    await direct.aclose()
    await c.aclose()


async def test_subscribe_with_a_partial_command_behind_it_and_ping_before_it(rp):
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"*1\r\n$4\r\nPING\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n*2\r\n$11\r\nUNSUBSCRIBE\r\n$1")
    await writer.drain()
    # the first packet was read and parsed (its PING answered, the SUBSCRIBE confirmed) before the rest of
    # the UNSUBSCRIBE is sent: the partial command really waited in the proxy, whatever the machine's speed
    first = await read_until(reader, b"subscribe")
    assert first.startswith(b"+PONG\r\n")  # the reply owed first comes first
    writer.write(b"\r\na\r\n")
    await writer.drain()
    data = first + await read_until(reader, b"unsubscribe")
    writer.close()
    assert data.index(b"$9\r\nsubscribe") < data.index(b"$11\r\nunsubscribe")  # nothing lost in between


async def test_an_answer_larger_than_the_cache_is_served_and_not_stored(redis_server, start_proxy):
    name, cfg = redis_config(redis_server, fallback={"cache_bytes": "1KiB", "max_body": "1MiB"})
    p = await start_proxy(cfg)
    port = p.port
    c = aredis.Redis(port=port, protocol=2, retry=None)
    await c.set("big10k", b"x" * 10_000)
    pipe = c.pipeline(transaction=False)
    pipe.get("big10k")
    pipe.ping()
    assert await pipe.execute() == [b"x" * 10_000, True]
    assert len(p.upstream.cache) == 0
    await c.aclose()


@pytest.mark.parametrize("proto", [2, 3])
async def test_plain_clients_share_upstream_connections_and_each_gets_its_own_replies(rp, proto):
    """50 clients, each pipelining reads and writes of its own keys: they share a handful of upstream
    connections, and no client ever sees another's reply."""
    direct = redis.Redis(port=rp.direct_port, protocol=2)
    tag = f"share{proto}-{os.getpid()}"

    def upstream_clients() -> int:
        return sum(1 for c in direct.client_list() if c.get("name", "") == "" and c.get("cmd") != "client|list")

    before = upstream_clients()
    cs = [aredis.Redis(port=rp.port, protocol=proto, retry=None, socket_timeout=30) for _ in range(50)]

    async def work(i: int, c) -> None:
        for n in range(20):
            async with c.pipeline(transaction=False) as pipe:
                pipe.set(f"{tag}:{i}", f"{i}-{n}")
                pipe.get(f"{tag}:{i}")
                pipe.incr(f"{tag}:{i}:count")
                got = await pipe.execute()
            assert got[0] is True and got[1] == f"{i}-{n}".encode() and got[2] == n + 1, (i, n, got)

    await asyncio.gather(*(work(i, c) for i, c in enumerate(cs)))
    assert upstream_clients() - before <= 4  # 50 app connections, a few upstream ones
    for c in cs:
        await c.aclose()


async def test_a_client_moving_to_its_own_connection_keeps_its_command_order(rp):
    """A write on the shared connection, then a blocking read that needs a dedicated one, pipelined:
    the read must run after the write (it pops what the write pushed), and replies stay in order."""
    key = f"order-{os.getpid()}"
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(f"*3\r\n$5\r\nRPUSH\r\n${len(key)}\r\n{key}\r\n$1\r\nx\r\n"
                 f"*3\r\n$5\r\nBLPOP\r\n${len(key)}\r\n{key}\r\n$1\r\n1\r\n"
                 f"*2\r\n$3\r\nGET\r\n${len(key) + 1}\r\n{key}z\r\n".encode())
    await writer.drain()
    want = b":1\r\n*2\r\n$%d\r\n%s\r\n$1\r\nx\r\n$-1\r\n" % (len(key), key.encode())
    assert await read_len(reader, len(want)) == want
    writer.close()


async def test_a_client_that_stops_reading_is_bounded_and_others_carry_on(rp):
    """Large replies to an app that reads nothing: its input is paused instead of buffering every reply,
    and a client on the same shared upstream connection is not held up."""
    direct = redis.Redis(port=rp.direct_port, protocol=2)
    key = f"big-{os.getpid()}"
    direct.set(key, b"x" * (1 << 20))
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    cmd = f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode()
    proc = psutil.Process()
    before = proc.memory_info().rss
    for _ in range(400):  # 400 MB of replies asked for, none read
        writer.write(cmd)
    other = aredis.Redis(port=rp.port, protocol=2, retry=None, socket_timeout=30)
    for i in range(20):
        assert await other.set(f"{key}-o{i}", "v") is True
        await asyncio.sleep(0.02)
    assert proc.memory_info().rss - before < 120 * 1024 * 1024  # 32 replies in flight, not 400
    # and it was being answered all along, as far as it let itself be: the replies are there to read
    assert await asyncio.wait_for(reader.readexactly(10), 30) == b"$1048576\r\n"
    await other.aclose()
    writer.close()


async def test_select_of_a_missing_db_is_refused_and_the_client_stays_put(rp):
    """SELECT on shared connections is checked against Redis, as a direct SELECT would be."""
    c = aredis.Redis(port=rp.port, protocol=2, retry=None, socket_timeout=30, single_connection_client=True)
    key = f"sel-{os.getpid()}"
    await c.execute_command("SELECT", 3)
    await c.set(key, "in3")
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        await c.execute_command("SELECT", 99)
    await c.set(key + "b", "still3")
    direct = redis.Redis(port=rp.direct_port, db=3)
    assert direct.get(key) == b"in3" and direct.get(key + "b") == b"still3"
    assert redis.Redis(port=rp.direct_port, db=0).get(key + "b") is None
    await c.aclose()


async def test_wait_after_multiplexed_writes_is_refused_not_guessed(rp):
    shared = aredis.Redis(port=rp.port, protocol=2, retry=None, socket_timeout=30, single_connection_client=True)
    await shared.set(f"w-{os.getpid()}", "v")
    with pytest.raises(redis.ResponseError, match="cannot be honoured"):
        await shared.wait(0, 100)
    own = aredis.Redis(port=rp.port, protocol=2, retry=None, socket_timeout=30, single_connection_client=True,
                       client_name="own-connection")  # a named client has a connection of its own
    await own.set(f"w2-{os.getpid()}", "v")
    assert await own.wait(0, 100) == 0  # no replicas here: answered by Redis for this connection
    await shared.aclose()
    await own.aclose()


async def test_select_pipelined_behind_shared_commands_answers_everything_in_its_db(rp):
    key = f"psel-{os.getpid()}"
    redis.Redis(port=rp.direct_port, db=1).set(key, "in1")
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    k = key.encode()
    writer.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$3\r\nin0\r\n" % (len(k), k)
                 + b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n"
                 + b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)
                 + b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n"
                 + b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k))
    want = b"+OK\r\n+OK\r\n$3\r\nin1\r\n+OK\r\n+OK\r\n$3\r\nin0\r\n"
    assert await read_len(reader, len(want)) == want
    writer.close()
