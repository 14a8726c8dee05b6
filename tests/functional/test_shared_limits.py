"""`llm.limits.shared` against a real redis-server: two proxies (one a separate process) sending together
stay within one requests-per-minute budget, as a single sidecar would; with Redis cut each falls back to
its share (limits / expected_replicas), and returns to the shared buckets when Redis heals."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import redis.asyncio as aredis

from proxy.clock import Clock
from proxy.fleet.limits import SharedLimits, local_share
from proxy.settings.spec import LLMLimitsSpec
from tests.support.net import free_port
from tests.support.proxy import Process, wait_http
from tests.support.wait import eventually

RPM = 20
MSG = [{"role": "user", "content": "hi"}]


def config(target: str, redis_url: str, **limits) -> dict:
    lim = {"requests_per_minute": RPM, "shared": {"url": redis_url, "timeout": "500ms"}, "expected_replicas": 2,
           **limits}
    up = {"protocol": "openai", "listen": f"127.0.0.1:{free_port()}", "targets": [{"name": "stable", "url": target}],
          "retry": {"attempts": 1}, "health": {"enabled": False}, "fallback": {"cache_entries": 0},
          "llm": {"limits": lim, "degraded": {"enabled": False}}}
    return {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "log": {"level": "info"}, "upstreams": {"llm": up}}


def client(cfg: dict) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://" + cfg["upstreams"]["llm"]["listen"] + "/api/v1",
                              api_key="placeholder", max_retries=0)


async def ask(c: openai.AsyncOpenAI, n: int, tokens: list | None = None, **kw) -> tuple[int, int]:
    """n completions, one at a time → (answered, refused with the sidecar's 429); `tokens` gets each
    answer's usage.total_tokens."""
    ok = refused = 0
    for i in range(n):
        try:
            r = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}], **kw)
            ok += 1
            if tokens is not None:
                tokens.append(r.usage.total_tokens)
        except openai.RateLimitError:
            refused += 1
    return ok, refused


async def test_two_sidecars_together_stay_within_one_requests_budget(fake, another_redis, start_proxy, tmp_path):
    redis_url = f"redis://127.0.0.1:{another_redis()}/0"
    a_cfg, b_cfg = config(fake.url, redis_url), config(fake.url, redis_url)
    a = Process.run(a_cfg, tmp_path / "a.yaml")
    try:
        await wait_http("http://" + a_cfg["upstreams"]["llm"]["listen"] + "/api/v1/models")
        await start_proxy(b_cfg)
        calls_before = len(fake.requests)
        started = time.monotonic()
        (a_ok, a_refused), (b_ok, b_refused) = await asyncio.gather(ask(client(a_cfg), 25), ask(client(b_cfg), 25))
        elapsed = time.monotonic() - started
        sent = len(fake.requests) - calls_before
        # one budget of RPM for both, plus what refilled while they sent (RPM/60 a second), plus one
        allowed = RPM + RPM / 60 * elapsed + 1
        assert a_ok + b_ok == sent <= allowed, (a_ok, b_ok, sent, elapsed)
        assert a_ok > 0 and b_ok > 0 and a_refused + b_refused == 50 - sent, (a_ok, b_ok, a_refused, b_refused)
        r = aredis.Redis.from_url(redis_url)
        try:
            keys = await r.keys("resilience-proxy:*")
        finally:
            await r.aclose()
        assert keys == [b"resilience-proxy:{llm:llm}:rpm"]  # the fleet's one bucket, in one cluster slot
    finally:
        await a.stop()


async def test_redis_cut_each_keeps_its_share_and_healed_it_shares_again(fake, another_redis, toxic_link,
                                                                      start_proxy, metrics, json_log):
    redis_port = another_redis()
    link, redis_through = toxic_link(f"redis://127.0.0.1:{redis_port}")
    cfg = config(fake.url, redis_through + "/0")
    await start_proxy(cfg)
    c = client(cfg)
    assert await ask(c, 1) == (1, 0)  # shared: one of the fleet's RPM taken
    link.disable()
    ok, refused = await ask(c, RPM)
    assert ok == RPM // 2 and refused == RPM - ok  # this pod's share: RPM / expected_replicas
    # counted per decision: an admitted request is decided twice (admission, its attempt), a refused one once
    assert metrics.delta("llm_limits_local_total", name="llm") == 2 * ok + refused
    assert json_log.events("llm_limits_local", upstream="llm")
    direct = aredis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
    sec, usec = await direct.time()
    healed_at = sec + usec / 1e6
    link.enable()

    async def shared_again():
        await ask(c, 1)
        return json_log.events("llm_limits_shared", upstream="llm")

    await eventually(shared_again, what="back on the shared buckets once Redis healed (its breaker rests 5 s)")
    try:
        written_at = float(await direct.hget("resilience-proxy:{llm:llm}:rpm", "a"))
    finally:
        await direct.aclose()
    assert written_at > healed_at  # the shared bucket is charged again


