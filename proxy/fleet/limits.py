"""Fleet-wide LLM limits (`llm.limits.shared`): the token buckets of `llm.limits` kept in Redis, so that all
sidecars of a workload together respect the provider account's requests and tokens per minute.

Where it sits: the state behind the two LLM limit steps of the chain (proxy/llm/limits.py: LLMLimit at
admission, LLMCharge per attempt), in place of the per-pod `Limits`. Each decision is one server-side
Lua script over all of a request's buckets (the upstream's and its model's), so a check-and-take is
atomic across sidecars and the buckets refill on Redis's own clock (`TIME`), not on each pod's. The keys
of one upstream share a hash tag: on a Redis Cluster they live in one slot, as a multi-key script needs.
A correction after the answer (`usage`) is sent without waiting for it.

Redis unreachable, slow past `timeout` or erroring: the decision falls to this pod's local share of the
limits (each per-minute figure / `expected_replicas`), which is logged when it starts and counted per
decision; a breaker rests Redis for five seconds at a time and lets one decision probe it, so the pod
returns to the shared buckets by itself once Redis heals.
"""

from __future__ import annotations

import asyncio
import math

from proxy.clock import Clock
from proxy.exchange import Verdict
from proxy.fleet.cache import client_for, slots
from proxy.llm.limits import Limits
from proxy.obs import log
from proxy.policy.breaker import BreakerState
from proxy.settings.spec import BreakerSpec

# KEYS: the buckets; ARGV: mode (check | take | give), then per bucket: capacity, refill per second, cost.
# check: the longest wait any bucket asks; take: the same, and when it is 0 every bucket is charged (at
# most its size); give: each bucket gets `cost` back (negative: owed), the debt bounded by one bucket.
# Returns {wait as text (a Lua number would come back truncated to an integer), index of the bucket}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode = ARGV[1]
local worst, index = 0, 0
local levels = {}
for i = 1, #KEYS do
  local cap, rate, cost = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local h = redis.call('HMGET', KEYS[i], 'l', 'a')
  local level, at = tonumber(h[1]), tonumber(h[2])
  if level == nil or at == nil then level, at = cap, now end
  if now > at then level = math.min(cap, level + (now - at) * rate) end
  levels[i] = level
  if mode ~= 'give' then
    local need = math.min(cost, cap)
    if level < need then
      local w = (need - level) / rate
      if w > worst then worst, index = w, i end
    end
  end
end
if mode == 'check' or (mode == 'take' and worst > 0) then
  return {tostring(worst), index}
end
for i = 1, #KEYS do
  local cap, rate, cost = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local level = levels[i]
  if mode == 'take' then level = level - math.min(cost, cap)
  else level = math.max(-cap, math.min(cap, level + cost)) end
  redis.call('HSET', KEYS[i], 'l', tostring(level), 'a', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(2 * cap / rate * 1000) + 60000)
