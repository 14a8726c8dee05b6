"""BreakerState on a ManualClock: consecutive and ratio modes, half-open gate, slow calls, forced states."""

from __future__ import annotations

from proxy.clock import ManualClock
from proxy.exchange import Verdict
from proxy.obs.metrics import METRICS
from proxy.policy.breaker import BreakerState
from proxy.settings.spec import BreakerSpec

F, S = Verdict.FAILURE, Verdict.SUCCESS


def make(name="b", **spec):
    clock = ManualClock()
    return BreakerState(name, "stable", BreakerSpec(**spec), clock, METRICS), clock


def run(b, verdict, duration=0.01):
    token = b.admit()
    assert token is not None
    b.record(token, verdict, duration)


def test_consecutive_resets_on_success():
    b, _ = make(fail_max=3)
    for v in (F, F, S, F, F):
        run(b, v)
    assert b.state == "closed"
    run(b, F)
    assert b.state == "open" and not b.admit()


def test_half_open_admits_at_most_max_calls_and_success_threshold(metrics):
    b, clock = make("bh", fail_max=1, reset_timeout=10, half_open_max_calls=2, success_threshold=2)
    run(b, F)
    assert b.admit() is None
    clock.advance(9.9)
    assert b.admit() is None
    clock.advance(0.1)
    t1, t2 = b.admit(), b.admit()
    assert t1 and t2 and b.admit() is None  # two probes in flight, the third is refused
    b.record(t1, S, 0.01)
    assert b.state == "half_open"
    b.record(t2, S, 0.01)
    assert b.state == "closed"
    assert metrics.value("circuit_breaker_state", name="bh", track="stable") == 0
    assert metrics.delta("circuit_breaker_opened_total", name="bh", track="stable") == 1


def test_half_open_failure_reopens_and_restarts_the_timer():
    b, clock = make(fail_max=1, reset_timeout=10)
    run(b, F)
    clock.advance(10)
    run(b, F)
    assert b.state == "open"
    clock.advance(5)
    assert b.admit() is None
    clock.advance(5)
    assert b.admit() is not None


def test_cancelled_probe_frees_its_slot():
    b, clock = make(fail_max=1, reset_timeout=1)
    run(b, F)
    clock.advance(1)
    t = b.admit()
    assert t and b.admit() is None
    b.cancel(t)
    assert b.admit()


def test_calls_admitted_while_closed_never_free_or_decide_a_probe():
    b, clock = make(fail_max=1, reset_timeout=1, half_open_max_calls=1)
    early = b.admit()  # admitted while closed, still in flight
    run(b, F)  # opens
    clock.advance(1)
    probe = b.admit()
    assert probe
    b.cancel(early)
    b.record(early, Verdict.REJECTED, 0.01)
    b.record(early, S, 0.01)
    assert b.admit() is None  # the early call freed nothing: still one probe in flight
    assert b.state == "half_open"  # and it did not decide anything
    b.record(probe, S, 0.01)
    assert b.state == "closed"


def test_a_stale_probe_from_an_earlier_episode_frees_nothing():
    b, clock = make(fail_max=1, reset_timeout=1, half_open_max_calls=1)
    run(b, F)
    clock.advance(1)
    old = b.admit()
    b.force("open")
    b.force("auto")
    run(b, F)
    clock.advance(1)
    new = b.admit()
    assert new and new != old
    b.cancel(old)
    assert b.admit() is None


def test_ratio_mode_ignores_a_steady_low_error_rate_and_trips_on_a_burst():
    b, clock = make(mode="ratio", ratio={"failure_ratio": 0.5, "window": 30, "min_requests": 20})
    for i in range(1000):  # 2% errors at high volume
        run(b, F if i % 50 == 0 else S)
        clock.advance(0.01)
    assert b.state == "closed"
    clock.advance(31)  # the window moves past the quiet traffic
    for _ in range(10):
        run(b, S)
    for _ in range(10):
        run(b, F)
    assert b.state == "open"


def test_ratio_mode_waits_for_min_requests():
    b, _ = make(mode="ratio", ratio={"failure_ratio": 0.5, "window": 30, "min_requests": 20})
    for _ in range(19):
        run(b, F)
    assert b.state == "closed"
    run(b, F)
    assert b.state == "open"


def test_ratio_mode_trips_on_a_steady_rate_when_configured_to():
    b, clock = make(mode="ratio", ratio={"failure_ratio": 0.02, "window": 30, "min_requests": 100})
    for i in range(1000):
        run(b, F if i % 50 == 0 else S)
        clock.advance(0.01)
        if b.state == "open":
            break
    assert b.state == "open" and i < 200  # 2% at a 2% threshold: trips once min_requests are in


def test_slow_calls_count_when_their_ratio_is_reached():
    b, _ = make(slow_call={"duration": 1.0, "ratio": 0.5}, ratio={"min_requests": 4, "window": 30})
    run(b, S, 2.0)
    run(b, S, 0.1)
    run(b, S, 0.1)
    assert b.state == "closed"
    run(b, S, 2.0)  # 2 of 4 slow = 0.5
    assert b.state == "open"


def test_forced_states(metrics):
    b, _ = make("bf", fail_max=1)
    b.force("open")
    assert b.admit() is None and b.state == "forced_open"
    assert metrics.value("circuit_breaker_state", name="bf", track="stable") == 3
    b.force("closed")
    for _ in range(5):
        run(b, F)  # forced closed: failures do not open it
    assert b.state == "forced_closed"
    b.force("auto")
    assert b.state == "closed"
    run(b, F)
    assert b.state == "open"


def test_retryable_and_rejected_do_not_count():
    b, _ = make(fail_max=1)
    run(b, Verdict.RETRYABLE)
    run(b, Verdict.REJECTED)
    assert b.state == "closed"


def test_fast_path_flag_follows_every_change():
    """`clean` lets a closed breaker with nothing on record skip pybreaker; it must never be stale."""
    b, clock = make(fail_max=2, reset_timeout=1)
    assert b.clean and b.admit() == 0
    b.record(0, Verdict.FAILURE, 0.01)
    assert not b.clean  # one failure on record: the next success must reset the count
    b.record(0, Verdict.SUCCESS, 0.01)
    assert b.clean
    b.record(0, Verdict.FAILURE, 0.01)
    b.record(0, Verdict.FAILURE, 0.01)
    assert b.state == "open" and not b.clean and b.admit() is None
    clock.advance(1.1)
    token = b.admit()
    assert token and not b.clean  # half-open probe
    b.record(token, Verdict.SUCCESS, 0.01)
    assert b.state == "closed" and b.clean
    b.force("open")
    assert not b.clean and b.admit() is None
    b.force("auto")
    assert b.clean and b.admit() == 0
