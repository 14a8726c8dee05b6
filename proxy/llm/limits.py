"""Token-aware limits for `protocol: openai` (`llm.limits`): the provider account's requests and tokens
per minute, kept by the proxy so the app hears "wait" from its sidecar rather than from the provider.

Two steps in the chain: LLMLimit decides at admission, under the total timeout and over model
failover; LLMCharge charges each attempt (a retry, a fallback model, a continuation is a request to
the provider too), over the breaker:
LLMFallback → shed → total timeout → LLMLimit → ModelFailover → retry → LLMCharge → breaker → …
An attempt is charged from an estimate of its tokens (the prompt's characters / 4, plus `max_tokens`
when set: what providers reserve) — never more than a bucket holds — and the charge is corrected from
the answer's `usage`; an attempt that gets no answer gives its tokens back (its request stays counted).
Buckets per upstream and, where configured, per model. Over a limit, in this order: a fresh cached
answer; else a fallback model with budget left; else a wait of up to `max_wait` (within the total);
else a local 429 with `Retry-After` — no upstream call. (The outer fallback may still serve a stale
entry for that 429, as for any rate limit.) An attempt over its model's limit is refused locally the
same way, and model failover moves on.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from proxy.exchange import Failure, Handler, ProxyRequest, ProxyResponse, Reason, Verdict


class Bucket:
    """`per_minute` units, refilled continuously; starts full. A charge may take it below zero (a
    correction after the answer): the debt is paid by the refill before anything else is admitted."""

    __slots__ = ("capacity", "rate", "level", "at")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level, self.at = float(per_minute), now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def wait(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits (a cost above the capacity waits for a full bucket)."""
        self._refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float, now: float) -> float:
        """Charge `cost`, at most a full bucket (one request never owes more than a minute) → the charge."""
        self._refill(now)
        cost = min(cost, self.capacity)
        self.level -= cost
        return cost

    def give(self, n: float, now: float) -> None:
        """A correction: `n` back (or, negative, owed), the debt bounded by one bucket. The refill up to
        now comes first, so a debt is not swallowed by a refill capped at the bucket's size."""
        self._refill(now)
        self.level = max(-self.capacity, min(self.capacity, self.level + n))


class Limits:
    """State: one upstream's buckets in this pod. Survives a reload while `llm.limits` is unchanged. With
    `llm.limits.shared` the buckets are the fleet's, in Redis (proxy/fleet/limits.py: same questions)."""

    __slots__ = ("clock", "upstream", "models")

    def __init__(self, spec, clock) -> None:
        self.clock = clock
        now = clock.monotonic()
        self.upstream = _pair(spec, now)
        self.models = {m: _pair(b, now) for m, b in spec.models.items()}

    def _buckets(self, model: object):
        yield self.upstream
        pair = self.models.get(model) if isinstance(model, str) else None
        if pair is not None:
            yield pair

    def wait(self, model: object, tokens: int) -> tuple[float, str]:
        """(seconds until this request fits, the limit that holds it back)."""
        now = self.clock.monotonic()
        worst, why = 0.0, ""
        for scope, (rpm, tpm) in zip(("", f"models.{model}."), self._buckets(model), strict=False):
            if rpm is not None and (w := rpm.wait(1, now)) > worst:
                worst, why = w, f"{scope}requests_per_minute"
            if tpm is not None and (w := tpm.wait(tokens, now)) > worst:
                worst, why = w, f"{scope}tokens_per_minute"
        return worst, why

    async def check(self, model: object, tokens: int) -> tuple[float, str]:
        """`wait`, as the policies ask it of any limits (the fleet's, in Redis, answer over the network)."""
        return self.wait(model, tokens)

    async def acquire(self, model: object, tokens: int) -> tuple[float, str]:
        """Take one request and `tokens` when every bucket has them; else take nothing → (wait, limit)."""
        wait, why = self.wait(model, tokens)
        if wait <= 0:
            self.take(model, tokens)
        return wait, why

    def take(self, model: object, tokens: int) -> None:
        now = self.clock.monotonic()
        for rpm, tpm in self._buckets(model):
            if rpm is not None:
                rpm.take(1, now)
            if tpm is not None:
                tpm.take(tokens, now)

    def correct(self, model: object, charged: int, used: int) -> None:
        """The answer used `used` tokens of the `charged` estimate (each bucket charged at most its size)."""
        now = self.clock.monotonic()
        for _, tpm in self._buckets(model):
            if tpm is not None:
                tpm.give(min(charged, tpm.capacity) - used, now)


def _pair(spec, now: float) -> tuple[Bucket | None, Bucket | None]:
    return (Bucket(spec.requests_per_minute, now) if spec.requests_per_minute else None,
            Bucket(spec.tokens_per_minute, now) if spec.tokens_per_minute else None)


def estimate_tokens(doc: dict[str, Any]) -> int:
    """A provider-neutral estimate: ~4 characters a token over the prompt's text, 4 per message for its
    framing, plus the completion's reservation (`max_tokens`)."""
    chars, n = 0, 0
    messages = doc.get("messages")
    for m in messages if isinstance(messages, list) else ():
        n += 1
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            chars += len(c)
        elif isinstance(c, list):
            chars += sum(len(p.get("text", "")) for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    for k in ("prompt", "input"):
        v = doc.get(k)
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, list):
            chars += sum(len(x) for x in v if isinstance(x, str))
    return math.ceil(chars / 4) + 4 * n + reservation(doc)


