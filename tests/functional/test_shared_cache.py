"""`fallback.shared` against real engines: a real redis-server (and a real three-master Redis Cluster),
two proxies — one a separate `python -m proxy` process, the other in this process — and the upstream cut
with toxiproxy. A pod that started during the outage serves what its neighbour stored; Redis down or cut
changes nothing but the answer's headers; private answers never reach Redis."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
import redis.asyncio as aredis
import yaml
from aiohttp import web
from multidict import CIMultiDict

from tests.support.net import free_port
from tests.support.proxy import Process, wait_http
from tests.support.redis import start_cluster
from tests.support.toxiproxy import add_toxic
from tests.support.wait import eventually

BODY = b'{"id": 42, "name": "product"}'


def config(target: str, shared: dict | None, name: str = "db", **sections) -> dict:
    fallback = {"cache_ttl": "1h", "stale_ttl": "2h", **sections.pop("fallback", {})}
    if shared is not None:
        fallback["shared"] = {"timeout": "1s", **shared}
    up = {"protocol": "http", "listen": f"127.0.0.1:{free_port()}", "targets": [{"name": "stable", "url": target}],
          "retry": {"attempts": 1}, "breaker": {"fail_max": 100}, "timeouts": {"connect": "1s", "total": "5s"},
          "health": {"enabled": False}, "fallback": fallback, **sections}
    return {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "log": {"level": "warning"}, "upstreams": {name: up}}


def url_of(cfg: dict, name: str = "db") -> str:
    return "http://" + cfg["upstreams"][name]["listen"]


@pytest.fixture
async def item_upstream(aiohttp_server):
    """An upstream with a cacheable answer, a private one, a Set-Cookie one and a no-store one."""
    async def item(request):
        return web.Response(body=BODY, content_type="application/json", headers={"ETag": '"v1"'})

    async def cookie(request):
        return web.Response(body=b"c", headers={"Set-Cookie": "session=secret"})

    async def private(request):
        return web.Response(body=b"p", headers={"Cache-Control": "private"})

    app = web.Application()
    app.router.add_get("/item", item)
    app.router.add_get("/cookie", cookie)
    app.router.add_get("/private", private)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def get(url: str, headers: dict | None = None) -> tuple[int, CIMultiDict, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def shared_keys(redis_url: str) -> list[bytes]:
    r = aredis.Redis.from_url(redis_url)
    try:
        return sorted(await r.keys("resilience-proxy:*"))
    finally:
        await r.aclose()


async def warm_in_another_process(cfg: dict, tmp_path, redis_url: str, path: str = "/item") -> Process:
    """Proxy A, a separate process: one fresh answer through it, until it is in Redis."""
    a = Process.run(cfg, tmp_path / "a.yaml")
    await wait_http(url_of(cfg) + path)
    status, headers, body = await get(url_of(cfg) + path)
    assert (status, body, "X-Fallback" not in headers) == (200, BODY, True)
    await eventually(lambda: shared_keys(redis_url), what="proxy A wrote the answer to the shared cache")
    return a


async def test_a_fresh_sidecar_serves_its_neighbours_answer_when_the_upstream_is_cut(
        item_upstream, toxic_link, another_redis, start_proxy, tmp_path, metrics):
    link, through = toxic_link(item_upstream)
    redis_url = f"redis://127.0.0.1:{another_redis()}/0"
    a = await warm_in_another_process(config(through, {"url": redis_url, "cache_ttl": "1ms"}), tmp_path, redis_url)
    try:
        (key,) = await shared_keys(redis_url)
        assert key.startswith(b"resilience-proxy:db:") and b"item" not in key  # a digest, not the path
        link.disable()  # the outage: both sidecars' upstream is gone
        b_cfg = config(through, {"url": redis_url, "cache_ttl": "1ms"})
        await start_proxy(b_cfg)
        status, headers, body = await get(url_of(b_cfg) + "/item")  # B's local cache is empty
        assert (status, body) == (200, BODY)
        assert headers["X-Fallback"] == "shared-stale" and headers["X-Fallback-Reason"] == "upstream_error"
        assert headers["ETag"] == '"v1"' and int(headers["Age"]) >= 0
        assert metrics.delta("fallback_responses_total", name="db", source="shared-stale", reason="upstream_error") == 1
        assert metrics.delta("shared_cache_reads_total", name="db", result="hit") == 1
        status, headers, _ = await get(url_of(b_cfg) + "/never-stored")
        assert status == 502 and "X-Fallback" not in headers
        assert metrics.delta("shared_cache_reads_total", name="db", result="miss") == 1
    finally:
        await a.stop()


async def test_a_burst_in_the_outage_is_served_from_the_shared_cache_not_counted_as_redis_down(
        item_upstream, toxic_link, another_redis, start_proxy, tmp_path, metrics):
    """Every request in flight fails at once in an outage, and each asks the shared cache: more of them
    than the client has connections wait for one (within `timeout`), none is turned away as an error,
    and the breaker stays closed."""
    link, through = toxic_link(item_upstream)
    redis_url = f"redis://127.0.0.1:{another_redis()}/0"
    shared = {"url": redis_url, "cache_ttl": "1ms", "timeout": "10s", "max_connections": 4}
    a = await warm_in_another_process(config(through, shared), tmp_path, redis_url)
    try:
        link.disable()
        b_cfg = config(through, shared, limits={"max_in_flight": 1000})
        await start_proxy(b_cfg)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def one():
                async with s.get(url_of(b_cfg) + "/item") as r:
                    return r.status, r.headers.get("X-Fallback"), await r.read()

            answers = await asyncio.gather(*(one() for _ in range(200)))
        assert answers == [(200, "shared-stale", BODY)] * 200
        assert metrics.delta("shared_cache_reads_total", name="db", result="hit") == 200
        assert metrics.added("shared_cache_reads_total", name="db", result="error") == 0
    finally:
        await a.stop()


async def test_a_young_shared_entry_is_shared_cache_and_a_younger_local_one_wins(
        item_upstream, toxic_link, another_redis, start_proxy, tmp_path):
    link, through = toxic_link(item_upstream)
    redis_url = f"redis://127.0.0.1:{another_redis()}/0"
    a = await warm_in_another_process(config(through, {"url": redis_url}), tmp_path, redis_url)
    try:
        b_cfg = config(through, {"url": redis_url})
        await start_proxy(b_cfg)
        link.disable()
        _, headers, body = await get(url_of(b_cfg) + "/item")
        assert body == BODY and headers["X-Fallback"] == "shared-cache"
        link.enable()
        await get(url_of(b_cfg) + "/item")  # B's own fresh answer, younger than A's
        link.disable()
        _, headers, body = await get(url_of(b_cfg) + "/item")
        assert body == BODY and headers["X-Fallback"] == "cache"  # fresh locally: Redis is not even asked
    finally:
        await a.stop()


async def test_redis_down_during_the_outage_changes_nothing_but_the_headers(
        item_upstream, toxic_link, another_redis, start_proxy, metrics):
    link, through = toxic_link(item_upstream)
    redis_port = another_redis()
    redis_link, redis_through = toxic_link(f"redis://127.0.0.1:{redis_port}")
    cfg = config(through, {"url": redis_through + "/0", "cache_ttl": "1ms", "timeout": "200ms"},
                 fallback={"cache_ttl": "1ms", "static": {"status": 200, "body": '{"degraded": true}'}})
    await start_proxy(cfg)
    assert (await get(url_of(cfg) + "/item"))[2] == BODY
    link.disable()
    redis_link.disable()  # and the shared cache is unreachable too
    status, headers, body = await get(url_of(cfg) + "/item")
    assert (status, body, headers["X-Fallback"]) == (200, BODY, "stale")  # the local copy, as without Redis
    status, headers, body = await get(url_of(cfg) + "/other")
    assert (status, body, headers["X-Fallback"]) == (200, b'{"degraded": true}', "static")
    assert metrics.delta("shared_cache_reads_total", name="db", result="error") == 2
    add_toxic(redis_link, "timeout", timeout=0)  # accepts, never answers: a slow Redis
    redis_link.enable()
    status, headers, _ = await get(url_of(cfg) + "/other")  # bounded by the shared cache's timeout
    assert (status, headers["X-Fallback"]) == (200, "static")


async def test_private_answers_and_requests_never_reach_redis(item_upstream, another_redis, start_proxy):
    redis_url = f"redis://127.0.0.1:{another_redis()}/0"
    cfg = config(item_upstream, {"url": redis_url})
    await start_proxy(cfg)
    await get(url_of(cfg) + "/item", {"Authorization": "Bearer user-a"})
    await get(url_of(cfg) + "/item", {"Cookie": "s=1"})
    await get(url_of(cfg) + "/cookie")
    await get(url_of(cfg) + "/private")
    await get(url_of(cfg) + "/item")  # the one public, storable answer
    keys = await eventually(lambda: shared_keys(redis_url), what="the public answer written")
    await asyncio.sleep(0.2)  # the writer drains its queue in order: anything else would be there by now
    assert len(await shared_keys(redis_url)) == len(keys) == 1
    r = aredis.Redis.from_url(redis_url)
    try:
        value = await r.get(keys[0])
    finally:
        await r.aclose()
    assert b"Bearer" not in value and b"secret" not in value and b"Set-Cookie" not in value


async def test_the_cache_must_not_live_in_the_dependency_it_stands_in_for(tmp_path, another_redis):
    port = another_redis()
    cfg = config("http://127.0.0.1:1", {"url": f"redis://:pw@localhost:{port}/3"})
    cfg["upstreams"]["cache"] = {"protocol": "redis", "listen": f"127.0.0.1:{free_port()}",
                                 "targets": [{"name": "stable", "url": f"redis://127.0.0.1:{port}/0"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    checked = Process("check-config", str(path))
    assert await checked.wait() != 0
    text = "".join(checked.output())
    assert "upstreams.db.fallback.shared.url" in text and "must not live in a dependency" in text
    assert ":pw@" not in text


async def test_admin_config_and_logs_never_show_the_caches_password(item_upstream, another_redis, start_proxy,
                                                                     json_log):
    port = another_redis("--requirepass", "cache-secret-pw")
    cfg = config(item_upstream, {"url": f"redis://:cache-secret-pw@127.0.0.1:{port}/0"})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/admin/config") as r:
        text = await r.text()
    assert "cache-secret-pw" not in text and "shared" in text
    assert (await get(url_of(cfg) + "/item"))[2] == BODY
    await eventually(lambda: shared_keys(f"redis://:cache-secret-pw@127.0.0.1:{port}/0"), what="written with AUTH")
    assert "cache-secret-pw" not in json_log.text


async def test_a_redis_cluster_shares_the_cache_too(item_upstream, toxic_link, another_redis, start_proxy, tmp_path):
    ports = await start_cluster(another_redis, tmp_path)
    link, through = toxic_link(item_upstream)
    shared = {"url": f"redis://127.0.0.1:{ports[1]}", "cluster": True}
    a_cfg = config(through, shared)
    a = Process.run(a_cfg, tmp_path / "a.yaml")
    try:
        await wait_http(url_of(a_cfg) + "/item")
        paths = [f"/item?n={i}" for i in range(12)]  # keys over all three masters' slots
        for path in paths:
            assert (await get(url_of(a_cfg) + path))[2] == BODY

        async def all_written():
            rc = aredis.RedisCluster.from_url(f"redis://127.0.0.1:{ports[0]}")
            try:
                await rc.initialize()
                n = 0
                for node in rc.get_primaries():
                    n += len(await rc.keys("resilience-proxy:*", target_nodes=node))
                return n == len(paths) + 1  # and /item, which wait_http asked for
            finally:
                await rc.aclose()

        await eventually(all_written, what="all twelve answers in the cluster")
        link.disable()
        b_cfg = config(through, shared)
        await start_proxy(b_cfg)
        for path in paths:
            _, headers, body = await get(url_of(b_cfg) + path)
            assert body == BODY and headers["X-Fallback"] == "shared-cache", path
    finally:
        await a.stop()


async def test_an_llm_completion_from_the_shared_cache_is_replayed_as_a_stream(fake, toxic_link, another_redis,
                                                                            start_proxy, tmp_path):
    link, through = toxic_link(fake.url)
    redis_url = f"redis://127.0.0.1:{another_redis()}/0"

    def llm():
        cfg = config(through, {"url": redis_url}, retry={"attempts": 1})
        up = cfg["upstreams"]["db"]
        up["protocol"] = "openai"
        up["fallback"] = {"shared": {"url": redis_url, "timeout": "1s"}}
        return cfg

    a_cfg = llm()
    a = Process.run(a_cfg, tmp_path / "a.yaml")
    msg = [{"role": "user", "content": "shared?"}]
    try:
        await wait_http(url_of(a_cfg) + "/api/v1/models")
        ca = openai.AsyncOpenAI(base_url=url_of(a_cfg) + "/api/v1", api_key="sk-placeholder", max_retries=0)
        warm = await ca.chat.completions.create(model="m", messages=msg)
        await eventually(lambda: shared_keys(redis_url), what="the completion written")
        link.disable()
        b_cfg = llm()
        await start_proxy(b_cfg)
        cb = openai.AsyncOpenAI(base_url=url_of(b_cfg) + "/api/v1", api_key="sk-placeholder", max_retries=0)
        r = await cb.chat.completions.create(model="m", messages=msg)
        assert r.choices[0].message.content == warm.choices[0].message.content
        assert r.model_extra["fallback"] is True
        chunks = [ch async for ch in await cb.chat.completions.create(model="m", messages=msg, stream=True)]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == warm.choices[0].message.content
        assert chunks[0].model_extra["fallback"] is True
    finally:
        await a.stop()
