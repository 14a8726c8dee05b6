"""Readiness is fallback-aware: a critical dependency makes the pod unready only when it is down and
nothing can stand in for it."""

from __future__ import annotations

from proxy.admin.probes import dependency, fallback_available


class Breaker:
    def __init__(self, state: str) -> None:
        self.state = state
        self.is_open = state == "open"


class Target:
    def __init__(self, name: str, state: str = "closed", weight: int = 100) -> None:
        self.name, self.breaker, self.weight, self.health = name, Breaker(state), weight, None
        self.models = None  # protocol: openai only


class Protocol:
    def __init__(self, stand_in: bool) -> None:
        self._stand_in = stand_in

    def stand_in(self, up) -> bool:
        return self._stand_in


class Spec:
    class health:
        critical = True


class Up:
    def __init__(self, targets, cached: int = 0, stand_in: bool = False) -> None:
        self.targets, self.spec, self.protocol = targets, Spec, Protocol(stand_in)
        self._cached = cached

    def caches(self):
        return [[None] * self._cached]


def test_down_and_critical_without_a_stand_in_is_down():
    d = dependency(Up([Target("stable", "open")]))
    assert (d["status"], d["healthy"], d["fallback_available"]) == ("down", False, False)


def test_a_cache_or_a_protocols_stand_in_keeps_it_degraded():
    assert dependency(Up([Target("stable", "open")], cached=1))["status"] == "degraded"
    assert dependency(Up([Target("stable", "open")], stand_in=True))["status"] == "degraded"
    assert fallback_available(Up([Target("stable")], stand_in=True))


def test_one_track_down_of_two_is_degraded_and_a_zero_weight_track_does_not_count():
    assert dependency(Up([Target("stable"), Target("canary", "open")]))["status"] == "degraded"
    d = dependency(Up([Target("stable", "open"), Target("canary", weight=0)]))
    assert d["status"] == "down"  # the only track taking traffic is down
