"""Table-driven: scripted upstream outcomes per attempt through the chain → expected responses, attempts,
sleeps and breaker states. Every test runs twice: through the fused chain (proxy/policy/fused.py, what the
HTTP listener runs) and through the fold of the policies' own coroutines. Time is a ManualClock: nothing
here sleeps."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.clock import ManualClock
from proxy.exchange import Failure, ProxyRequest, ProxyResponse, Reason, Verdict
from proxy.obs.metrics import UpstreamMetrics
from proxy.policy.base import build_chain
from proxy.policy.breaker import Breaker, BreakerState
from proxy.policy.classify import Classify
from proxy.policy.fallback import Fallback, FallbackCache
from proxy.policy.fused import FusedChain
from proxy.policy.retry import Retry, RetryBudget
from proxy.policy.shed import Shed
from proxy.policy.timeout import AttemptTimeout, Deadlines, TotalTimeout
from proxy.settings.spec import BreakerSpec, FallbackSpec, RetrySpec, status_matcher
from tests.support.wait import eventually


class Target:
    def __init__(self, breaker):
        self.name, self.breaker = "stable", breaker


class Script:
    """The terminal: answers each attempt from a list of outcomes."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self, req):
        self.calls += 1
        o = self.outcomes.pop(0) if self.outcomes else "ok"
        if o == "ok":
            return ProxyResponse(200, CIMultiDict({"Content-Type": "text/plain"}), b"fresh")
        if o in ("connect", "reset"):
            kind = "connect-failure" if o == "connect" else "reset"
            return ProxyResponse(502, failure=Failure(kind, Reason.UPSTREAM_ERROR, 502, kind, o), body=None,
                                 outcome="rejected")
        if o == "timeout":
            return ProxyResponse(504, failure=Failure("timeout", Reason.TIMEOUT, 504, "timeout", "t"), body=None,
                                 outcome="rejected")
        status, _, retry_after = str(o).partition("/")
        headers = CIMultiDict({"Retry-After": retry_after} if retry_after else {})
        return ProxyResponse(int(status), headers, b"upstream says " + status.encode())


_n = iter(range(10**6))
_FUSED = [True]


@pytest.fixture(autouse=True, params=["fused", "folded"])
def chain_kind(request):
    _FUSED[0] = request.param == "fused"
    return request.param


def make_chain(outcomes, clock=None, retry=None, breaker=None, fallback=None, in_flight=0):
    clock = clock or ManualClock()
    name = f"unit{next(_n)}"
    metrics = UpstreamMetrics(name, ["stable"], (1.0,))
    bspec = BreakerSpec(**(breaker or {}))
    br = BreakerState(name, "stable", bspec, clock)
    rspec = RetrySpec(**{"backoff_base": 0.1, "backoff_max": 2.0, **(retry or {})})
    budget = RetryBudget(rspec.budget_ratio, rspec.budget_min)
    fspec = FallbackSpec(**(fallback or {}))
    cache = FallbackCache(name, fspec, clock)

    class Counters:
        pass

    counters = Counters()
    counters.in_flight = in_flight
    script = Script(outcomes)
    chain = build_chain([
        Fallback(fspec, cache, clock, metrics),
        Shed(counters, 1000, metrics),
        TotalTimeout(30, clock),
        Retry(rspec, budget, clock, metrics, rand=lambda: 0.5),
        Breaker(clock),
        Classify(status_matcher(bspec.failure_statuses)),
        AttemptTimeout(10, clock, Deadlines()),
    ], script, fused=_FUSED[0])
    assert isinstance(chain, FusedChain) is _FUSED[0]
    return chain, script, clock, br, budget, cache


def request(br, method="GET", headers=None, path="/x"):
    h = CIMultiDict(headers or {})
    idempotent = method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") or "Idempotency-Key" in h
    return ProxyRequest(method, path, path, CIMultiDict(), h, b"", True, "rid", target=Target(br), idempotent=idempotent)


