"""The fused HTTP chain (proxy/policy/fused.py) against the fold of the same policies: which lists fuse,
the same answers, attempts, waits and state for random outcome scripts, and the cancellation paths (an
attempt timeout that fires, a caller that cancels, a cancellation swallowed below)."""

from __future__ import annotations

import asyncio
import random

import pytest
from multidict import CIMultiDict

from proxy.clock import ManualClock
from proxy.exchange import Failure, ProxyRequest, ProxyResponse, Reason
from proxy.obs.metrics import UpstreamMetrics
from proxy.policy.base import build_chain
from proxy.policy.breaker import Breaker, BreakerState
from proxy.policy.classify import Classify
from proxy.policy.fallback import Fallback, FallbackCache
from proxy.policy.fused import FusedChain, fuse
from proxy.policy.retry import Retry, RetryBudget
from proxy.policy.shed import Shed
from proxy.policy.timeout import AttemptTimeout, Deadlines, TotalTimeout
from proxy.settings.spec import BreakerSpec, FallbackSpec, RetrySpec, status_matcher

_n = iter(range(10**6))


class Target:
    def __init__(self, breaker):
        self.name, self.breaker = "stable", breaker


class Events:
    """The metrics the policies report to, recorded in order (the fused chain must report the same)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args):
            self.calls.append((name, *args))
        return record


class Counters:
    def __init__(self, in_flight):
        self.in_flight = in_flight


class Streamed:
    """A streamed answer's body: the breaker and the cache settle when the listener ends it."""


class Script:
    """The terminal: each attempt's outcome from a list. `hang` waits until cancelled (the attempt timeout
    fires); `swallow` eats the cancellation and answers 200; `stream` is a success with a body to come."""

    def __init__(self, outcomes, clock):
        self.outcomes, self.clock = list(outcomes), clock
        self.calls = 0
        self.seen_cancel = 0

    async def __call__(self, req):
        self.calls += 1
        o = self.outcomes.pop(0) if self.outcomes else "ok"
        if o == "slow-ok":
            self.clock.advance(3)
            o = "ok"
        if o == "ok":
            return ProxyResponse(200, CIMultiDict({"Content-Type": "text/plain", "ETag": str(self.calls)}), b"fresh")
        if o == "stream":
            return ProxyResponse(200, CIMultiDict({"Content-Type": "text/plain"}), None, stream=Streamed())
        if o in ("connect", "reset"):
            kind = "connect-failure" if o == "connect" else "reset"
            return ProxyResponse(502, failure=Failure(kind, Reason.UPSTREAM_ERROR, 502, kind, o), body=None,
                                 outcome="rejected")
        if o == "shed":
            f = Failure("overloaded", Reason.OVERLOADED, 503, "overloaded", "pool", retry_after=1.0)
            from proxy.exchange import Verdict
            return ProxyResponse(503, failure=f, verdict=Verdict.REJECTED, outcome="shed", body=None)
        if o in ("hang", "swallow"):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.seen_cancel += 1
                if o == "hang":
                    raise
            return ProxyResponse(200, CIMultiDict(), b"late")
        status, _, retry_after = str(o).partition("/")
        headers = CIMultiDict({"Retry-After": retry_after} if retry_after else {})
        return ProxyResponse(int(status), headers, b"upstream says " + status.encode())


def build(outcomes, fused, rnd_spec, in_flight=0):
    clock = ManualClock()
    name = f"fused{next(_n)}"
    metrics = Events()
    bspec = BreakerSpec(**rnd_spec["breaker"])
    br = BreakerState(name, "stable", bspec, clock)
    rspec = RetrySpec(**{"backoff_base": 0.1, "backoff_max": 2.0, **rnd_spec["retry"]})
    budget = RetryBudget(rspec.budget_ratio, rspec.budget_min)
    fspec = FallbackSpec(**rnd_spec["fallback"])
    cache = FallbackCache(name, fspec, clock)
    script = Script(outcomes, clock)
    policies = [
        Fallback(fspec, cache, clock, metrics),
        Shed(Counters(in_flight), 1000, metrics),
        TotalTimeout(rnd_spec["total"], clock),
        Retry(rspec, budget, clock, metrics, rand=lambda: 0.5) if rspec.attempts > 1 else None,
        Breaker(clock),
        Classify(status_matcher(bspec.failure_statuses)),
        AttemptTimeout(rnd_spec["attempt"], clock, Deadlines()),
    ]
    chain = build_chain(policies, script, fused=fused)
    assert isinstance(chain, FusedChain) is fused
    script.events = metrics
    return chain, script, clock, br, budget, cache


