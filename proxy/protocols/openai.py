"""`protocol: openai` — an OpenAI-compatible LLM API (OpenRouter), with SSE streaming.

listener (proxy/listen/openai.py: JSON bodies, X-Proxy-Cache/-Timeout, SSE relay) → route → the shared
chain with the LLM's own fallback (cached completions, a degraded answer) and model failover:
LLMFallback → shed → total timeout → LLMLimit (llm.limits) → ModelFailover → retry → LLMCharge →
breaker (the track's and the model's) → classify → attempt timeout → WholeBody → HttpTerminal. A stream runs a
second chain without total or attempt timeout (answers run for minutes): its attempt ends at the first
data event (FirstEvent), bounded by `first_byte`; the idle timeout guards each read after that; a third
chain continues a stream that broke (proxy/llm/splice.py). Owns the `llm:` section.
"""

from __future__ import annotations

from proxy.listen.openai import OpenAIListener
from proxy.llm.limits import Limits, LLMCharge, LLMLimit
from proxy.llm.policy import FirstEvent, LLMFallback, ModelBreaker, ModelFailover, PrefillMemory, WholeBody
from proxy.policy.base import build_chain
from proxy.policy.retry import Retry
from proxy.policy.timeout import AttemptTimeout
from proxy.protocols.http import HttpProtocol
from proxy.upstream.http import HttpTerminal
from proxy.upstream.state import spec_key


class OpenAIProtocol(HttpProtocol):
    name = "openai"
    sections = ("llm",)
    listener_class = OpenAIListener
    defaults = {
        "health": {"path": "/api/v1/models"},
        "limits": {"max_request_body": 10 * 1024 * 1024},
        "timeouts": {"attempt": 30.0, "total": 60.0, "first_byte": 30.0, "idle": 60.0},
        "fallback": {"methods": ["POST", "GET"], "cache_ttl": 3600.0, "stale_ttl": 86400.0},
        # Completions and embeddings change nothing upstream: a POST may be retried (before the first byte).
        "retry": {"non_idempotent": True},
        "metrics": {"buckets": [0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]},
    }

    def build(self, up, store, clock) -> None:
        llm = up.spec.llm
        labels = (*llm.models, *llm.fallback_models, *llm.context_fallback_models)
        up.metrics.llm_models(labels)
        up.metrics.llm_prices(llm.prices)
        for t in up.targets:
            # a breaker per (track, model): one failing model does not open the door for the others
            t.models = {m: store.model_breaker(up.name, up.spec, t.spec, m) for m in (*dict.fromkeys(labels), "other")}
        super().build(up, store, clock)

    def breaker_policy(self, clock):
        return ModelBreaker(clock)

    def cache_key_fields(self, up) -> tuple[str, ...]:
        return tuple(up.spec.llm.cache_key_fields)

    def fallback_policy(self, up, fallback, cache, clock):
        return LLMFallback(fallback, cache, clock, up.metrics, up.spec.llm.degraded)

    def failover_policy(self, up, clock):
        llm = up.spec.llm
        if not (llm.fallback_models or llm.context_fallback_models):
            return None
        return ModelFailover(llm.fallback_models, clock, llm.context_fallback_models)

    def retry_policy(self, up, retry, clock):
        llm = up.spec.llm
        # a silent model is not waited for three times when another model can answer (failover takes it)
        skip = frozenset({"timeout"}) if llm.failover_on_timeout and llm.fallback_models else frozenset()
        return Retry(retry, up.counters.budget, clock, up.metrics, rate_limit_retry=True, skip=skip)

    def traced_chain(self, up, store, clock, timeouts, retry, fallback, cache):
        return None  # the LLM chains carry the attempt span already (it skips an unsampled request)

    def chains(self, up, store, clock, timeouts, retry, fallback, cache):
        fb, shed, total, failover, retrying, breaker, trace, classify, attempt = self.policies(
            up, store, clock, timeouts, retry, fallback, cache)
        llm = up.spec.llm
        limit = charge = None
        lim = llm.limits
        if lim.requests_per_minute or lim.tokens_per_minute or lim.models:
            if lim.shared is None:
                state = store.keep(("llm-limits", up.name, spec_key(lim)), lambda: Limits(lim, clock))
            else:
                from proxy.fleet.limits import SharedLimits  # redis-py only with shared limits configured

                state = store.pool(("llm-limits-shared", up.name, spec_key(lim)),
                                   lambda: SharedLimits(up.name, lim, clock, up.metrics))
            limit = LLMLimit(state, fb, llm.fallback_models, clock, lim.max_wait, up.metrics)
            charge = LLMCharge(state, fallback.max_body)
        policies = [fb, shed, total, limit, failover, retrying, charge, breaker, trace, classify, attempt]
        terminal = HttpTerminal()
        first_byte = AttemptTimeout(timeouts.first_byte, clock, store.deadlines, "first_byte")
        first_event = FirstEvent(terminal, fallback.max_body)
        stream = build_chain([fb, shed, limit, failover, retrying, charge, breaker, trace, classify, first_byte],
                             first_event)
        cont = None
        if llm.continuation.enabled and llm.continuation.max:
            # asks for the rest of a broken stream: no cache or degraded answer can be spliced in, and no
            # total timeout (a stream has none), no shedding (the app's request was admitted); the same model
            # first, then the fallback models
            prefill = store.keep(("llm-prefill", up.name), PrefillMemory)  # learnt refusals outlive a reload
            cont = build_chain([ModelFailover(llm.fallback_models, clock, (), prefill,
                                                llm.continuation.no_prefill_models),
                                retrying, charge, breaker, trace, classify, first_byte], first_event)
        return build_chain(policies, WholeBody(terminal, fallback.max_body)), stream, cont

    def stand_in(self, up) -> bool:
        return up.spec.llm.degraded.enabled or super().stand_in(up)


OPENAI = OpenAIProtocol()