CASES = [
    # name, outcomes, method, headers, retry spec, expected status, attempts, sleeps
    ("success", ["ok"], "GET", {}, {}, 200, 1, []),
    ("503 then ok", [503, "ok"], "GET", {}, {}, 200, 2, [0.05]),
    ("connect failures exhaust attempts", ["connect"] * 3, "GET", {}, {}, 502, 3, [0.05, 0.1]),
    ("backoff capped by backoff_max", ["reset"] * 4, "GET", {}, {"attempts": 4, "backoff_max": 0.15}, 502, 4, [0.05, 0.075, 0.075]),
    ("timeouts retried", ["timeout", "ok"], "GET", {}, {}, 200, 2, [0.05]),
    ("500 not listed in on", [500, "ok"], "GET", {}, {}, 500, 1, []),
    ("POST 503 not retried", [503, "ok"], "POST", {}, {}, 503, 1, []),
    ("POST connect failure is retried (nothing was sent)", ["connect", "ok"], "POST", {}, {}, 200, 2, [0.05]),
    ("POST with Idempotency-Key retried", [503, "ok"], "POST", {"Idempotency-Key": "k1"}, {}, 200, 2, [0.05]),
    ("POST 429 with short Retry-After retried (not acted on)", ["429/1", "ok"], "POST", {}, {}, 200, 2, [1.0]),
    ("429 with short Retry-After waited for", ["429/1", "ok"], "GET", {}, {}, 200, 2, [1.0]),
    ("429 with long Retry-After passed back", ["429/5", "ok"], "GET", {}, {}, 429, 1, []),
    ("429 without Retry-After passed back", [429, "ok"], "GET", {}, {}, 429, 1, []),
    ("503 Retry-After too long", ["503/10", "ok"], "GET", {}, {}, 503, 1, []),
    ("503 Retry-After short replaces backoff", ["503/2", "ok"], "GET", {}, {}, 200, 2, [2.0]),
    ("attempts: 1 never retries", [503, "ok"], "GET", {}, {"attempts": 1}, 503, 1, []),
    ("budget_min 0 and nothing in flight: no retry", [503, "ok"], "GET", {}, {"budget_min": 0}, 503, 1, []),
]


@pytest.mark.parametrize("name,outcomes,method,headers,retry,status,attempts,sleeps", CASES, ids=[c[0] for c in CASES])
async def test_chain_table(name, outcomes, method, headers, retry, status, attempts, sleeps):
    chain, script, clock, br, budget, _ = make_chain(outcomes, retry=retry, breaker={"fail_max": 100})
    resp = await chain(request(br, method, headers))
    assert resp.status == status
    assert script.calls == attempts
    assert clock.sleeps == pytest.approx(sleeps)
    assert budget.retries == 0  # every retry gave its budget back


async def test_retry_stops_when_wait_would_pass_the_total_deadline():
    chain, script, clock, br, *_ = make_chain(["503/2", "ok"], breaker={"fail_max": 100})
    assert (await chain(request(br))).status == 200  # a 2 s wait fits in the 30 s total
    chain, script, clock, br, *_ = make_chain(["503/2", "ok"], breaker={"fail_max": 100})
    req = request(br)
    req.timeout = 1.5  # a total of 1.5 s: the 2 s Retry-After does not fit
    resp = await chain(req)
    assert resp.status == 503 and script.calls == 1 and clock.sleeps == []


async def test_budget_exhausted_counts():
    chain, script, clock, br, budget, _ = make_chain([503] * 3, retry={"budget_min": 0}, breaker={"fail_max": 100})
    await chain(request(br))
    assert budget.exhausted == 1 and script.calls == 1


async def test_breaker_opens_after_fail_max_and_sends_nothing():
    chain, script, clock, br, *_ = make_chain([500] * 10, retry={"attempts": 1}, breaker={"fail_max": 3, "reset_timeout": 30})
    for _ in range(3):
        assert (await chain(request(br))).status == 500
    assert br.state == "open"
    resp = await chain(request(br))
    assert resp.status == 503 and resp.reason is Reason.CIRCUIT_BREAKER_OPEN
    assert resp.failure.retry_after == pytest.approx(30)
    assert script.calls == 3
    clock.advance(30)
    assert br.state == "half_open"
    script.outcomes = ["ok"]
    assert (await chain(request(br))).status == 200
    assert br.state == "closed" and script.calls == 4


async def test_no_retry_into_an_open_breaker():
    chain, script, clock, br, *_ = make_chain([503] * 10, retry={"attempts": 5}, breaker={"fail_max": 2})
    resp = await chain(request(br))
    assert script.calls == 2  # the second failure opened the breaker; retry stopped there
    assert resp.status == 503 and br.state == "open"


