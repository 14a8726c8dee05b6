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
import re
import time
import uuid
from typing import Any

from multidict import CIMultiDict

from proxy.exchange import Failure, Handler, ProxyRequest, ProxyResponse, Reason, Verdict, model_open_response
from proxy.http1.client import BODY_ERRORS
from proxy.llm import sse
from proxy.obs import log
from proxy.policy.breaker import Breaker, _settle
from proxy.policy.fallback import Fallback, store_after_body
from proxy.settings.spec import DegradedSpec
from proxy.upstream.aio import Body
from proxy.upstream.http import failure_response

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


def operation(path: str) -> str:
    """The endpoint as the GenAI conventions name it (gen_ai.operation.name)."""
    p = path.split("?", 1)[0].rstrip("/")
    return ("chat" if p.endswith("/chat/completions") else "text_completion" if p.endswith("/completions")
            else "embeddings" if p.endswith("/embeddings") else "other")


def is_completion(path: str) -> bool:
    return operation(path) in ("chat", "text_completion")


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
            skey = functools.partial(self.shared_key, req, key) if self.cache.shared is not None else None
            resp.after_body(functools.partial(_store_replayable, self.cache, key, is_completion(req.path), skey),
                            self.spec.max_body)

    def shared_key(self, req: ProxyRequest, key) -> str:
        call = req.llm
        if call is not None and call.key is not None:
            return call.key.hex()  # already a SHA-256 of the canonical request, the same in every sidecar
        return super().shared_key(req, key)

    def cached(self, out: ProxyResponse, reason: Reason) -> ProxyResponse:
        """A cached completion says it is one, in the body the app parses (and in the SSE replay)."""
        if out.body:
            try:
                doc = json.loads(out.body)
            except (ValueError, RecursionError):
                return out
            if isinstance(doc, dict):
                doc["fallback"], doc["fallback_reason"] = True, reason.value
                out.body = json.dumps(doc).encode()
        return out

    def serve(self, key: bytes | None, reason: Reason, req: ProxyRequest | None = None) -> ProxyResponse | None:
        out = super().serve(key, reason, req)
        if out is not None:
            return self.cached(out, reason) if out.source in ("cache", "stale") else out
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


def _store_replayable(cache, key: bytes, completion: bool, shared_key, verdict: Verdict | None,
                      body: bytes | None) -> None:
    if replayable(body, completion):
        store_after_body(cache, key, 200, CIMultiDict({"Content-Type": _JSON}), shared_key, verdict, body)


_CONTEXT_CODES = frozenset({"context_length_exceeded", "context_window_exceeded", "string_above_max_length"})
# How providers word "the prompt does not fit" (OpenAI, vLLM, OpenRouter, Anthropic, Mistral, Gemini, Groq)
_CONTEXT_TEXT = re.compile(
    r"context[ _](length|window)|maximum context|prompt is too long|too many (input |prompt )?tokens"
    r"|input token count.{0,40}exceeds|reduce the length of the (messages|prompt|input)"
    r"|exceeds? the (model'?s? )?(maximum|max) (context|input|number of tokens)", re.I)
# How providers refuse an assistant prefill (a last assistant message to continue)
_PREFILL_TEXT = re.compile(
    r"prefill|(final|last) message (must|should) (be|have role|come from)( a| the)? user"
    r"|must end with a user|assistant message.{0,40}(not supported|must not be (the )?(last|final))"
    r"|does not support.{0,40}assistant", re.I)


def error_kind(status: int, body: bytes | None) -> str | None:
    """What a provider's 4xx says: "context_length" (the prompt is longer than the model's context),
    "prefill" (the model takes no assistant prefill), or None (any other 4xx: the app's to see)."""
    if status not in (400, 413, 422) or not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        codes = {str(err.get(k)) for k in ("code", "type", "param") if err.get(k) is not None}
        text = str(err.get("message", ""))
        raw = err.get("metadata", {}).get("raw") if isinstance(err.get("metadata"), dict) else None
        if isinstance(raw, str):
            text += " " + raw  # OpenRouter wraps the provider's own error here
    else:
        codes, text = set(), body[:4096].decode("utf-8", "replace")
    if codes & _CONTEXT_CODES or _CONTEXT_TEXT.search(text):
        return "context_length"
    if _PREFILL_TEXT.search(text):
        return "prefill"
    return None