def request(br, method, headers):
    h = CIMultiDict(headers)
    idem = method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") or "Idempotency-Key" in h
    return ProxyRequest(method, "/x", "/x", CIMultiDict(), h, b"", True, "rid", target=Target(br), idempotent=idem)


def observe(resp, script, clock, br, budget, cache):
    """Everything a caller or an operator could see after one request."""
    headers = None if resp.headers is None else sorted((k, v) for k, v in resp.headers.items())
    return (resp.status, resp.body, headers, resp.verdict, resp.outcome, resp.reason, resp.source,
            resp.failure.kind if resp.failure else None, script.calls, tuple(clock.sleeps), br.state,
            br.probes, br.cb.fail_counter, budget.retries, budget.exhausted, len(cache.cache),
            cache.episode, round(resp.elapsed, 6))


OUTCOMES = ["ok", "ok", "ok", 503, 500, 502, 429, "429/1", "503/1", "503/9", "connect", "reset", "hang",
            "shed", "stream", "slow-ok", 404]


def random_spec(rnd):
    return {
        "breaker": rnd.choice([{"fail_max": 2, "reset_timeout": 5}, {"fail_max": 100},
                               {"mode": "ratio", "ratio": {"window": 10, "min_requests": 3, "failure_ratio": 0.5}},
                               {"fail_max": 3, "slow_call": {"duration": 2, "ratio": 0.3}, "half_open_max_calls": 1,
                                "ratio": {"window": 30, "min_requests": 3}}]),
        "retry": rnd.choice([{}, {"attempts": 1}, {"attempts": 4, "budget_min": 1}, {"budget_min": 0},
                             {"on": ["connect-failure", "5xx"], "non_idempotent": True}]),
        "fallback": rnd.choice([{}, {"cache_ttl": 2, "stale_ttl": 20},
                                {"static": {"status": 200, "body": "{}"}}, {"vary": ["Authorization"]},
                                {"cache_entries": 0}]),
        "total": rnd.choice([30, 1.5]),
        "attempt": rnd.choice([10, float("inf"), 0.02]),  # 0.02: hanging attempts time out (real time)
    }


@pytest.mark.parametrize("seed", range(60))
async def test_fused_and_folded_chains_answer_alike(seed):
    rnd = random.Random(seed)
    spec = random_spec(rnd)
    in_flight = rnd.choice([0, 0, 0, 1001])
    hangs = spec["attempt"] == 0.02  # an attempt that hangs needs a timeout that fires
    script_outcomes = [o if o != "hang" or hangs else "reset" for o in (rnd.choice(OUTCOMES) for _ in range(40))]
    requests = [(rnd.choice(["GET", "GET", "POST", "PUT"]),
                 rnd.choice([{}, {}, {"Authorization": "Bearer a"}, {"Cookie": "c=1"}, {"Idempotency-Key": "k"}]),
                 rnd.choice([0, 0, 1, 6]))  # clock advance before the request
                for _ in range(25)]
    seen = []
    for fused in (True, False):
        chain, script, clock, br, budget, cache = build(script_outcomes, fused, spec, in_flight)
        trace = []
        for method, headers, advance in requests:
            clock.advance(advance)
            resp = await chain(request(br, method, headers))
            if resp.stream is not None:
                resp.body_done(resp.verdict, None)  # the listener ends a streamed body
            trace.append(observe(resp, script, clock, br, budget, cache))
            resp.release()
        seen.append((trace, script.events.calls, script.seen_cancel))
    assert seen[0] == seen[1]