async def test_429_does_not_count_against_the_breaker():
    chain, script, clock, br, *_ = make_chain([429] * 10, retry={"attempts": 1}, breaker={"fail_max": 2})
    for _ in range(5):
        assert (await chain(request(br))).status == 429
    assert br.state == "closed"


async def test_fallback_order_cache_stale_static_error():
    spec = {"cache_ttl": 10, "stale_ttl": 100}
    chain, script, clock, br, budget, cache = make_chain(["ok"], retry={"attempts": 1}, breaker={"fail_max": 100},
                                                         fallback=spec)
    assert (await chain(request(br))).body == b"fresh"
    script.outcomes = [503] * 10
    resp = await chain(request(br))
    assert (resp.status, resp.body, resp.headers["X-Fallback"], resp.headers["X-Fallback-Reason"]) == (
        200, b"fresh", "cache", "upstream_5xx")
    clock.advance(11)
    resp = await chain(request(br))
    assert resp.headers["X-Fallback"] == "stale" and int(resp.headers["Age"]) == 11
    clock.advance(100)
    resp = await chain(request(br))
    assert resp.status == 503 and resp.verdict is Verdict.FAILURE  # nothing left: the error
    static = {**spec, "static": {"status": 200, "body": '{"degraded": true}'}}
    chain, script, clock, br, *_ = make_chain([503], retry={"attempts": 1}, breaker={"fail_max": 100}, fallback=static)
    resp = await chain(request(br))
    assert resp.headers["X-Fallback"] == "static" and resp.body == b'{"degraded": true}'


async def test_fallback_never_serves_instead_of_calling():
    chain, script, clock, br, *_ = make_chain(["ok", "ok"], retry={"attempts": 1})
    await chain(request(br))
    resp = await chain(request(br))
    assert script.calls == 2 and "X-Fallback" not in resp.headers


async def test_private_requests_neither_stored_nor_served():
    chain, script, clock, br, *_ = make_chain(["ok", 503, "ok", 503], retry={"attempts": 1}, breaker={"fail_max": 100})
    await chain(request(br, headers={"Authorization": "Bearer user-a"}))
    resp = await chain(request(br))
    assert resp.status == 503  # nothing stored from the private request
    await chain(request(br))  # a public answer is stored now
    resp = await chain(request(br, headers={"Cookie": "s=1"}))
    assert resp.status == 503 and script.calls == 4  # ... but never served to a request with a Cookie
    script.outcomes = [503]
    assert (await chain(request(br))).headers["X-Fallback"] == "cache"  # the public request still gets it


async def test_vary_puts_authorization_in_the_key():
    chain, script, clock, br, *_ = make_chain(["ok", 503, 503], retry={"attempts": 1}, breaker={"fail_max": 100},
                                              fallback={"vary": ["Authorization"]})
    await chain(request(br, headers={"Authorization": "Bearer a"}))
    assert (await chain(request(br, headers={"Authorization": "Bearer a"}))).headers["X-Fallback"] == "cache"
    assert (await chain(request(br, headers={"Authorization": "Bearer b"}))).status == 503


async def test_shed_when_over_max_in_flight():
    chain, script, clock, br, *_ = make_chain(["ok"], in_flight=1001)
    resp = await chain(request(br))
    assert resp.status == 503 and resp.outcome == "shed" and resp.reason is Reason.OVERLOADED
    assert script.calls == 0


def test_retry_after_forms():
    from proxy.policy.retry import parse_ratelimit_reset, parse_retry_after

    assert parse_retry_after("7") == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now_wall=1445412480.0) == 10
    assert parse_retry_after("soon") is None and parse_retry_after("") is None
    assert parse_ratelimit_reset("1700000005000", now_wall=1700000000.0) == 5  # epoch ms (OpenRouter)
    assert parse_ratelimit_reset("1700000003", now_wall=1700000000.0) == 3    # epoch s
    assert parse_ratelimit_reset("2") == 2                                       # seconds


def test_cache_bounded_by_bytes_and_entries():
    from proxy.policy.fallback import FallbackCache

    clock = ManualClock()
    cache = FallbackCache("bounded", FallbackSpec(cache_entries=3, cache_bytes=1000), clock)
    for i in range(5):
        cache.store(bytes([i]), 200, CIMultiDict(), b"x" * 100)
    assert len(cache) == 3 and cache.get(bytes([0])) is None and cache.get(bytes([4])) is not None
    cache.store(b"big", 200, CIMultiDict(), b"y" * 600)
    assert cache.bytes <= 1000 and cache.get(b"big") is not None
    cache.store(b"huge", 200, CIMultiDict(), b"z" * 5000)  # larger than the whole cache: not stored
    assert cache.get(b"huge") is None and cache.get(b"big") is not None
    clock.advance(3601)
    assert len(cache) == 0  # past stale_ttl


