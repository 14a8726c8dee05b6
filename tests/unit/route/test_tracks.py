"""Track choice: weighted split within statistical bounds, monotonic stickiness, the override header."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.clock import ManualClock
from proxy.obs.metrics import METRICS
from proxy.policy.breaker import BreakerState
from proxy.route.rollback import CanaryState, Window
from proxy.route.tracks import BadOverride, TrackChooser
from proxy.settings.spec import BreakerSpec, CanarySpec, RollbackSpec


class T:
    def __init__(self, name):
        self.name = name
        self.breaker = BreakerState("u", name, BreakerSpec(), ManualClock())


def chooser(stable, canary, spec=None):
    ts = [T("stable"), T("canary")]
    return TrackChooser(ts, {"stable": stable, "canary": canary}, spec or CanarySpec()), ts


def test_twenty_thousand_at_five_percent_within_bounds():
    c, _ = chooser(95, 5)
    n = sum(c.choose(CIMultiDict())[0].name == "canary" for _ in range(20_000))
    assert 0.044 * 20_000 <= n <= 0.056 * 20_000, n


@pytest.mark.parametrize("canary,expected", [(0, 0), (100, 20_000)])
def test_zero_sends_none_hundred_sends_all(canary, expected):
    c, _ = chooser(100 - canary, canary)
    assert sum(c.choose(CIMultiDict())[0].name == "canary" for _ in range(20_000)) == expected


def test_stickiness_is_monotonic_as_the_weight_grows():
    keys = [f"user-{i}" for i in range(1000)]
    sets = {}
    for w in (5, 20, 50):
        c, _ = chooser(100 - w, w)
        picks = {k: c.choose(CIMultiDict({"X-User-Id": k}))[0].name for k in keys}
        again = {k: c.choose(CIMultiDict({"X-User-Id": k}))[0].name for k in keys}
        assert picks == again  # a key keeps its track
        sets[w] = {k for k, t in picks.items() if t == "canary"}
    assert sets[5] and sets[5] <= sets[20] <= sets[50]
    assert 20 <= len(sets[5]) <= 80 and 400 <= len(sets[50]) <= 600


def test_sticky_cookie():
    spec = CanarySpec(sticky_header=None, sticky_cookie="uid")
    c, _ = chooser(50, 50, spec)
    a = {c.choose(CIMultiDict({"Cookie": "uid=abc; other=1"}))[0].name for _ in range(50)}
    assert len(a) == 1


def test_override_header():
    c, ts = chooser(100, 0)
    assert c.choose(CIMultiDict({"X-Canary": "always"})) == (ts[1], True)
    assert c.choose(CIMultiDict({"X-Canary": "never"})) == (ts[0], True)
    assert c.choose(CIMultiDict({"X-Canary": "canary"})) == (ts[1], True)
    with pytest.raises(BadOverride, match="always, never or a track name"):
        c.choose(CIMultiDict({"X-Canary": "maybe"}))


def test_open_breaker_hands_over_unless_forced():
    c, ts = chooser(50, 50)
    ts[1].breaker.force("open")
    assert {c.choose(CIMultiDict())[0].name for _ in range(200)} == {"stable"}
    assert c.choose(CIMultiDict({"X-Canary": "always"}))[0] is ts[1]


def test_rollback_on_error_rate_only_after_min_requests(metrics):
    clock = ManualClock()
    s = CanaryState("tracks-err", "canary", RollbackSpec(min_requests=100), clock, METRICS, (5, "http://c"))
    for _i in range(99):
        assert not s.record(True, 0.01)
        clock.advance(0.3)
    assert s.aborted is None  # 99 requests: below min_requests, even if all failed
    assert s.record(True, 0.01)
    assert s.aborted == "error_rate"
    assert metrics.delta("canary_aborts_total", name="tracks-err", track="canary", reason="error_rate") == 1


def test_rollback_on_p99_and_config_change_clears_it(metrics):
    clock = ManualClock()
    s = CanaryState("tracks-p99", "canary", RollbackSpec(min_requests=10, max_p99=1.0), clock, METRICS, (5, "http://c"))
    for _ in range(9):
        s.record(False, 0.05)
        clock.advance(0.3)
    for _ in range(3):
        s.record(False, 3.0)
        clock.advance(0.3)
    assert s.aborted == "latency_p99"
    assert metrics.delta("canary_aborts_total", name="tracks-p99", track="canary", reason="latency_p99") == 1
    s.reconfigure(RollbackSpec(min_requests=10, max_p99=1.0), (5, "http://c"))
    assert s.aborted == "latency_p99"  # an unrelated reload keeps it
    s.reconfigure(RollbackSpec(min_requests=10, max_p99=1.0), (10, "http://c"))
    assert s.aborted is None  # the weight changed: a new canary


def test_window_forgets_old_seconds():
    w = Window(10)
    for i in range(5):
        w.add(100 + i, True, 0.1)
    assert w.stats(104.5)[0] == 5
    assert w.stats(120)[0] == 0
