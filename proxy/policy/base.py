"""The fold that turns a list of policies into one handler, once per config load.

The types that travel the chain (request, response, verdict, failure) are in proxy/exchange.py, the
layer every protocol, policy and upstream imports.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from proxy.exchange import Handler, Policy
from proxy.policy.fused import fuse


def build_chain(policies: Sequence[Policy | None], terminal: Handler, fused: bool = True) -> Handler:
    """Fold once at load time; the first policy is the outermost. `None` entries are skipped, so a
    policy that has nothing to do for a config (no retries, no fallback) costs nothing per request.
    The standard HTTP list becomes one coroutine instead (proxy/policy/fused.py); `fused=False` keeps the
    fold (the tests compare the two)."""
    if fused:
        chain = fuse(policies, terminal)
        if chain is not None:
            return chain
    handler = terminal
    for policy in reversed([p for p in policies if p is not None]):
        handler = functools.partial(policy, call_next=handler)
    return handler
