"""Table-driven, like the HTTP chain test: scripted outcomes per attempt of one Redis command through the
command chain (proxy/redis/resilience.py) → the answer, the attempts, the breaker. The driver below is
the listener's decision loop without sockets; time is a ManualClock, so nothing here sleeps."""

from __future__ import annotations

import pytest

from proxy.clock import ManualClock
from proxy.exchange import Reason
from proxy.obs.metrics import METRICS
from proxy.redis import codec, commands
from proxy.redis.replies import Slot
from proxy.redis.resilience import Command
from proxy.runtime import UpstreamRuntime
from proxy.settings.spec import UpstreamSpec
from proxy.upstream.state import StateStore

_n = iter(range(10**6))


def make(retry=None, timeouts=None, breaker=None, limits=None, clock=None):
    clock = clock or ManualClock()
    spec = UpstreamSpec.model_validate({
        "protocol": "redis", "listen": "127.0.0.1:6390", "targets": [{"name": "stable", "url": "redis://r:6379/0"}],
        "retry": {"backoff_base": 0, "backoff_max": 0, **(retry or {})}, "timeouts": timeouts or {},
        "breaker": {"fail_max": 100, **(breaker or {})}, "limits": limits or {}})
    up = UpstreamRuntime(f"rchain{next(_n)}", spec, StateStore(clock, METRICS), clock)
    return up, up.wire.chain, clock


def command(*args: bytes) -> Command:
    name = args[0].upper()
    cls = commands.classify(name)
    return Command(Slot(), name, list(args), codec.encode_command(list(args)), cls,
                   commands.keys_of(name, list(args)) or [], 0, 2, shared=True)


def run(up, chain, clock, cmd, outcomes, took=0.01):
    """What the listener does with one command: → (reply bytes, attempts). An outcome is `ok`, a
    failure kind (`timeout`, `reset`, `connect-failure`, `timeout-collateral`), or `slow` (a timeout
    that took the whole attempt)."""
    chain.start(cmd, clock.monotonic())
    cmd.target = up.targets[0]
    script = list(outcomes)
    while True:
        timeout = chain.timeout(cmd, clock.monotonic())
        if timeout is not None and timeout <= 0:
            return chain.stand_in(cmd, "stable", Reason.TIMEOUT), cmd.attempts
        if not chain.admit(cmd):
            return chain.stand_in(cmd, "stable", Reason.CIRCUIT_BREAKER_OPEN), cmd.attempts
        outcome = script.pop(0) if script else "ok"
        if outcome == "ok":
            clock.advance(took)
            chain.answered(cmd, b"$1\r\nv\r\n", "ok", took)
            return b"$1\r\nv\r\n", cmd.attempts
        kind = "timeout" if outcome == "slow" else outcome
        spent = timeout if outcome == "slow" and timeout is not None else took
        clock.advance(spent)
        delay = chain.failed(cmd, kind, spent, may_retry=True)
        if delay is None:
            return chain.stand_in(cmd, "stable", chain.reason(kind)), cmd.attempts
        clock.advance(delay)


def unavailable(up, reason: str) -> bytes:
    return codec.error(f"UNAVAILABLE redis upstream '{up.name}' is unavailable ({reason})")


CASES = [
    # name, command, outcomes, retry spec, timeouts, expected reply (None: the value), attempts
    ("read answered", (b"GET", b"k"), ["ok"], {}, {}, None, 1),
    ("read retried after a timeout", (b"GET", b"k"), ["timeout", "ok"], {}, {}, None, 2),
    ("read retried after a reset and a connect failure", (b"GET", b"k"), ["reset", "connect-failure", "ok"], {}, {},
     None, 3),
    ("attempts bound the retries", (b"GET", b"k"), ["reset"] * 5, {"attempts": 3}, {}, "upstream_error", 3),
    ("a write is never retried", (b"SET", b"k", b"v"), ["connect-failure", "ok"], {}, {}, "upstream_error", 1),
    ("a blocking command is never retried", (b"BLPOP", b"q", b"0"), ["reset", "ok"], {}, {}, "upstream_error", 1),
    ("retry.on without timeout", (b"GET", b"k"), ["timeout", "ok"], {"on": ["reset"]}, {}, "timeout", 1),
    ("retry.on without reset", (b"GET", b"k"), ["reset", "ok"], {"on": ["timeout"]}, {}, "upstream_error", 1),
    ("retry.on statuses alone retry nothing", (b"GET", b"k"), ["timeout", "ok"], {"on": ["503"]}, {}, "timeout", 1),
    ("the total cuts the last attempt", (b"GET", b"k"), ["slow"] * 10, {"attempts": 10},
     {"attempt": "1s", "total": "2500ms"}, "timeout", 3),
    ("a total already spent sends nothing more", (b"GET", b"k"), ["slow"] * 10, {"attempts": 10},
     {"attempt": "1s", "total": "2s"}, "timeout", 2),
    ("a collateral loss is retried", (b"GET", b"k"), ["timeout-collateral", "ok"], {}, {}, None, 2),
]