end
return {tostring(worst), index}
"""
_BREAKER = BreakerSpec(fail_max=1, reset_timeout=5.0, half_open_max_calls=1)
_CORRECTIONS = 1000  # corrections in flight at most; past that they are dropped (and counted)


def local_share(spec):
    """The limits one pod keeps while Redis is away: each per-minute figure / expected_replicas."""
    n = spec.expected_replicas

    def part(v):
        return None if v is None else max(1, math.floor(v / n))

    return spec.model_copy(update={
        "requests_per_minute": part(spec.requests_per_minute), "tokens_per_minute": part(spec.tokens_per_minute),
        "models": {m: b.model_copy(update={"requests_per_minute": part(b.requests_per_minute),
                                           "tokens_per_minute": part(b.tokens_per_minute)})
                   for m, b in spec.models.items()}})


class SharedLimits:
    """State per (upstream, llm.limits): survives a reload that leaves them unchanged; a pool to the
    StateStore (closed when a reload drops it). The same questions as `Limits`, asked of Redis."""

    def __init__(self, upstream: str, spec, clock: Clock, events, make_client=client_for) -> None:
        self.upstream, self.spec, self.clock, self.events = upstream, spec, clock, events
        self.local = Limits(local_share(spec), clock)
        self.shared = spec.shared
        self._make_client = make_client
        # made at the config load, not at the first decision: importing redis-py (and the OpenTelemetry it
        # pulls in when installed) takes a few hundred ms, which the first request would otherwise wait
        self._client = self._script = None
        try:
            self._client = make_client(self.shared)
            self._script = self._client.register_script(_SCRIPT)
        except Exception:  # noqa: BLE001 — a client that cannot even be made: tried again at the first decision
            self._client = self._script = None
        self._slots = slots(spec.shared)
        tag = "{" + f"llm:{upstream}" + "}"  # one hash tag: one cluster slot for all of them
        self._prefix = f"{spec.shared.key_prefix}{tag}:"
        self.breaker = BreakerState("llm-limits", upstream, _BREAKER, clock)
        self.on_local = False
        self._corrections: set[asyncio.Task] = set()
        self.closed = False

    busy = 0  # what the app's drain asks of a pool: nothing to wait for

    def _buckets(self, model: object, tokens: int, rpm_cost: int = 1):
        """(key, capacity, refill per second, cost, the limit's name) for each bucket the request draws on."""
        out = []
        scopes = [("", self.spec)]
        m = self.spec.models.get(model) if isinstance(model, str) else None
        if m is not None:
            scopes.append((f"models.{model}.", m))
        for scope, b in scopes:
            if b.requests_per_minute:
                out.append((f"{self._prefix}{scope}rpm", b.requests_per_minute, b.requests_per_minute / 60.0,
                            rpm_cost, f"{scope}requests_per_minute"))
            if b.tokens_per_minute:
                out.append((f"{self._prefix}{scope}tpm", b.tokens_per_minute, b.tokens_per_minute / 60.0,
                            tokens, f"{scope}tokens_per_minute"))
        return out

    async def _run(self, mode: str, buckets) -> tuple[float, int] | None:
        """The script's answer, or None when Redis cannot give one now (the local share decides)."""
        if not buckets:
            return 0.0, 0
        token = self.breaker.admit()
        if token is None:
            return None
        start = self.clock.monotonic()
        try:
            if self._client is None:
                self._client = self._make_client(self.shared)
                self._script = self._client.register_script(_SCRIPT)
            args = [mode]
            for _, cap, rate, cost, _ in buckets:
                args += [cap, repr(rate), cost]
            async with asyncio.timeout(self.shared.timeout), self._slots:
                wait, index = await self._script(keys=[b[0] for b in buckets], args=args)
            result = float(wait), int(index)
        except asyncio.CancelledError:
            self.breaker.cancel(token)
            raise
        except Exception as exc:  # noqa: BLE001 — redis-py's errors, OSError, a timeout: the local share decides
            self.breaker.record(token, Verdict.FAILURE, self.clock.monotonic() - start, type(exc).__name__)
            if not self.on_local:
                self.on_local = True
                log.warning("llm_limits_local", upstream=self.upstream, error=type(exc).__name__,
                            share=f"1/{self.spec.expected_replicas}")
            return None
        self.breaker.record(token, Verdict.SUCCESS, self.clock.monotonic() - start)
        if self.on_local:
            self.on_local = False
            log.info("llm_limits_shared", upstream=self.upstream)
        return result

    async def check(self, model: object, tokens: int) -> tuple[float, str]:
        """(seconds until this request fits, the limit that holds it back), as Limits.check."""
        buckets = self._buckets(model, tokens)
        got = await self._run("check", buckets)
        if got is None:
            self.events.limits_local()
            return await self.local.check(model, tokens)
        wait, index = got
        return wait, (buckets[index - 1][4] if index else "")

    async def acquire(self, model: object, tokens: int) -> tuple[float, str]:
        """Take one request and `tokens` from every bucket when all of them have it (atomically, across
        the fleet); else take nothing and say how long to wait."""
        buckets = self._buckets(model, tokens)
        got = await self._run("take", buckets)
        if got is None:
            self.events.limits_local()
            return await self.local.acquire(model, tokens)
        wait, index = got
        return wait, (buckets[index - 1][4] if index else "")

    def correct(self, model: object, charged: int, used: int) -> None:
        """The answer used `used` of the `charged` estimate: the tokens buckets get the rest back (sent
        without waiting)."""
        if self.on_local:  # charged (most likely) on the local share: corrected there
            self.local.correct(model, charged, used)
            return
        buckets = [(key, cap, rate, min(charged, cap) - used, why)
                   for key, cap, rate, _, why in self._buckets(model, charged, 0) if key.endswith("tpm")]
        if not buckets or self.closed or all(b[3] == 0 for b in buckets):
            return
        if len(self._corrections) >= _CORRECTIONS:
            self.events.limits_local()
            return
        task = asyncio.get_running_loop().create_task(self._run("give", buckets))
        self._corrections.add(task)
        task.add_done_callback(self._corrections.discard)

    async def close(self) -> None:
        self.closed = True
        for t in list(self._corrections):
            t.cancel()
        await asyncio.gather(*self._corrections, return_exceptions=True)
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:  # noqa: BLE001 — closing a client of a Redis that is gone
                pass
