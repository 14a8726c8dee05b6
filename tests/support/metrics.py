"""Reading the process-wide Prometheus registry the way a test must: a series that was never exported
is not a zero, and a counter is judged by what this test added to it, not by what earlier tests left."""

from __future__ import annotations

from prometheus_client import REGISTRY


def sample(name: str, /, **labels: str) -> float | None:
    """The sample's value, or None when no such series is exported."""
    return REGISTRY.get_sample_value(name, labels)


def value(name: str, /, **labels: str) -> float:
    """The value of a series that must be exported (a gauge read as 0.0 is then a real 0)."""
    v = sample(name, **labels)
    assert v is not None, f"{name}{labels} is not exported"
    return v


def _snapshot() -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class Baseline:
    """The registry as it was when the test began: `delta` is what happened since."""

    def __init__(self) -> None:
        self.before = _snapshot()

    def delta(self, name: str, /, **labels: str) -> float:
        """How much a series grew since the baseline. The series must be exported now; one that did not
        exist at the baseline started from 0."""
        now = value(name, **labels)
        return now - self.before.get((name, frozenset(labels.items())), 0.0)

    def family_delta(self, name: str, /, **labels: str) -> float:
        """How much every series of a sample name (with these labels, whatever the others) grew together:
        one event counted under any label."""
        want = set(labels.items())

        def total(snapshot) -> float:
            return sum(v for (n, ls), v in snapshot.items() if n == name and want <= ls)

        return total(_snapshot()) - total(self.before)

    value = staticmethod(value)
    sample = staticmethod(sample)

    def added(self, name: str, /, **labels: str) -> float:
        """What this test added to a counter that may never have been exported (nothing happened: 0)."""
        now = sample(name, **labels)
        return (now or 0.0) - self.before.get((name, frozenset(labels.items())), 0.0)
