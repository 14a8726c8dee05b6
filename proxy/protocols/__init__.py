"""Protocols: everything that differs between the upstreams the proxy speaks to, behind one interface.

Data path: listener (the protocol's) → route (track choice) → policy chain (proxy/policy, shared by every
protocol) → terminal (the protocol's) → upstream. "Which protocol is this?" is answered here, once, by
`get(spec.protocol)`; nothing outside this package compares a protocol's name.

What a protocol supplies — a new one (say plain TCP, or gRPC unary) is one module in this package and
one line in `PROTOCOLS`:

- `name`, `schemes`: the `protocol:` value, and the target URL schemes it accepts.
- `defaults`: config values for keys an upstream of this protocol leaves out (merged under what is set).
- `sections`: the upstream sections only this protocol reads (`llm:`, `client_auth:`); `target_keys`
  likewise for a target. Another protocol's section on an upstream is a config error with its path.
- `transport(store, name, spec, target)`: the per-target transport state (a connection pool), from the
  StateStore, so it survives a reload that leaves its key unchanged.
- `build(up, store, clock)`: its part of the upstream runtime, once per config load: route chains folded
  from the shared policies (`proxy/policy/chain.py`), with its own terminal.
- `listener(app, name, spec)`: what serves the local listener: an asyncio protocol factory, and the
  object the drain and the idle sweep work on (or None).
- `reconfigure_listener(server, spec)`: a reload that keeps the address applies new client limits.
- `probe(health)`: one active health check of a target (raises on failure).
- `stand_in(up)`: whether something other than the cache can answer when the upstream is down
  (readiness is fallback-aware).
"""

from __future__ import annotations

from proxy.protocols.base import Listening, Protocol
from proxy.protocols.http import HTTP
from proxy.protocols.openai import OPENAI
from proxy.protocols.redis import REDIS

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (HTTP, OPENAI, REDIS)}


def get(name: str) -> Protocol:
    return PROTOCOLS[name]


def owned_sections() -> dict[str, str]:
    """section → the protocol that owns it (for the config error on any other protocol)."""
    return {s: p.name for p in PROTOCOLS.values() for s in p.sections}


def owned_target_keys() -> dict[str, str]:
    return {k: p.name for p in PROTOCOLS.values() for k in p.target_keys}


__all__ = ["PROTOCOLS", "Listening", "Protocol", "get", "owned_sections", "owned_target_keys"]