class PrefillMemory:
    """The models of one upstream that refused an assistant prefill, learnt from the refusal. Kept across
    reloads (State). A refusal is remembered for an hour — a provider may add support, and one odd 400
    must not turn continuation off for good — and for at most 256 models (the names come from requests)."""

    __slots__ = ("refused",)
    TTL, MAX = 3600.0, 256

    def __init__(self) -> None:
        self.refused: dict[str, float] = {}

    def refuse(self, model: str, now: float) -> None:
        if len(self.refused) >= self.MAX:
            self.refused.pop(next(iter(self.refused)))
        self.refused[model] = now
        log.warning("llm_prefill_refused", model=model, remembered_for=self.TTL)

    def knows(self, model: str, now: float) -> bool:
        at = self.refused.get(model)
        if at is None:
            return False
        if now - at >= self.TTL:
            del self.refused[model]
            return False
        return True


class ModelFailover:
    """Tries the request's model, then each fallback model, inside the same total timeout.

    It moves on when an attempt ends in a failure verdict (5xx, reset, timeout — retried in place first
    per the retry rules), or a 429 the retry policy would not wait for (a rate limit of that model, not
    an outage). A 400 saying the prompt does not fit the model's context goes to `context_models`
    instead, never to the same model again. Any other 4xx (a content-policy refusal, a bad parameter) is
    the app's to see, unchanged: another model would refuse it too, or answer a different question.
    When continuing a stream (`prefill`), a model known not to take prefill is skipped and one that
    refuses it is remembered and skipped."""

    __slots__ = ("models", "context_models", "clock", "prefill", "no_prefill")

    def __init__(self, models: tuple[str, ...], clock, context_models: tuple[str, ...] = (),
                 prefill: PrefillMemory | None = None, no_prefill: tuple[str, ...] = ()) -> None:
        self.models, self.context_models, self.clock = models, context_models, clock
        self.prefill, self.no_prefill = prefill, frozenset(no_prefill)

    def _skipped(self, call, model: str) -> bool:
        return (self.prefill is not None and call.prefill
                and (model in self.no_prefill or self.prefill.knows(model, self.clock.monotonic())))

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        call = req.llm
        if call is None or call.doc is None:
            return await call_next(req)
        original = call.doc
        first = original.get("model")
        queue: list = [first, *self.models]
        tried: set = set()
        resp: ProxyResponse | None = None
        skipped_open = None  # the first model skipped because its breaker is open
        i = 0
        while i < len(queue):
            model = queue[i]
            i += 1
            if model in tried or (isinstance(model, str) and self._skipped(call, model)):
                continue
            tried.add(model)
            mb = model_breaker(req.target, model)
            if mb is not None and mb.is_open:
                # straight to the next model: at most the half-open probes reach this one
                if skipped_open is None:
                    skipped_open = (model, mb)
                continue
            if resp is not None:
                if req.target.breaker.is_open or (resp.failure is not None and resp.failure.kind == "circuit_breaker_open"):
                    return resp  # every model goes to the same target: straight to the cache
                if req.deadline is not None and self.clock.monotonic() >= req.deadline:
                    return resp  # the total is spent: no model gets a request it has no time to answer
                resp.release()
            if model != first:
                req.body = json.dumps({**original, "model": model}, separators=(",", ":")).encode()
                req.headers["Content-Length"] = str(len(req.body))
            call.current = model
            resp = await call_next(req)
            if resp.failure is not None and resp.failure.kind == "connect-failure" and not resp.failure.after_head:
                return resp  # the target's door: every model is behind it (retried per the retry rules)
            if _fails_over(resp):
                continue
            kind = error_kind(resp.status, resp.body) if resp.status >= 400 and resp.stream is None else None
            if kind == "context_length":
                if not self.context_models:
                    return resp  # nowhere larger to go: the provider's error, as it is
                queue[i:] = self.context_models
                continue
            if kind == "prefill" and self.prefill is not None and call.prefill:
                if isinstance(model, str):
                    self.prefill.refuse(model, self.clock.monotonic())
                continue
            if model != first:
                call.model_fallback = model
            return resp
        if resp is None and skipped_open is not None:
            model, mb = skipped_open
            return model_open_response(req.target.name, str(model), mb.last_failure, mb.retry_after())
        if resp is None:
            f = Failure("no_model", Reason.UPSTREAM_ERROR, 502, "upstream_error",
                        "no model of this upstream can continue the answer (assistant prefill)")
            return ProxyResponse(502, failure=f, verdict=Verdict.REJECTED, outcome="rejected", body=None)
        return resp


