"""The StateStore: what survives a reload (same key → the same object), what a failed build leaves
behind (nothing), and what a commit closes."""

from __future__ import annotations

from proxy.clock import ManualClock
from proxy.obs.metrics import METRICS
from proxy.settings.spec import UpstreamSpec
from proxy.upstream.state import StateStore

_n = iter(range(10**6))


def spec(**kw) -> UpstreamSpec:
    return UpstreamSpec.model_validate({"listen": "127.0.0.1:9002",
                                        "targets": [{"name": "stable", "url": "http://db:8080"}], **kw})


class Pool:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def test_state_keyed_by_an_unchanged_spec_survives_a_reload():
    store, name = StateStore(ManualClock(), METRICS), f"st{next(_n)}"
    up = spec()
    store.begin()
    b1 = store.breaker(name, up, up.targets[0])
    store.commit()
    store.begin()
    assert store.breaker(name, spec(), spec().targets[0]) is b1  # equal spec: the same breaker
    assert store.breaker(name, spec(breaker={"fail_max": 9}), up.targets[0]) is not b1


def test_an_aborted_build_leaves_nothing_and_a_commit_closes_what_was_dropped():
    store = StateStore(ManualClock(), METRICS)
    store.begin()
    old = store.pool(("a",), Pool)
    assert store.commit() == []
    store.begin()
    staged = store.pool(("b",), Pool)
    store.abort()
    assert ("pool", "b") not in store.live and store.live[("pool", "a")] is old
    store.begin()
    new = store.pool(("b",), Pool)
    assert new is not staged  # the aborted build's object was never made live
    assert store.commit() == [old]  # no longer used: handed back to be closed after the drain


def test_counters_and_their_budget_outlive_a_reload_and_take_the_new_limits():
    store, name = StateStore(ManualClock(), METRICS), f"st{next(_n)}"
    store.begin()
    c = store.counters_for(name, spec())
    store.commit()
    c.in_flight = 7
    store.begin()
    again = store.counters_for(name, spec(retry={"budget_ratio": 0.5, "budget_min": 1}))
    assert again is c and c.in_flight == 7
    assert (c.budget.ratio, c.budget.minimum) == (0.2, 3)  # only at the swap
    store.commit()
    assert (c.budget.ratio, c.budget.minimum) == (0.5, 1) and c.budget.limit == 3
