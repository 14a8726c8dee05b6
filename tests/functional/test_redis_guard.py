"""The Redis listener's command policy, CONFIG GET masking and AUTH throttling (proxy/redis/guard.py),
with a real redis-server and the real redis-py client: what is refused never reaches Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aredis

from tests.support.proxy import upstream_config
from tests.support.redis import read_until
from tests.support.wait import eventually


def _client(port, proto=2, **kw):
    return aredis.Redis(port=port, protocol=proto, retry=None, socket_timeout=30, **kw)


@pytest.fixture
async def guarded(start_proxy, another_redis, tmp_path):
    """A password-protected Redis behind the proxy (the password in a file), clients AUTH to the proxy."""
    port = another_redis("--requirepass", "upstream-s3cr3t", "--masterauth", "primary-s3cr3t")
    upw, cpw = tmp_path / "up", tmp_path / "client"
    upw.write_text("upstream-s3cr3t")
    cpw.write_text("app-pass")
    name, cfg = upstream_config(f"redis://127.0.0.1:{port}/0", protocol="redis",
                                client_auth={"password_file": str(cpw)})
    cfg["upstreams"][name]["targets"][0]["password_file"] = str(upw)
    p = await start_proxy(cfg)
    p.direct = aredis.Redis(port=port, password="upstream-s3cr3t", retry=None)
    yield p
    await p.direct.aclose()


@pytest.mark.parametrize("proto", [2, 3])
async def test_config_get_never_hands_out_the_upstreams_passwords(guarded, proto):
    c = _client(guarded.port, proto, password="app-pass")
    assert (await guarded.direct.config_get("requirepass"))["requirepass"] == "upstream-s3cr3t"  # Redis shows it
    got = await c.config_get("requirepass")
    assert got == {"requirepass": "<redacted>"}
    everything = await c.config_get("*")
    assert everything["requirepass"] == "<redacted>" and everything["masterauth"] == "<redacted>"
    assert everything["maxmemory-policy"] == "noeviction"  # the rest is Redis's answer
    assert len(everything) > 100 and not [k for k, v in everything.items() if "s3cr3t" in v]
    await c.aclose()


_REFUSED = [("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "REWRITE"), ("CONFIG", "RESETSTAT"), ("SHUTDOWN", "NOSAVE"),
            ("DEBUG", "SLEEP", "0"), ("MIGRATE", "10.0.0.1", "6379", "k", "0", "1000"), ("MODULE", "LIST"),
            ("REPLICAOF", "10.0.0.1", "6379"), ("SLAVEOF", "10.0.0.1", "6379"), ("FAILOVER",),
            ("ACL", "LIST"), ("ACL", "SETUSER", "eve", "on", ">x", "+@all"), ("CLIENT", "KILL", "TYPE", "normal"),
            ("SAVE",), ("BGSAVE",), ("BGREWRITEAOF",), ("SYNC",), ("PSYNC", "?", "-1")]


@pytest.mark.parametrize("proto", [2, 3])
async def test_admin_commands_are_refused_with_noperm_and_never_reach_redis(guarded, proto, metrics):
    c = _client(guarded.port, proto, password="app-pass")
    await guarded.direct.config_resetstat()
    for args in _REFUSED:
        with pytest.raises(redis.exceptions.NoPermissionError, match="is not relayed by this proxy"):
            await c.execute_command(*args)
    assert await guarded.direct.ping()  # not shut down, not a replica
    assert (await guarded.direct.info("replication"))["role"] == "master"
    assert (await guarded.direct.config_get("maxmemory"))["maxmemory"] == "0"
    assert [u for u in await guarded.direct.acl_users()] == ["default"]
    # none of them was run: only the direct client's own commands are in Redis's stats
    stats = await guarded.direct.info("commandstats")
    assert not [k for k in stats if k.split("|")[0] in (
        "cmdstat_config", "cmdstat_shutdown", "cmdstat_debug", "cmdstat_migrate", "cmdstat_module",
        "cmdstat_replicaof", "cmdstat_slaveof", "cmdstat_failover", "cmdstat_save", "cmdstat_bgsave",
        "cmdstat_bgrewriteaof", "cmdstat_sync", "cmdstat_psync") and k != "cmdstat_config|resetstat"
        and k != "cmdstat_config|get"]
    assert "cmdstat_acl|list" not in stats and "cmdstat_acl|setuser" not in stats
    assert "cmdstat_client|kill" not in stats
    assert metrics.delta("redis_refused_commands_total", name=guarded.name, rule="CONFIG SET") == 1
    assert metrics.delta("redis_refused_commands_total", name=guarded.name, rule="ACL") == 2
    # what stays allowed
    assert await c.execute_command("ACL", "WHOAMI") in (b"default", "default")
    assert b"keyspace" in await c.execute_command("ACL", "CAT")
    await c.set("k", "v")
    assert await c.flushdb() is True and await c.get("k") is None
    await c.aclose()


async def test_allow_and_deny_rules_of_the_upstream_beat_the_defaults(another_redis, start_proxy):
    port = another_redis("--enable-debug-command", "local")
    name, cfg = upstream_config(f"redis://127.0.0.1:{port}", protocol="redis",
                                redis={"allow_commands": ["debug", "CONFIG|SET"], "deny_commands": ["KEYS", "ACL WHOAMI"]})
    p = await start_proxy(cfg)
    c = _client(p.port)
    assert await c.execute_command("DEBUG", "SLEEP", "0") in (True, b"OK")
    assert await c.config_set("lazyfree-lazy-user-del", "no") is True
    with pytest.raises(redis.exceptions.NoPermissionError, match=rf"'KEYS' .*upstreams\.{name}\.redis\.allow_commands"):
        await c.keys("*")
    with pytest.raises(redis.exceptions.NoPermissionError, match="'ACL WHOAMI'"):
        await c.execute_command("ACL", "WHOAMI")
    with pytest.raises(redis.exceptions.NoPermissionError, match="'CONFIG REWRITE'"):
        await c.execute_command("CONFIG", "REWRITE")  # only CONFIG SET was allowed
    await c.aclose()


async def test_a_refused_command_inside_multi_aborts_the_transaction(guarded):
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    writer.write(b"AUTH app-pass\r\nMULTI\r\nSET tx 1\r\nCONFIG SET maxmemory 1\r\nCONFIG GET requirepass\r\nEXEC\r\n")
    data = await read_until(reader, b"EXECABORT")
    writer.close()
    assert data.startswith(b"+OK\r\n+OK\r\n+QUEUED\r\n-NOPERM 'CONFIG SET'")
    assert b"-NOPERM CONFIG GET inside MULTI" in data
    assert data.endswith(b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    assert await guarded.direct.get("tx") is None  # the queued SET did not run


async def test_a_pubsub_connection_relays_only_pubsub_commands(guarded):
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    writer.write(b"AUTH app-pass\r\nSUBSCRIBE ch\r\n")
    await read_until(reader, b"subscribe")
    writer.write(b"*1\r\n$4\r\nPING\r\n")
    await read_until(reader, b"pong")
    # RESP2 Redis would refuse it here; a RESP3 one would run it, its reply unseen by the proxy
    writer.write(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$11\r\nrequirepass\r\n")
    data = await read_until(reader, b"not relayed on a pub/sub")
    assert await asyncio.wait_for(reader.read(), 30) == b""  # and closed
    assert b"s3cr3t" not in data


async def test_failed_auth_closes_the_connection_after_three(guarded, metrics):
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    writer.write(b"AUTH a\r\nAUTH b\r\nAUTH c\r\nAUTH app-pass\r\nPING\r\n")
    data = await read_until(reader, b"WRONGPASS")
    data += await asyncio.wait_for(reader.read(), 30)  # to the end: closed after the third
    assert data.count(b"-WRONGPASS") == 3 and b"+OK" not in data and b"PONG" not in data
    assert metrics.delta("redis_client_auth_failures_total", name=guarded.name, result="wrongpass") == 3


async def test_auth_guessing_is_throttled_for_the_upstream_not_per_connection(guarded):
    """Guessers on many fresh connections together get no more checks than the throttle allows:
    FREE free ones, then one per INTERVAL however many connections ask (a slow machine only lowers the
    rate: the bound is on checks per elapsed time)."""
    from proxy.redis.guard import AuthThrottle

    async def guess(i):
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
        writer.write(b"AUTH guess%d\r\n" % i)
        line = await asyncio.wait_for(reader.readline(), 60)
        writer.close()
        return line

    start = time.monotonic()
    answers = await asyncio.gather(*(guess(i) for i in range(60)))
    elapsed = time.monotonic() - start
    checked = sum(a.startswith(b"-WRONGPASS") for a in answers)
    refused = sum(a.startswith(b"-ERR too many failed AUTH") for a in answers)
    assert checked + refused == 60
    assert checked <= AuthThrottle.FREE + 1 + elapsed / AuthThrottle.INTERVAL

    async def app_gets_in():  # the right password still works, after the wait (or on a later try)
        ok = _client(guarded.port, password="app-pass")
        try:
            return await ok.ping()
        except redis.ResponseError:
            return False
        finally:
            await ok.aclose()

    assert await eventually(app_gets_in, timeout=30)