def _fails_over(resp: ProxyResponse) -> bool:
    return (resp.verdict is Verdict.FAILURE or resp.reason is Reason.RATE_LIMITED
            or (resp.failure is not None and resp.failure.kind == "model_breaker_open"))


# Failures of the provider's door, not of one model: they charge the target's breaker.
_TARGET_FAILURES = frozenset({"connect-failure", "reset"})


class ModelBreaker(Breaker):
    """The breaker step for `protocol: openai`: each attempt passes two breakers, the target's and its
    model's (`TargetState.models`, one per configured model and one, `other`, for the rest). A connect
    failure or a reset before the head charges the target (every model is behind that door); what the
    model's answer did — a 5xx, a timeout, a body or stream cut after its head — charges the model only,
    so one failing model does not open the breaker of the models that work on the same provider."""

    __slots__ = ()

    async def __call__(self, req: ProxyRequest, call_next: Handler) -> ProxyResponse:
        target, call = req.target, req.llm
        mb = model_breaker(target, call.asked) if call is not None and call.doc is not None else None
        if mb is None:
            return await super().__call__(req, call_next)
        tb = target.breaker
        ttok = tb.admit()
        if ttok is None:
            return self.refusal(req)
        mtok = mb.admit()
        if mtok is None:
            tb.cancel(ttok)
            return model_open_response(target.name, str(call.asked), mb.last_failure, mb.retry_after())
        start = self.clock.monotonic()
        try:
            resp = await call_next(req)
        except BaseException:
            tb.cancel(ttok)
            mb.cancel(mtok)
            raise
        resp.elapsed = elapsed = self.clock.monotonic() - start
        verdict, f = resp.verdict, resp.failure
        if verdict is Verdict.FAILURE and f is not None and f.kind in _TARGET_FAILURES and not f.after_head:
            tb.record(ttok, verdict, elapsed, f)
            mb.cancel(mtok)
            return resp
        # the target answered: a success for it, whatever the model did
        tb.record(ttok, Verdict.SUCCESS if verdict is Verdict.FAILURE else verdict, elapsed)
        if verdict is Verdict.SUCCESS and resp.stream is not None:
            resp.after_body(functools.partial(_settle, mb, mtok, elapsed))
        else:
            mb.record(mtok, verdict, elapsed, f)
        return resp


def model_breaker(target, model: object):
    """The breaker of `model` on this track (`other` for a model not configured); None off the LLM path."""
    models = target.models
    if models is None:
        return None
    mb = models.get(model) if isinstance(model, str) else None
    return mb if mb is not None else models["other"]