def test_only_the_standard_list_of_the_standard_classes_fuses():
    clock = ManualClock()
    metrics = UpstreamMetrics(f"shape{next(_n)}", ["stable"], (1.0,))
    spec = FallbackSpec()
    parts = [Fallback(spec, FallbackCache("s", spec, clock), clock, metrics), Shed(Counters(0), 10, metrics),
             TotalTimeout(30, clock), Retry(RetrySpec(), RetryBudget(0.2, 3), clock, metrics), Breaker(clock),
             Classify(frozenset()), AttemptTimeout(10, clock, Deadlines())]

    async def terminal(req):
        return ProxyResponse(200)

    assert isinstance(fuse(parts, terminal), FusedChain)
    assert isinstance(fuse([*parts[:3], None, *parts[4:]], terminal), FusedChain)  # attempts: 1
    assert fuse(parts[1:], terminal) is None  # no fallback
    assert fuse([parts[0], parts[2], parts[1], *parts[3:]], terminal) is None  # another order

    class MyBreaker(Breaker):
        pass

    assert fuse([*parts[:4], MyBreaker(clock), *parts[5:]], terminal) is None  # a subclass may differ
    assert fuse([*parts[:4], None, *parts[5:]], terminal) is None
    assert not isinstance(build_chain(parts[1:], terminal), FusedChain)


def fused_chain(outcomes, attempt=0.02, retry=None, breaker=None):
    spec = {"breaker": breaker or {"fail_max": 100}, "retry": retry or {"attempts": 1}, "fallback": {},
            "total": 30, "attempt": attempt}
    return build(outcomes, True, spec)


async def test_an_attempt_timeout_fires_inside_the_fused_chain_and_leaves_the_task_clean():
    chain, script, clock, br, budget, _ = fused_chain(["hang", "ok"], retry={"attempts": 2})
    resp = await chain(request(br, "GET", {}))
    assert resp.status == 200 and script.calls == 2 and script.seen_cancel == 1  # timed out, then retried
    assert "attempt timeout" in br.last_failure and budget.retries == 0  # the breaker saw the timeout
    assert asyncio.current_task().cancelling() == 0


async def test_an_expired_attempt_without_retry_is_a_504_timeout():
    chain, script, clock, br, budget, _ = fused_chain(["hang"])
    resp = await chain(request(br, "GET", {}))
    assert (resp.status, resp.failure.kind, resp.reason) == (504, "timeout", Reason.TIMEOUT)
    assert "attempt timeout" in resp.failure.message and br.cb.fail_counter == 1


async def test_a_caller_cancelling_the_fused_chain_frees_the_probe_and_the_budget():
    chain, script, clock, br, budget, _ = fused_chain(["reset", "hang"], attempt=60, retry={"attempts": 3},
                                                      breaker={"fail_max": 100, "half_open_max_calls": 1})
    task = asyncio.ensure_future(chain(request(br, "GET", {})))
    while script.calls < 2:  # the retry is in flight, holding one unit of budget
        await asyncio.sleep(0)
    assert budget.retries == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.retries == 0 and script.seen_cancel == 1

    # a half-open probe cancelled mid-flight gives its slot back
    chain, script, clock, br, budget, _ = fused_chain(["hang", "ok"], attempt=60,
                                                      breaker={"fail_max": 1, "reset_timeout": 5})
    br.trip()
    clock.advance(5)
    task = asyncio.ensure_future(chain(request(br, "GET", {})))
    while script.calls < 1:
        await asyncio.sleep(0)
    assert br.probes == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert br.probes == 0
    assert (await chain(request(br, "GET", {}))).status == 200 and br.state == "closed"


async def test_a_cancellation_swallowed_below_the_fused_chain_leaves_no_count_behind():
    chain, script, clock, br, budget, _ = fused_chain(["swallow"])
    resp = await chain(request(br, "GET", {}))
    assert resp.status == 200 and resp.body == b"late" and script.seen_cancel == 1
    assert asyncio.current_task().cancelling() == 0


async def test_a_caller_cancelling_during_the_backoff_gives_the_budget_back():
    chain, script, clock, br, budget, _ = fused_chain([503, "ok"], retry={"attempts": 3})
    asleep = asyncio.Event()

    async def long_sleep(seconds):
        asleep.set()
        await asyncio.Event().wait()

    clock.sleep = long_sleep
    task = asyncio.ensure_future(chain(request(br, "GET", {})))
    await asleep.wait()
    assert budget.retries == 1 and script.calls == 1  # waiting before the retry, holding its budget
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.retries == 0 and br.probes == 0 and script.calls == 1
