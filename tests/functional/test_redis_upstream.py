"""`protocol: redis` against what a Redis upstream can do to the proxy: TLS (rediss://), connections that
die under a client that selected a db, commands that change a whole db, blocking and tunnelled
commands, the PING health check, cluster redirections, and the track each client connection keeps.
Real redis-server and redis-py (retries off); a relay stands between them where Redis must go silent."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aredis
import trustme

from tests.support.proxy import upstream_config
from tests.support.redis import read_len, read_until, start_redis
from tests.support.relay import CountingRelay
from tests.support.tools import stop_process
from tests.support.wait import eventually


def redis_config(url, **sections):
    return upstream_config(url, protocol="redis", **sections)


def client(port, **kw):
    return aredis.Redis(port=port, retry=None, socket_timeout=30, **kw)


async def test_rediss_target_verified_with_its_ca_and_server_name(start_proxy, tmp_path):
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("redis.internal")
    files = {}
    for n, pem in (("cert", cert.cert_chain_pems[0]), ("key", cert.private_key_pem), ("ca", ca.cert_pem),
                   ("other", other.cert_pem)):
        files[n] = str(tmp_path / f"{n}.pem")
        pem.write_to_path(files[n])
    proc, port = start_redis(tls=(files["cert"], files["key"], files["ca"]))
    try:
        name, cfg = redis_config(f"rediss://127.0.0.1:{port}/0", health={"interval": "200ms"})
        cfg["upstreams"][name]["targets"][0]["tls"] = {"ca_file": files["ca"], "server_name": "redis.internal"}
        p = await start_proxy(cfg)
        c = client(p.port, protocol=3)
        assert await c.set("tls-key", "over-tls") is True
        assert await c.get("tls-key") == b"over-tls"
        direct = redis.Redis(port=port, ssl=True, ssl_ca_certs=files["ca"], ssl_check_hostname=False)
        assert direct.get("tls-key") == b"over-tls"
        await eventually(lambda: p.upstream.targets[0].health.healthy is True, what="the PING check over TLS")
        await c.aclose()
        # a CA that did not sign the server's certificate: refused, never sent in the clear
        n2, cfg2 = redis_config(f"rediss://127.0.0.1:{port}/0", health={"interval": "200ms"}, retry={"attempts": 1})
        cfg2["upstreams"][n2]["targets"][0]["tls"] = {"ca_file": files["other"], "server_name": "redis.internal"}
        p2 = await start_proxy(cfg2)
        bad = client(p2.port, protocol=2)
        with pytest.raises(redis.ResponseError, match=rf"UNAVAILABLE redis upstream '{n2}' is unavailable"):
            await bad.get("tls-key")
        health = await eventually(lambda: p2.upstream.targets[0].health.healthy is False
                                  and p2.upstream.targets[0].health, what="the check fails")
        assert "certificate verify failed" in health.last_error
        await bad.aclose()
    finally:
        stop_process(proc)


async def test_select_is_replayed_on_a_new_upstream_connection(redis_server, start_proxy):
    """Redis drops the connection under a client that SELECTed a db: its next command runs in that db on
    the new connection, dedicated or shared alike."""
    name, cfg = redis_config(redis_server + "/0", retry={"attempts": 3, "backoff_base": "1ms", "backoff_max": "1ms"},
                             breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    direct = redis.Redis(port=int(redis_server.rsplit(":", 1)[1]))
    key = f"sel-replay-{time.monotonic_ns()}"
    ded = client(p.port, protocol=2, single_connection_client=True, client_name="sel-dedicated")
    await ded.execute_command("SELECT", 4)
    assert await ded.set(key, "dedicated") is True
    conn, = [c for c in direct.client_list() if c.get("name") == "sel-dedicated"]
    assert conn["db"] == "4"
    direct.client_kill_filter(_id=conn["id"])
    # a read is retried on a reset: whichever connection it meets first, it is answered from db 4
    assert await ded.get(key) == b"dedicated"
    assert await ded.set(key + ":after", "yes") is True
    new, = [c for c in direct.client_list() if c.get("name") == "sel-dedicated"]  # its name replayed too
    assert new["id"] != conn["id"] and new["db"] == "4"
    assert redis.Redis(port=direct.connection_pool.connection_kwargs["port"], db=4).get(key + ":after") == b"yes"
    # a client on the shared connections
    shared = client(p.port, protocol=2, single_connection_client=True)
    await shared.execute_command("SELECT", 5)
    assert await shared.set(key, "shared") is True
    direct.client_kill_filter(_type="normal", skipme=True)  # every upstream connection of the proxy
    assert await shared.get(key) == b"shared"
    assert await shared.set(key + ":after", "yes") is True
    db5 = redis.Redis(port=direct.connection_pool.connection_kwargs["port"], db=5)
    assert db5.get(key) == b"shared" and db5.get(key + ":after") == b"yes"
    for c in (ded, shared):
        await c.aclose()


# command → (args, does db 0's cache survive it, does db 1's)
CLEARING = {
    "EVAL": (["EVAL", "return 1", "0"], False, True),
    "FCALL": (["FCALL", "noop", "0"], False, True),
    "FLUSHDB": (["FLUSHDB"], False, True),
    "FLUSHALL": (["FLUSHALL"], False, False),
    "RENAME": (["RENAME", "other", "other2"], False, True),
    "unknown": (["NOSUCHCOMMAND", "x"], False, True),
    "SET of another key (control)": (["SET", "unrelated", "v"], True, True),
}


@pytest.mark.parametrize("case", list(CLEARING))
async def test_db_wide_commands_clear_that_dbs_cached_reads(case, start_proxy, another_redis):
    """Scripts, FLUSHDB/FLUSHALL, RENAME and unknown commands may change any key of their db: the
    cached reads of that db (FLUSHALL: of every db) must not be served afterwards while Redis is down.
    A write of one key (the control) drops only that key's reads."""
    args, db0_kept, db1_kept = CLEARING[case]
    port = another_redis()
    seed = redis.Redis(port=port)
    seed.function_load("#!lua name=lib\nredis.register_function('noop', function(keys, args) return 1 end)")
    seed.set("z", "zero")
    seed.set("other", "o")
    redis.Redis(port=port, db=1).set("z", "one")
    relay = await CountingRelay(port).start()
    name, cfg = redis_config(f"redis://127.0.0.1:{relay.port}/0", retry={"attempts": 1},
                             breaker={"fail_max": 100})
    p = await start_proxy(cfg)
    c0, c1 = client(p.port, protocol=2), client(p.port, protocol=2, db=1)
    assert await c0.get("z") == b"zero" and await c1.get("z") == b"one"  # cached now
    try:
        await c0.execute_command(*args)
    except redis.ResponseError:
        assert case == "unknown"  # Redis refuses it; the proxy could not know it would
    relay.cut()
    for c in (c0, c1):
        await c.connection_pool.disconnect()
    for c, kept, value in ((c0, db0_kept, b"zero"), (c1, db1_kept, b"one")):
        if kept:
            assert await c.get("z") == value
        else:
            with pytest.raises(redis.ResponseError, match="UNAVAILABLE"):
                await c.get("z")
    for c in (c0, c1):
        await c.aclose()
    relay.close()