def _estimate(call) -> int:
    """Once per request body: the admission step and every attempt's charge read the same figure (a
    fallback model changes only `model`, which the estimate does not read)."""
    if call.estimate is None:
        call.estimate = estimate_tokens(call.doc)
    return call.estimate


def reservation(doc: dict[str, Any]) -> int:
    """The completion tokens a request reserves (`max_completion_tokens`, else `max_tokens`)."""
    v = doc.get("max_completion_tokens", doc.get("max_tokens"))
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


class LLMLimit:
    __slots__ = ("limits", "fallback", "models", "clock", "max_wait", "metrics")

    def __init__(self, limits: Limits, fallback, models: tuple[str, ...], clock, max_wait: float, metrics) -> None:
        self.limits, self.fallback, self.models = limits, fallback, models
        self.clock, self.max_wait, self.metrics = clock, max_wait, metrics

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        call = req.llm
        if call is None or call.doc is None:
            return await call_next(req)
        doc = call.doc
        tokens = _estimate(call)
        model = doc.get("model")
        while True:
            wait, why = await self.limits.check(model, tokens)
            if wait <= 0:
                break
            # 1. a fresh cached answer costs the provider nothing
            served = self._fresh(req)
            if served is not None:
                self.metrics.limited("cache")
                return served
            # 2. a fallback model whose own budget is left (the upstream's must be, too)
            other = None
            for m in self.models:
                if m != model and (await self.limits.check(m, tokens))[0] <= 0:
                    other = m
                    break
            if other is not None:
                model = other
                call.doc = doc = {**doc, "model": other}
                req.body = json.dumps(doc, separators=(",", ":")).encode()
                req.headers["Content-Length"] = str(len(req.body))
                call.model_fallback = other
                self.metrics.limited("fallback_model")
                break
            # 3. a short wait, within max_wait and the total
            now = self.clock.monotonic()
            if wait <= self.max_wait and (req.deadline is None or now + wait < req.deadline):
                self.metrics.limited("waited")
                await self.clock.sleep(wait)
                continue
            # 4. the app hears it from its sidecar, not the provider's account
            self.metrics.limited("rejected")
            return _local_429(why, wait)
        return await call_next(req)

    def _fresh(self, req: ProxyRequest) -> ProxyResponse | None:
        fb = self.fallback
        key = fb._key(req)
        entry = fb.cache.get(key) if key is not None else None
        if entry is None or fb.source(entry.stored_at) != "cache":
            return None
        return fb.serve(key, Reason.RATE_LIMITED, req)



def _local_429(why: str, wait: float) -> ProxyResponse:
    f = Failure("local_rate_limit", Reason.RATE_LIMITED, 429, "rate_limited",
                f"llm.limits.{why} reached: retry in {math.ceil(wait)} s", retry_after=wait)
    return ProxyResponse(429, failure=f, verdict=Verdict.REJECTED, outcome="rejected", body=None)


class LLMCharge:
    """Per attempt: charge the model it asks (refused locally when over its limit: failover moves on),
    then correct from the answer."""

    __slots__ = ("limits", "max_body")

    def __init__(self, limits: Limits, max_body: int) -> None:
        self.limits, self.max_body = limits, max_body

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        call = req.llm
        if call is None or call.doc is None:
            return await call_next(req)
        model = call.asked
        tokens = _estimate(call)
        wait, why = await self.limits.acquire(model, tokens)
        if wait > 0:
            return _local_429(why, wait)
        try:
            resp = await call_next(req)
        except BaseException:
            self.limits.correct(model, tokens, 0)  # cancelled (the total ran out, the app left): unspent
            raise
        if resp.verdict is not Verdict.SUCCESS or resp.status != 200:
            self.limits.correct(model, tokens, 0)  # no answer: the tokens were not spent
        elif resp.body is not None and resp.stream is None:
            self._correct(model, tokens, reservation(call.doc), resp.body)
        else:
            resp.after_body(functools.partial(self._settled, model, tokens, reservation(call.doc)), self.max_body)
        return resp

    def _settled(self, model, tokens: int, reserve: int, verdict, body: bytes | None) -> None:
        if verdict is Verdict.SUCCESS and body is not None:
            self._correct(model, tokens, reserve, body)
        elif verdict is not Verdict.SUCCESS:
            # broken or abandoned: billed for what it sent, not for the rest of its reservation (the
            # continuation that follows is charged on its own)
            self.limits.correct(model, tokens, tokens - reserve)

    def _correct(self, model, tokens: int, reserve: int, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        usage = doc.get("usage") if isinstance(doc, dict) else None
        used = usage.get("total_tokens") if isinstance(usage, dict) else None
        if not (isinstance(used, int) and not isinstance(used, bool) and used >= 0):
            # no usage (a stream without stream_options.include_usage): the prompt's estimate and the
            # answer's own text at ~4 characters a token, in place of the reservation
            used = tokens - reserve + _text_tokens(doc)
        self.limits.correct(model, tokens, used)


def _text_tokens(doc: object) -> int:
    chars = 0
    for ch in (doc.get("choices") if isinstance(doc, dict) else None) or ():
        if isinstance(ch, dict):
            msg = ch.get("message")
            text = msg.get("content") if isinstance(msg, dict) else ch.get("text")
            if isinstance(text, str):
                chars += len(text)
    return math.ceil(chars / 4)