def test_pick_follows_weights_and_avoids_open_tracks():
    from proxy.runtime import UpstreamRuntime
    from proxy.settings.spec import UpstreamSpec
    from proxy.upstream.state import StateStore

    spec = UpstreamSpec(listen="127.0.0.1:1", targets=[{"name": "stable", "url": "http://a", "weight": 80},
                                                      {"name": "canary", "url": "http://b", "weight": 20}])
    store = StateStore(ManualClock(), None)
    store.begin()
    up = UpstreamRuntime(f"pick{next(_n)}", spec, store, ManualClock())
    draws = [i / 1000 for i in range(1000)]
    picks = [up.pick(rand=lambda d=d: d).name for d in draws]
    assert picks.count("canary") == 200 and picks.count("stable") == 800
    up.by_name["canary"].breaker.force("open")
    assert {up.pick(rand=lambda d=d: d).name for d in draws} == {"stable"}
    up.by_name["stable"].breaker.force("open")  # both open: the choice stands (the breaker answers)
    assert up.pick(rand=lambda: 0.95).name == "canary"


async def test_pool_retires_connections_after_max_lifetime():
    from proxy.settings.spec import LimitsSpec, PoolSpec, TargetSpec, TimeoutsSpec
    from proxy.upstream.pool import HttpPool

    clock = ManualClock()
    pool = HttpPool(TargetSpec(name="t", url="http://127.0.0.1:1"), PoolSpec(max_lifetime=60), TimeoutsSpec(),
                    LimitsSpec(), clock)
    g1 = pool.session()
    clock.advance(30)
    assert pool.session() is g1
    pool.done(g1)
    clock.advance(31)
    g2 = pool.session()
    assert g2 is not g1 and g1.retired and not g1.session.closed  # still one user on the old one
    pool.done(g1)
    await eventually(lambda: g1.session.closed, what="closed once its last response was released")
    pool.done(g2)
    await pool.close()


def test_repeated_identical_answers_keep_the_full_stale_window():
    """A hot key stores the same answer many times a second; only its freshness is refreshed then, but
    the entry must still outlive the last answer by stale_ttl (give or take the one-second re-insert)."""
    clock = ManualClock()
    cache = FallbackCache("hot", FallbackSpec(cache_ttl=10, stale_ttl=100), clock)
    for _ in range(490):  # every 0.1 s for 49 s
        cache.store(b"k", 200, CIMultiDict({"ETag": "1"}), b"same")
        clock.advance(0.1)
    last = clock.now - 0.1
    clock.advance(100 - 1.5)  # just inside stale_ttl of the last answer, minus the re-insert slack
    e = cache.get(b"k")
    assert e is not None and e.body == b"same"
    assert abs(e.stored_at - last) < 1e-6  # Age is measured from the latest answer
    # a different answer is stored at once, not folded into the old entry
    cache.store(b"k", 200, CIMultiDict({"ETag": "2"}), b"new")
    assert cache.get(b"k").body == b"new"


def test_retry_budget_follows_the_counters_in_flight():
    """One count of requests in flight per upstream: the budget reads it (the Redis listener keeps only
    that one; a second count beside it had stayed 0 there, pinning Redis retries at budget_min)."""
    from proxy.upstream.state import Counters

    c = Counters(RetryBudget(0.5, 1))
    assert c.budget.limit == 1
    c.in_flight = 10
    assert c.budget.limit == 5
    assert all(c.budget.try_acquire() for _ in range(5)) and not c.budget.try_acquire()


def test_an_entry_in_use_is_evicted_after_idle_ones():
    """A full cache during an outage: the entries answering failed requests stay, idle ones go first."""
    clock = ManualClock()
    cache = FallbackCache("lru", FallbackSpec(cache_entries=2), clock)
    cache.store("a", 200, CIMultiDict(), b"a")
    cache.store("b", 200, CIMultiDict(), b"b")
    clock.advance(1)
    assert cache.get("a").body == b"a"  # served: now the most recently used
    cache.store("c", 200, CIMultiDict(), b"c")
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