async def test_monitor_and_xread_block_pass_through(redis_server, start_proxy):
    name, cfg = redis_config(redis_server + "/0", timeouts={"attempt": "1s"})
    p = await start_proxy(cfg)
    key = f"mon-{time.monotonic_ns()}"
    # MONITOR: the connection becomes a tunnel of what Redis executes
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"*1\r\n$7\r\nMONITOR\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 30) == b"+OK\r\n"
    other = client(p.port, protocol=2)
    await other.set(key, "seen")
    seen = await read_until(reader, f'"{key}"'.encode())
    assert f'"SET" "{key}" "seen"'.encode() in seen
    writer.close()
    # XREAD BLOCK: no per-command timeout of the proxy's (200 ms) cuts a blocking read short
    stream = f"xs-{time.monotonic_ns()}"
    blocked = client(p.port, protocol=2)
    t0 = time.monotonic()
    assert await blocked.xread({stream: "$"}, block=2500) == []
    assert time.monotonic() - t0 >= 2.4  # Redis's own BLOCK ended it, not the proxy's 1 s attempt timeout
    pending = asyncio.create_task(blocked.xread({stream: "$"}, block=0))
    direct = redis.Redis(port=int(redis_server.rsplit(":", 1)[1]))
    await eventually(lambda: any(c.get("cmd") == "xread" and "b" in c.get("flags", "")
                                 for c in direct.client_list()), what="the XREAD is blocked in Redis")
    entry = await other.xadd(stream, {"f": "v"})
    got = await asyncio.wait_for(pending, 30)
    assert got == [[stream.encode(), [(entry, {b"f": b"v"})]]]
    for c in (other, blocked):
        await c.aclose()


async def test_ping_health_check_and_status_labels(redis_server, start_proxy, metrics, another_redis):
    relay = await CountingRelay(int(redis_server.rsplit(":", 1)[1])).start()
    name, cfg = redis_config(f"redis://127.0.0.1:{relay.port}/0", retry={"attempts": 1}, breaker={"fail_max": 100},
                             timeouts={"attempt": "2s"},
                             health={"interval": "200ms", "timeout": "2s", "unhealthy_threshold": 1})
    p = await start_proxy(cfg)
    health = p.upstream.targets[0].health
    await eventually(lambda: health.healthy is True, what="PING answered")
    assert metrics.value("upstream_health", name=name, track="stable") == 1
    c = client(p.port, protocol=2)
    key = f"st-{time.monotonic_ns()}"
    await c.set(key, "string")
    await c.get(key)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await c.lpush(key, "x")  # an answer from Redis, if an error one
    relay.stall()
    with pytest.raises(redis.ResponseError, match=r"UNAVAILABLE .*\(timeout\)"):
        await c.get(key + ":silent")

    def count(status, outcome, cls):
        return (metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status=status,
                              outcome=outcome),
                metrics.delta("redis_commands_total", name=name, command_class=cls, outcome=outcome))

    assert count("ok", "upstream", "read") == (1 + 1, 1)  # the SET (a write) and the GET are both "ok"
    assert metrics.delta("redis_commands_total", name=name, command_class="write", outcome="upstream") == 2
    assert count("error", "upstream", "write")[0] == 1  # WRONGTYPE
    assert count("timeout", "rejected", "read") == (1, 1)
    # the PING through the silent relay times out: the track is down
    await eventually(lambda: health.healthy is False, what="PING timed out")
    assert health.last_error.startswith("TimeoutError")
    assert metrics.value("upstream_health", name=name, track="stable") == 0
    relay.resume()
    await eventually(lambda: health.healthy is True, what="PING answered again")
    await c.aclose()
    relay.close()
    # a wrong password: the check says why
    port = another_redis("--requirepass", "right-one")
    n2, cfg2 = redis_config(f"redis://:wrong-one@127.0.0.1:{port}/0", health={"interval": "200ms",
                                                                             "unhealthy_threshold": 1})
    p2 = await start_proxy(cfg2)
    h2 = p2.upstream.targets[0].health
    await eventually(lambda: h2.healthy is False, what="the check fails")
    assert "WRONGPASS" in h2.last_error and "wrong-one" not in h2.last_error


