"""LLM policies for `protocol: openai`, in chain order:

    LLMFallback → total timeout → ModelFailover → retry → breaker → classify → attempt timeout → FirstEvent → upstream

LLMFallback keys the cache on the request's meaning (SHA-256 of the canonical JSON of the fields that
change the answer, plus the path), stores completions (streamed ones assembled by the listener), and on
failure serves them marked `"fallback": true`, or a degraded completion. ModelFailover retries a failed
primary model once per `fallback_models` entry inside the same total timeout. FirstEvent makes a stream's
attempt end at its first event, so everything before the first byte reached the client can be retried.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import uuid
from typing import Any

from multidict import CIMultiDict

from proxy.exchange import Failure, Handler, ProxyRequest, ProxyResponse, Reason, Verdict
from proxy.http1.client import BODY_ERRORS
from proxy.llm import sse
from proxy.policy.fallback import Fallback, store_after_body
from proxy.settings.spec import DegradedSpec
from proxy.upstream.http import failure_response

COMPLETION_PATHS = ("/chat/completions", "/completions")


MAX_JSON_DEPTH = 128  # deeper than any real request, shallow enough that it is always written back


def json_depth_over(doc: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `doc` nests deeper than `limit`. Iterative: json.loads reads what json.dumps may not
    write back (each has its own recursion limit), so a request is bounded before either is asked to."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def cache_key(path: str, body: dict[str, Any], fields: tuple[str, ...]) -> bytes:
    picked = {k: body[k] for k in fields if k in body}
    canonical = json.dumps({"path": path, "request": picked}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    # JSON may carry a lone surrogate ("\ud800"): Python reads it, UTF-8 cannot hold it; the key keeps it
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()


def replayable(body: bytes | None, completion: bool) -> bool:
    """Only what can be served again as this endpoint's answer is cached: a JSON object (for a completion
    path, one with `choices` and no `error`) — not a maintenance page, not SSE text a non-boolean
    `stream` brought back."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return False
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    if not completion:
        return True
    choices = doc.get("choices")
    return isinstance(choices, list) and "error" not in doc and all(_replayable_choice(c) for c in choices)


def _replayable_choice(c: Any) -> bool:
    """A choice sse.replay can turn back into events: a text, or a message with text content and tool calls."""
    if not isinstance(c, dict) or not isinstance(c.get("index", 0), int):
        return False
    if "message" not in c:
        return isinstance(c.get("text"), str | None)
    m = c["message"]
    if not isinstance(m, dict) or not isinstance(m.get("content"), str | None) or not isinstance(m.get("role", ""), str):
        return False
    calls = m.get("tool_calls")
    return calls is None or (isinstance(calls, list) and all(isinstance(t, dict) for t in calls))


def is_completion(path: str) -> bool:
    p = path.split("?", 1)[0].rstrip("/")
    return p.endswith(COMPLETION_PATHS)


def degraded_completion(req: ProxyRequest, spec: DegradedSpec, reason: Reason) -> dict[str, Any]:
    body = req.llm.doc if req.llm is not None and req.llm.doc is not None else {}
    chat = req.path.rstrip("/").endswith("/chat/completions")
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": spec.message}
    else:
        choice["text"] = spec.message
    return {"id": f"degraded-{uuid.uuid4().hex[:24]}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model", "") if isinstance(body, dict) else "",
            "choices": [choice], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "fallback": True, "fallback_reason": f"{reason.value}_no_cache"}


_JSON = "application/json"