async def test_redis_killed_the_pod_decides_on_its_share_and_restarted_it_shares_again():
    """A real kill (SIGKILL: the server and its scripts gone), then a new redis-server on the same port:
    the script is loaded again (NOSCRIPT) and the decisions are Redis's once the breaker's rest is over."""
    from proxy.clock import ManualClock
    from tests.support.redis import start_redis
    from tests.support.tools import stop_process

    proc, port = start_redis()
    url = f"redis://127.0.0.1:{port}/0"
    clock, events = ManualClock(), _Events()
    lim = SharedLimits("llm", LLMLimitsSpec(requests_per_minute=100, expected_replicas=4,
                                            shared={"url": url, "timeout": "5s"}), clock, events)
    try:
        assert await lim.acquire("m", 1) == (0.0, "") and events.local == 0
        proc.kill()
        proc.wait(10)
        assert await lim.acquire("m", 1) == (0.0, "") and events.local == 1 and lim.on_local
        assert await lim.acquire("m", 1) == (0.0, "") and events.local == 2  # resting: not even asked
        proc, _ = start_redis(port=port)
        clock.advance(6)  # past the breaker's 5 s rest: the next decision probes Redis
        assert await lim.acquire("m", 1) == (0.0, "") and events.local == 2 and not lim.on_local
        r = aredis.Redis.from_url(url)
        try:
            level = float(await r.hget("resilience-proxy:{llm:llm}:rpm", "l"))
        finally:
            await r.aclose()
        assert level == 99  # the new server's bucket: full, less this one request
    finally:
        await lim.close()
        stop_process(proc)


class _Gone:
    """A redis-py client whose every call fails: the local share must decide."""

    def register_script(self, script):
        async def run(keys, args):
            raise ConnectionError("refused")
        return run

    async def aclose(self):
        pass


class _Events:
    local = 0

    def limits_local(self):
        self.local += 1


async def test_the_local_share_is_each_limit_over_expected_replicas():
    spec = LLMLimitsSpec(requests_per_minute=100, tokens_per_minute=9000, expected_replicas=3,
                         models={"big": {"requests_per_minute": 2}}, shared={"url": "redis://127.0.0.1:1"})
    share = local_share(spec)
    assert (share.requests_per_minute, share.tokens_per_minute, share.models["big"].requests_per_minute) == (33, 3000, 1)
    events = _Events()
    lim = SharedLimits("llm", spec, Clock(), events, make_client=lambda s: _Gone())
    for _ in range(33):
        assert (await lim.acquire("m", 10))[0] == 0
    wait, why = await lim.acquire("m", 10)
    assert wait > 0 and why == "requests_per_minute" and events.local == 34
    assert (await lim.acquire("big", 10))[1] == "requests_per_minute"  # the upstream's share is spent first
    await lim.close()


@pytest.mark.parametrize("mode", ["take", "check"])
async def test_the_script_takes_only_when_every_bucket_has_it(another_redis, mode):
    url = f"redis://127.0.0.1:{another_redis()}/0"
    spec = LLMLimitsSpec(requests_per_minute=5, tokens_per_minute=100, shared={"url": url},
                         models={"m": {"tokens_per_minute": 50}})
    lim = SharedLimits("llm", spec, Clock(), _Events())
    try:
        if mode == "take":
            assert await lim.acquire("m", 40) == (0.0, "")
            wait, why = await lim.acquire("m", 40)  # the model's 50 tokens hold it back; nothing is taken
            assert why == "models.m.tokens_per_minute" and 0 < wait <= 60
            assert await lim.acquire("other", 40) == (0.0, "")  # the upstream's buckets were not charged twice
            lim.correct("m", 40, 5)  # the answer used 5 of 40: 35 back, without waiting
            await asyncio.gather(*lim._corrections)  # sent without waiting: wait for it here
            assert await lim.check("m", 40) == (0.0, "")
        else:
            for _ in range(3):
                assert await lim.check("m", 40) == (0.0, "")  # asking takes nothing
            r = aredis.Redis.from_url(url)
            try:
                assert await r.keys("*") == []
            finally:
                await r.aclose()
    finally:
        await lim.close()