def _two_node_cluster(another_redis, tmp_path) -> tuple[int, int]:
    """A real Redis Cluster: node A owns slots 0-8191, node B 8192-16383."""
    from tests.support.net import free_port

    bus = [free_port(), free_port()]  # the cluster bus: the default, port + 10000, may not exist
    ports = [another_redis("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / f"nodes-{n}.conf"),
                           "--cluster-port", str(bus[i])) for i, n in enumerate("ab")]
    a, b = (redis.Redis(port=p) for p in ports)
    a.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
    b.execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
    a.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[1], bus[1])
    return ports[0], ports[1]


async def test_moved_and_ask_are_passed_back_unchanged(start_proxy, another_redis, tmp_path):
    """Not cluster-aware, the proxy fronts one node: a real node's redirections reach the client byte for
    byte, so a cluster-aware client can follow them, and they are answers, not failures."""
    from redis.crc import key_slot

    port_a, port_b = _two_node_cluster(another_redis, tmp_path)
    a, b = redis.Redis(port=port_a), redis.Redis(port=port_b)

    def formed() -> bool:
        return all(b"cluster_state:ok" in n.execute_command("CLUSTER", "INFO")
                   and b"cluster_known_nodes:2" in n.execute_command("CLUSTER", "INFO") for n in (a, b))

    await eventually(formed, what="the two nodes form a cluster")
    moved_key, ask_key = b"a", b"b"
    assert key_slot(moved_key) >= 8192 > key_slot(ask_key)  # a on node B, b on node A
    slot = key_slot(ask_key)  # node A hands this slot to B: a key it no longer has is asked of B
    b.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", a.execute_command("CLUSTER", "MYID"))
    a.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", b.execute_command("CLUSTER", "MYID"))
    name, cfg = redis_config(f"redis://127.0.0.1:{port_a}/0", breaker={"fail_max": 1})
    p = await start_proxy(cfg)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    for _ in range(5):
        writer.write(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n")
    want = (f"-MOVED {key_slot(moved_key)} 127.0.0.1:{port_b}\r\n-ASK {slot} 127.0.0.1:{port_b}\r\n" * 5).encode()
    assert await read_len(reader, len(want)) == want
    writer.close()
    c = client(p.port, protocol=2)
    with pytest.raises(redis.exceptions.MovedError, match=f"^{key_slot(moved_key)} 127.0.0.1:{port_b}$"):
        await c.get("a")
    await c.aclose()
    assert p.breaker.state == "closed"  # answers, not failures (fail_max 1)


async def test_each_client_connection_keeps_one_track(start_proxy, another_redis):
    """Redis picks the track once per client connection (a connection's commands, and the state it
    builds, stay on one server); across connections the weights hold."""
    stable_port, canary_port = another_redis(), another_redis()
    name, cfg = redis_config(f"redis://127.0.0.1:{stable_port}/0")
    cfg["upstreams"][name]["targets"] = [{"name": "stable", "url": f"redis://127.0.0.1:{stable_port}/0", "weight": 50},
                                         {"name": "canary", "url": f"redis://127.0.0.1:{canary_port}/0", "weight": 50}]
    p = await start_proxy(cfg)
    clients = [client(p.port, protocol=2, single_connection_client=True) for _ in range(40)]
    for i, c in enumerate(clients):
        for n in range(5):
            await c.set(f"c{i}:{n}", "v")
    stable, canary = redis.Redis(port=stable_port), redis.Redis(port=canary_port)
    where = []
    for i in range(40):
        on_stable = sum(stable.exists(f"c{i}:{n}") for n in range(5))
        on_canary = sum(canary.exists(f"c{i}:{n}") for n in range(5))
        assert (on_stable, on_canary) in ((5, 0), (0, 5)), (i, on_stable, on_canary)
        where.append("stable" if on_stable else "canary")
    assert 5 <= where.count("canary") <= 35, where  # 50/50 over 40 connections: far inside ±4σ
    for c in clients:
        await c.aclose()