class FirstEvent:
    """Terminal wrapper for streams: the attempt is done when the first event with data arrived. Comment
    lines before it (OpenRouter's `: OPENROUTER PROCESSING` while a model is queued) are held and go out
    in front of it, but do not end the attempt: a model queued past `first_byte` fails over like a
    silent one. An answer that is not a 200 is read whole (its error code decides the failover)."""

    __slots__ = ("inner", "max_body")

    def __init__(self, inner: Handler, max_body: int = 1 << 20) -> None:
        self.inner, self.max_body = inner, max_body

    async def __call__(self, req: ProxyRequest) -> ProxyResponse:
        resp = await self.inner(req)
        cr = resp.stream
        if cr is None:
            return resp
        if resp.status != 200 or not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            # an error, or a provider that ignores `stream` and sends one JSON body: read as it is
            return await read_whole(req, resp, self.max_body)
        got = await _gather(req, resp, self.max_body, _has_data)
        if isinstance(got, ProxyResponse):
            return got
        held, _ = got
        if not held:
            resp.release()
            f = Failure("reset", Reason.UPSTREAM_ERROR, 502, "upstream_reset",
                        f"target '{req.target.name}' closed the stream before the first event")
            f.after_head = True
            return ProxyResponse(502, failure=f, verdict=Verdict.FAILURE, outcome="rejected", body=None)
        req.llm.first_chunk = held
        return resp


def _has_data(window: bytes) -> bool:
    """A data line has arrived (SSE: `data:` at the start of a line); comments and blank lines do not
    count. Not whether the event is complete: the relay waits for that."""
    return b"\ndata:" in window or b"\rdata:" in window


async def _gather(req: ProxyRequest, resp: ProxyResponse, limit: int, enough=None):
    """Read the body inside the attempt until it ends, `enough(bytes)` says so, or `limit` is passed →
    (what was read, whether the body ended), or the failure as a response (the connection given back)."""
    cr = resp.stream
    parts: list[bytes] = []
    size = 0
    tail = b"\n"  # the last bytes read so far (the start of the body counts as the start of a line)
    try:
        while chunk := await cr.content.readany():
            # `enough` sees this chunk behind the tail of what came before (a `data:` may straddle reads);
            # a \x00 in front keeps a tail from passing for the start of a line
            window = (tail if not parts else b"\x00" + tail) + chunk
            tail = (tail + chunk)[-6:]
            parts.append(chunk)
            size += len(chunk)
            if size > limit or (enough is not None and enough(window)):
                return b"".join(parts), False
    except (*BODY_ERRORS, OSError) as exc:
        resp.release()
        out = failure_response(exc, req.target.pool, req.target.name)
        out.failure.after_head = True
        return out
    except BaseException:
        resp.release()
        raise
    return b"".join(parts), True


async def read_whole(req: ProxyRequest, resp: ProxyResponse, max_body: int) -> ProxyResponse:
    """The answer's body read inside the attempt, up to `max_body` (beyond it the rest streams on)."""
    got = await _gather(req, resp, max_body)
    if isinstance(got, ProxyResponse):
        return got
    body, ended = got
    if not ended:
        resp.stream = _Prefixed(resp.stream, body)
        return resp
    resp.body, resp.stream = body, None
    resp.release()  # read to its end: the connection goes back to the pool
    return resp


class _Prefixed(Body):
    """An answer whose first bytes were read already (past WholeBody's limit): they come out first."""

    __slots__ = ("cr", "status", "reason", "headers", "content", "_head")

    def __init__(self, cr, head: bytes) -> None:
        self.cr, self.status, self.reason, self.headers = cr, cr.status, cr.reason, cr.headers
        self.content, self._head = self, head

    async def readany(self) -> bytes:
        head, self._head = self._head, b""
        return head or await self.cr.content.readany()


class WholeBody:
    """Terminal wrapper for answers that are not streams: the body is read inside the attempt (up to
    `max_body`, fallback.max_body), so a cut or a stall mid-body is a failure retry, breaker and model
    failover see, not a truncated answer sent after a 200 head — and a 4xx's error code can be read
    (context length, prefill). A larger answer streams on as it arrives, as before."""

    __slots__ = ("inner", "max_body")

    def __init__(self, inner: Handler, max_body: int) -> None:
        self.inner, self.max_body = inner, max_body

    async def __call__(self, req: ProxyRequest) -> ProxyResponse:
        resp = await self.inner(req)
        return resp if resp.stream is None else await read_whole(req, resp, self.max_body)


def error_event(message: str, error_type: str, code: int | str) -> bytes:
    return sse.event({"error": {"message": message, "type": error_type, "code": code}})