async def test_two_sidecars_together_stay_within_one_tokens_budget(fake, another_redis, start_proxy, tmp_path):
    """Tokens: each request is charged its estimate at admission (its prompt and its `max_tokens`, as
    providers reserve) and corrected from `usage` after; the answers the provider sent for both sidecars
    add up to one budget and what refilled meanwhile."""
    tpm = 300
    redis_url = f"redis://127.0.0.1:{another_redis()}/0"
    # expected_replicas 1: each pod's local share is the whole budget, so only the shared buckets keep the
    # two of them within one
    a_cfg, b_cfg = (config(fake.url, redis_url, requests_per_minute=None, tokens_per_minute=tpm, expected_replicas=1)
                    for _ in range(2))
    a = Process.run(a_cfg, tmp_path / "a.yaml")
    try:
        await wait_http("http://" + a_cfg["upstreams"]["llm"]["listen"] + "/api/v1/models")
        await start_proxy(b_cfg)
        used: list[int] = []
        started = time.monotonic()
        (a_ok, _), (b_ok, _) = await asyncio.gather(ask(client(a_cfg), 25, used, max_tokens=12),
                                                    ask(client(b_cfg), 25, used, max_tokens=12))
        elapsed = time.monotonic() - started
        assert max(used) <= 17  # the fake's answers fit their reservation: no estimate falls short
        assert sum(used) <= tpm + tpm / 60 * elapsed, (sum(used), a_ok, b_ok, elapsed)
        assert a_ok > 0 and b_ok > 0 and a_ok + b_ok < 50
        r = aredis.Redis.from_url(redis_url)
        try:
            assert [k for k in await r.keys("*") if k.endswith(b":tpm")], "the tokens bucket lives in Redis"
        finally:
            await r.aclose()
    finally:
        await a.stop()


async def test_a_burst_of_decisions_waits_for_a_connection_instead_of_going_local(another_redis):
    """More decisions at once than the client has connections (redis-py fails the 101st at once by
    default): they queue for one within `timeout`, and none falls to the local share."""
    url = f"redis://127.0.0.1:{another_redis()}/0"
    spec = LLMLimitsSpec(requests_per_minute=10_000, shared={"url": url, "timeout": "10s", "max_connections": 8})
    events = _Events()
    lim = SharedLimits("llm", spec, Clock(), events)
    try:
        results = await asyncio.gather(*(lim.acquire("m", 1) for _ in range(300)))
        assert [w for w, _ in results] == [0.0] * 300
        assert events.local == 0 and lim.breaker.state == "closed"
        r = aredis.Redis.from_url(url)
        try:
            clients = await r.client_list()
            assert len(clients) <= 8 + 1  # its pool, and this connection
        finally:
            await r.aclose()
    finally:
        await lim.close()


async def test_on_a_redis_cluster_one_upstreams_buckets_share_a_slot_and_hold(another_redis, tmp_path):
    """The script touches several buckets at once: on a cluster they must be in one slot (a hash tag),
    or every decision would be a CROSSSLOT error and the pod would live on its local share."""
    from tests.support.redis import start_cluster

    ports = await start_cluster(another_redis, tmp_path)
    spec = LLMLimitsSpec(requests_per_minute=5, tokens_per_minute=1000, models={"m": {"tokens_per_minute": 500}},
                         shared={"url": f"redis://127.0.0.1:{ports[0]}", "cluster": True, "timeout": "10s"})
    events = _Events()
    lim = SharedLimits("llm", spec, Clock(), events)
    try:
        results = [await lim.acquire("m", 10) for _ in range(6)]
        assert [w == 0 for w, _ in results] == [True] * 5 + [False] and results[-1][1] == "requests_per_minute"
        assert events.local == 0  # every decision was the cluster's
        rc = aredis.RedisCluster.from_url(f"redis://127.0.0.1:{ports[1]}")
        try:
            await rc.initialize()
            slots = {rc.keyslot(k) for k in ("resilience-proxy:{llm:llm}:rpm", "resilience-proxy:{llm:llm}:tpm",
                                              "resilience-proxy:{llm:llm}:models.m.tpm")}
            assert len(slots) == 1
            assert await rc.exists("resilience-proxy:{llm:llm}:models.m.tpm") == 1
        finally:
            await rc.aclose()
    finally:
        await lim.close()