@pytest.mark.parametrize("name,args,outcomes,retry,timeouts,expected,attempts", CASES, ids=[c[0] for c in CASES])
def test_command_chain(name, args, outcomes, retry, timeouts, expected, attempts):
    up, chain, clock = make(retry=retry, timeouts=timeouts)
    reply, n = run(up, chain, clock, command(*args), outcomes)
    assert reply == (b"$1\r\nv\r\n" if expected is None else unavailable(up, expected))
    assert n == attempts
    assert up.counters.budget.retries == 0  # every retry gave its budget back


def test_the_breaker_counts_a_shared_connections_failure_once():
    up, chain, clock = make(breaker={"fail_max": 2}, retry={"attempts": 1})
    for kind in ("reset-collateral", "timeout-collateral", "timeout-collateral"):
        run(up, chain, clock, command(b"GET", b"k"), [kind])
    assert up.targets[0].breaker.state == "closed" and up.targets[0].breaker.cb.fail_counter == 0
    for _ in range(2):
        run(up, chain, clock, command(b"GET", b"k"), ["reset"])
    assert up.targets[0].breaker.state == "open"
    reply, attempts = run(up, chain, clock, command(b"GET", b"other"), ["ok"])
    assert (reply, attempts) == (unavailable(up, "circuit_breaker_open"), 0)  # no upstream I/O at all


def test_an_open_breaker_stops_the_retries():
    up, chain, clock = make(breaker={"fail_max": 1}, retry={"attempts": 5})
    reply, attempts = run(up, chain, clock, command(b"GET", b"k"), ["reset"] * 5)
    assert (reply, attempts) == (unavailable(up, "upstream_error"), 1)


def test_the_retry_budget_bounds_retries_in_flight(metrics):
    up, chain, clock = make(retry={"attempts": 3, "budget_ratio": 0, "budget_min": 0})
    reply, attempts = run(up, chain, clock, command(b"GET", b"k"), ["reset", "ok"])
    assert (reply, attempts) == (unavailable(up, "upstream_error"), 1)
    assert metrics.delta("upstream_retry_budget_exhausted_total", name=up.name) == 1


def test_a_failed_read_is_answered_from_the_cache_fresh_then_stale(metrics):
    up, chain, clock = make(retry={"attempts": 1})
    assert run(up, chain, clock, command(b"GET", b"k"), ["ok"])[0] == b"$1\r\nv\r\n"
    assert run(up, chain, clock, command(b"GET", b"k"), ["reset"])[0] == b"$1\r\nv\r\n"
    clock.advance(61)  # past the cache_ttl (1m): still within stale_ttl
    assert run(up, chain, clock, command(b"GET", b"k"), ["timeout"])[0] == b"$1\r\nv\r\n"
    assert metrics.delta("fallback_responses_total", name=up.name, source="cache", reason="upstream_error") == 1
    assert metrics.delta("fallback_responses_total", name=up.name, source="stale", reason="timeout") == 1
    run(up, chain, clock, command(b"SET", b"k", b"w"), ["ok"])  # the write drops the cached read
    assert run(up, chain, clock, command(b"GET", b"k"), ["reset"])[0] == unavailable(up, "upstream_error")


def test_shedding_admits_up_to_max_in_flight_and_counts_what_it_sheds(metrics):
    up, chain, _ = make(limits={"max_in_flight": 2})
    up.counters.in_flight = 1
    assert chain.admits()
    up.counters.in_flight = 2
    assert not chain.admits()
    cmd = command(b"GET", b"cold")
    assert chain.stand_in(cmd, "stable", Reason.OVERLOADED) == unavailable(up, "overloaded")
    assert metrics.delta("upstream_shed_total", name=up.name) == 1
    assert metrics.delta("upstream_requests_total", name=up.name, track="stable", route="default", status="error",
                         outcome="shed") == 1


def test_blocking_commands_and_transactions_have_no_total():
    up, chain, clock = make(timeouts={"total": "1s"})
    for args in ((b"BLPOP", b"q", b"0"), (b"MULTI",)):
        cmd = command(*args)
        chain.start(cmd, clock.monotonic())
        assert cmd.deadline is None
    blpop = command(b"BLPOP", b"q", b"0")
    assert chain.timeout(blpop, clock.monotonic()) is None  # nor an attempt timeout
    get = command(b"GET", b"k")
    chain.start(get, clock.monotonic())
    assert get.deadline == clock.monotonic() + 1


def test_a_command_that_waited_past_its_total_is_answered_without_being_sent():
    up, chain, clock = make(timeouts={"total": "1s"})
    cmd = command(b"GET", b"k")
    chain.start(cmd, clock.monotonic())
    clock.advance(1.5)  # held back (behind another read's retry, say) longer than its total
    assert chain.timeout(cmd, clock.monotonic()) <= 0
    cmd.target = up.targets[0]
    assert chain.stand_in(cmd, "stable", Reason.TIMEOUT) == unavailable(up, "timeout")
    assert cmd.attempts == 0
