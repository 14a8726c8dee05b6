"""The metrics module turns events into samples: a policy reports, the registry changes here only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from proxy.obs.metrics import Metrics, PerSeriesHistogram, UpstreamMetrics


def test_events_become_samples():
    reg = CollectorRegistry()
    m = Metrics(reg)
    um = UpstreamMetrics("db", ["stable"], (0.1, 1.0), m)
    um.shed()
    um.budget_exhausted()
    um.retry("timeout")
    um.retry("timeout")
    um.fallback("stale", "overloaded")
    b = m.breaker_events("db", "stable")
    b.opened()
    b.changed("half_open")
    m.canary_aborted("db", "canary", "error_rate")
    m.track_weight("db", "canary", 0)
    get = reg.get_sample_value
    assert get("upstream_shed_total", {"name": "db"}) == 1
    assert get("upstream_retry_budget_exhausted_total", {"name": "db"}) == 1
    assert get("upstream_retries_total", {"name": "db", "reason": "timeout"}) == 2
    assert get("fallback_responses_total", {"name": "db", "source": "stale", "reason": "overloaded"}) == 1
    assert get("circuit_breaker_opened_total", {"name": "db", "track": "stable"}) == 1
    assert get("circuit_breaker_state", {"name": "db", "track": "stable"}) == 2
    assert get("canary_aborts_total", {"name": "db", "track": "canary", "reason": "error_rate"}) == 1
    assert get("canary_weight", {"name": "db", "track": "canary"}) == 0


def test_a_histogram_with_new_buckets_goes_live_only_when_installed():
    reg = CollectorRegistry()
    h = PerSeriesHistogram("d_seconds", "d", ("name",), reg)
    live = h.labels("db", buckets=(1.0,))
    live.observe(0.5)
    staged = h.labels("db", buckets=(0.1, 1.0))  # a reload's build, not yet swapped in
    staged.observe(0.05)
    assert reg.get_sample_value("d_seconds_bucket", {"name": "db", "le": "1.0"}) == 1
    assert reg.get_sample_value("d_seconds_bucket", {"name": "db", "le": "0.1"}) is None
    h.install(("db",), staged)
    assert reg.get_sample_value("d_seconds_bucket", {"name": "db", "le": "0.1"}) == 1
