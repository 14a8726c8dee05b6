"""The interface every protocol implements (see proxy/protocols/__init__.py for what each part is for).

A protocol object is stateless and built once at import; what it builds (pools, chains, listeners) is
state of the runtime or of the app, never of the protocol."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any


class Listening:
    """What serves one upstream's local listener: the asyncio protocol factory, and the server object
    the drain and the idle sweep work on (None when the protocol has none)."""

    __slots__ = ("factory", "server")

    def __init__(self, factory: Callable[[], Any], server: Any = None) -> None:
        self.factory, self.server = factory, server


class Protocol(abc.ABC):
    name: str = ""
    schemes: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}
    sections: tuple[str, ...] = ()      # upstream sections only this protocol reads
    target_keys: tuple[str, ...] = ()   # target keys only this protocol reads
    no_shared_cache: str | None = None  # why `fallback.shared` is refused for this protocol (None: it is not)

    @abc.abstractmethod
    def transport(self, store, upstream: str, spec, target) -> Any:
        """The per-target transport state (a pool), from the store: it survives unchanged reloads."""

    @abc.abstractmethod
    def build(self, up, store, clock) -> None:
        """Fill in the protocol's part of the upstream runtime `up` (routes and their chains)."""

    @abc.abstractmethod
    def listener(self, app, name: str, spec) -> Listening:
        """What serves the upstream's local listener (built at each bind)."""

    def reconfigure_listener(self, server, spec) -> None:
        """A reload kept the listener's address: apply what may change live (client timeouts). Most
        protocols have nothing to apply."""
        return None

    def checks(self, health_spec) -> bool:
        """Whether targets get an active check with this health spec."""
        return health_spec.enabled

    @abc.abstractmethod
    async def probe(self, health) -> None:
        """One active check of `health.transport` (raises on failure)."""

    def stand_in(self, up) -> bool:
        """Something other than the cache can answer while the upstream is down (static, degraded)."""
        return False