class LLMFallback(Fallback):
    __slots__ = ("degraded",)

    def __init__(self, spec, cache, clock, metrics, degraded: DegradedSpec) -> None:
        super().__init__(spec, cache, clock, metrics)
        self.degraded = degraded

    def _key(self, req: ProxyRequest) -> bytes | None:
        call = req.llm
        if call is not None and call.key is not None:
            return call.key if req.method in self.methods else None
        return super()._key(req)

    def _keep(self, req: ProxyRequest, resp: ProxyResponse, key: bytes) -> None:
        """A completion is stored as JSON once the listener has it whole (streams are assembled first:
        the listener ends the after-body phase with the assembled completion)."""
        no_store = req.llm is not None and req.llm.cache_mode == "no-store"
        if not no_store and resp.status == 200:
            resp.after_body(functools.partial(_store_replayable, self.cache, key, is_completion(req.path)),
                            self.spec.max_body)

    def serve(self, key: bytes | None, reason: Reason, req: ProxyRequest | None = None) -> ProxyResponse | None:
        out = super().serve(key, reason, req)
        if out is not None:
            if out.source in ("cache", "stale") and out.body:
                try:
                    doc = json.loads(out.body)
                except ValueError:
                    return out
                if isinstance(doc, dict):
                    doc["fallback"], doc["fallback_reason"] = True, reason.value
                    out.body = json.dumps(doc).encode()
            return out
        if (req is None or not self.degraded.enabled or reason is Reason.RATE_LIMITED
                or not is_completion(req.path) or req.method != "POST"):
            return None
        doc = degraded_completion(req, self.degraded, reason)
        out = ProxyResponse(self.degraded.status, CIMultiDict({"Content-Type": _JSON}), json.dumps(doc).encode(),
                            outcome="fallback")
        out.source, out.reason = "degraded", reason
        out.headers["X-Fallback"] = "degraded"
        out.headers["X-Fallback-Reason"] = f"{reason.value}_no_cache"
        self.served("degraded", reason)
        return out


def _store_replayable(cache, key: bytes, completion: bool, verdict: Verdict | None, body: bytes | None) -> None:
    if replayable(body, completion):
        store_after_body(cache, key, 200, CIMultiDict({"Content-Type": _JSON}), verdict, body)


class ModelFailover:
    """When the primary model's attempts end in 5xx or a timeout, or in a 429 the retry policy would not
    wait for (no usable Retry-After: a rate limit of that model, not an outage), try each fallback model
    once."""

    __slots__ = ("models", "clock")

    def __init__(self, models: tuple[str, ...], clock) -> None:
        self.models, self.clock = models, clock

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        resp = await call_next(req)
        call = req.llm
        if not _fails_over(resp) or call is None or call.doc is None:
            return resp
        original = call.doc
        for model in self.models:
            if req.target.breaker.is_open or resp.reason is Reason.CIRCUIT_BREAKER_OPEN:
                return resp  # every model goes to the same target: straight to the cache
            if model == original.get("model"):
                continue
            if req.deadline is not None and self.clock.monotonic() >= req.deadline:
                return resp  # the total is spent: no model gets a request it has no time to answer
            resp.release()
            req.body = json.dumps({**original, "model": model}, separators=(",", ":")).encode()
            req.headers["Content-Length"] = str(len(req.body))
            resp = await call_next(req)
            if resp.verdict is Verdict.SUCCESS:
                call.model_fallback = model
                return resp
            if not _fails_over(resp):
                return resp
        return resp


def _fails_over(resp: ProxyResponse) -> bool:
    return resp.verdict is Verdict.FAILURE or resp.reason is Reason.RATE_LIMITED


class FirstEvent:
    """Terminal wrapper for streams: the attempt is done when the first bytes of the body arrived."""

    __slots__ = ("inner",)

    def __init__(self, inner: Handler) -> None:
        self.inner = inner

    async def __call__(self, req: ProxyRequest) -> ProxyResponse:
        resp = await self.inner(req)
        cr = resp.stream
        if cr is None or resp.status != 200:
            return resp
        try:
            first = await cr.content.readany()
        except (*BODY_ERRORS, OSError) as exc:
            resp.release()
            return failure_response(exc, req.target.pool, req.target.name)
        except BaseException:
            resp.release()
            raise
        if not first:
            resp.release()
            f = Failure("reset", Reason.UPSTREAM_ERROR, 502, "upstream_reset",
                        f"target '{req.target.name}' closed the stream before the first event")
            return ProxyResponse(502, failure=f, verdict=Verdict.FAILURE, outcome="rejected", body=None)
        req.llm.first_chunk = first
        return resp


def error_event(message: str, error_type: str, code: int | str) -> bytes:
    return sse.event({"error": {"message": message, "type": error_type, "code": code}})
