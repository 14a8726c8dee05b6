"""LLM egress listener (`protocol: openai`), e.g. OpenRouter's OpenAI-compatible API on 127.0.0.1:9001.

Same data path as the HTTP listener, with what an LLM API needs: bodies must be JSON objects (400) within
`max_request_body` (413); errors in OpenAI's shape so SDKs raise their usual exceptions; `X-Proxy-Cache`
and `X-Proxy-Timeout` request headers; SSE answers relayed event by event as they arrive (never buffered)
while a copy is assembled for the fallback cache; a failure mid-stream ends the client's stream with one
error event and `data: [DONE]`; cached and degraded fallbacks replayed as SSE to streaming callers.
"""

from __future__ import annotations

import json
import time

from multidict import CIMultiDict

from proxy.exchange import ProxyRequest, ProxyResponse, Verdict
from proxy.http1.client import BODY_ERRORS
from proxy.http1.server import Request, Response, StreamResponse
from proxy.listen.http import _REQ_DROP, HttpListener, Refused, collect
from proxy.llm import sse
from proxy.llm.call import LLMCall
from proxy.llm.policy import MAX_JSON_DEPTH, cache_key, error_event, json_depth_over, operation
from proxy.llm.splice import Splice
from proxy.obs import log
from proxy.obs.tracing import IN_SPAN
from proxy.policy.fallback import cache_key as http_cache_key
from proxy.settings.units import parse_duration

CACHE_MODES = ("no-store", "only-if-cached")


_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error"}


class OpenAIListener(HttpListener):
    drop_headers = _REQ_DROP | {"x-proxy-cache", "x-proxy-timeout"}

    def error(self, status: int, error_type: str, message: str, rid: str, headers: dict | None = None) -> Response:
        body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, error_type), "code": status,
                          "param": None, "proxy_error": error_type, "upstream": self.name, "request_id": rid}}
        return Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                            headers={"X-Request-Id": rid, **(headers or {})})

    async def read_body(self, request: Request, route, cl: int | None, max_body: int | None):
        """Always whole: the JSON is read (cache key, model, stream flag) before anything goes out."""
        chunks, _, _ = await collect(request.content, route.timeouts.idle, max_body)
        return b"".join(chunks), True

    plain = False

    def access_fields(self, preq) -> dict:
        call = preq.llm
        if call is None:
            return {}
        out = {"model_fallback": call.model_fallback} if call.model_fallback else {}
        if call.continuations:
            out["continuations"] = call.continuations
        return out

    async def prepare(self, request: Request, up, route, preq: ProxyRequest):
        h = request.headers
        call = preq.llm = LLMCall(time.monotonic())
        mode = h.get("X-Proxy-Cache")
        if mode is not None:
            mode = mode.strip().lower()
            if mode not in CACHE_MODES:
                raise Refused(400, "invalid_header", f"X-Proxy-Cache must be one of {', '.join(CACHE_MODES)}")
            call.cache_mode = mode
        wanted = h.get("X-Proxy-Timeout")
        if wanted is not None:
            try:
                seconds = parse_duration(wanted.strip())
                if not isinstance(seconds, float) or seconds <= 0:
                    raise ValueError
            except ValueError:
                raise Refused(400, "invalid_header", "X-Proxy-Timeout must be a duration such as 45s or 1m") from None
            preq.timeout = seconds  # policies cap it by the configured timeouts
        stream = False
        if request.method == "POST":
            try:
                doc = json.loads(preq.body or b"")
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise Refused(400, "invalid_json", "request body must be JSON (and not nested absurdly deep)") from None
            if not isinstance(doc, dict):
                raise Refused(400, "invalid_json", f"request body must be a JSON object, got {type(doc).__name__}")
            if json_depth_over(doc):
                raise Refused(400, "invalid_json", f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
            if "model" in doc and not isinstance(doc["model"], str):
                raise Refused(400, "invalid_request", f"model must be a string, got {type(doc['model']).__name__}")
            call.doc = doc
            stream = call.stream = doc.get("stream") is True
            call.model = up.metrics.model_label(doc.get("model"))
            call.key = cache_key(preq.path, doc, up.spec.llm.cache_key_fields)
        if mode == "only-if-cached":
            return self._from_cache(route, preq, stream)
        return route.stream_chain if stream else route.chain

    def _from_cache(self, route, preq: ProxyRequest, stream: bool) -> StreamResponse:
        key = preq.llm.key or http_cache_key(preq, route.fallback.vary)
        entry = route.cache.get(key)
        if entry is None:
            raise Refused(504, "cache_miss", "X-Proxy-Cache: only-if-cached and nothing is cached for this request")
        headers = {"X-Request-Id": preq.request_id, "X-Proxy-Cache": "hit"}
        if stream:
            doc = json.loads(entry.body)
            return Response(status=200, body=b"".join(sse.replay(doc)), headers={**headers, **_SSE_HEADERS})
        return Response(status=entry.status, body=entry.body,
                            headers={**dict(entry.headers), **headers})

    @staticmethod
    def trace_call(up, preq: ProxyRequest, completion: dict | None = None) -> None:
        """GenAI attributes on the request's server span (tracing on): what was asked, and once the
        answer is whole, what answered (model, tokens, finish reasons). Prompt and completion text only
        with tracing.capture_content."""
        from opentelemetry import trace

        from proxy.obs.tracing import gen_ai_response

        span = trace.get_current_span()
        call = preq.llm
        capture = up.tracing.spec.capture_content
        if completion is None:
            span.set_attribute("gen_ai.operation.name", operation(preq.path))
            span.set_attribute("gen_ai.provider.name", "openai")
            asked = call.doc.get("model") if call.doc else None
            if isinstance(asked, str):
                span.set_attribute("gen_ai.request.model", asked)
            if call.model_fallback:
                span.set_attribute("resilience.model_fallback", call.model_fallback)
            if capture and call.doc and isinstance(call.doc.get("messages"), list):
                span.set_attribute("gen_ai.input.messages", json.dumps(call.doc["messages"])[:65536])
            return
        if call.continuations:
            span.set_attribute("resilience.stream.continuations", call.continuations)
        gen_ai_response(span, completion, capture)

    async def respond(self, request: Request, up, route, preq: ProxyRequest,
                      resp: ProxyResponse) -> tuple[str, StreamResponse]:
        call = preq.llm
        if up.tracing is not None and IN_SPAN.get():
            self.trace_call(up, preq)
        if call.model_fallback and resp.headers is not None:
            if not isinstance(resp.headers, CIMultiDict):  # an upstream's headers are read-only
                resp.headers = CIMultiDict(resp.headers)
            resp.headers["X-Model-Fallback"] = call.model_fallback
        if call.stream and resp.body is not None and resp.outcome == "fallback" and resp.status == 200:
            return await self._replay(request, preq, resp)
        op = operation(preq.path)
        if (call.stream and resp.stream is not None and resp.status == 200
                and resp.headers.get("Content-Type", "").startswith("text/event-stream")):
            out = await self._relay(request, up, route, preq, resp, op)
            up.metrics.operation(call.model, op, time.monotonic() - call.started)
            return out
        # a provider that answers a streaming call with one JSON body (it ignores `stream`): passed on as it
        # is, not judged as a stream that ended early
        if resp.outcome == "upstream" and resp.status == 200 and call.doc is not None:
            # count the tokens of a non-streamed completion on the copy the listener keeps anyway
            model, asked = call.model, call.model_fallback or call.doc.get("model")

            def counted(verdict: Verdict | None, body: bytes | None) -> None:
                if verdict is Verdict.SUCCESS and body is not None:
                    try:
                        doc = json.loads(body)
                        up.metrics.tokens(model, doc.get("usage"), op, asked)
                        if up.tracing is not None and IN_SPAN.get():
                            self.trace_call(up, preq, doc)
                    except (ValueError, AttributeError, RecursionError):
                        pass

            resp.after_body(counted, route.fallback.max_body)
        out = await super().respond(request, up, route, preq, resp)
        if resp.outcome == "upstream":
            up.metrics.operation(call.model, op, time.monotonic() - call.started)
        return out

    async def _replay(self, request, preq: ProxyRequest, resp: ProxyResponse):
        """A cached or degraded completion, as the SSE stream the caller asked for."""
        doc = json.loads(resp.body)
        markers = {k: doc.pop(k) for k in ("fallback", "fallback_reason") if k in doc}
        headers = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-")}
        r = Response(status=200, body=b"".join(sse.replay(doc, markers)),
                         headers={**headers, **_SSE_HEADERS, "X-Request-Id": preq.request_id})
        await r.prepare(request)
        await r.write_eof()
        return "200", r

    async def _relay(self, request, up, route, preq: ProxyRequest, resp: ProxyResponse, op: str):
        """Pass SSE events through as they arrive; when the stream breaks after events reached the app,
        continue it (proxy/llm/splice.py) or end it with one error event — never a truncated answer that
        looks complete."""
        call = preq.llm
        model = call.model
        up.metrics.first_byte(model, op, time.monotonic() - call.started)
        headers = self.response_headers(resp, preq.request_id, up.track_header, preq.target.name)
        headers.popall("Content-Length", None)
        sr = StreamResponse(status=200, headers=headers)
        await sr.prepare(request)
        sp = Splice(max_event=up.spec.fallback.max_body)
        cont = up.spec.llm.continuation
        chunk, call.first_chunk = call.first_chunk, b""
        current = call.model_fallback or (call.doc.get("model") if call.doc else None)
        failure: str | None = None  # the first break's description: what the app is told if all fails
        parts = [resp]
        try:
            while True:
                fault = None
                try:
                    while chunk:
                        out = sp.feed(chunk)
                        if out:
                            await sr.write(out)
                        if sp.fault is not None:
                            break
                        chunk = await resp.stream.content.readany()
                    else:
                        out = sp.end()
                        if out:
                            await sr.write(out)
                except BODY_ERRORS as exc:
                    fault = "idle" if isinstance(exc, TimeoutError) else "cut"
                fault = fault or sp.fault
                if sp.finished:
                    if fault is not None:
                        # every choice had finished: the answer is whole, whatever came after it (a cut
                        # before the usage chunk, a late error event); nothing to continue
                        log.warning("upstream_failed_after_the_answer", upstream=self.name, track=preq.target.name,
                                    request_id=preq.request_id, error=fault, part=sp.part, model=current)
                    break
                fault = fault or "early_end"
                resp.body_done(Verdict.FAILURE)  # the breaker counts the break; nothing is cached
                resp.release()
                log.warning("upstream_failed_mid_stream", upstream=self.name, track=preq.target.name,
                            request_id=preq.request_id, error=fault, part=sp.part, model=current)
                if failure is None:
                    failure = _FAULTS[fault] + (f": {sp.detail}" if sp.detail else "")
                doc = None
                if cont.enabled and sp.part < cont.max and route.continue_chain is not None and op == "chat":
                    doc = sp.continuation_doc({**call.doc, "model": current})
                nxt = await self._continue(route, preq, doc) if doc is not None else None
                if nxt is None:
                    up.metrics.stream_recovery("failed" if doc is not None or sp.part else "not_continuable")
                    await sr.write(error_event(failure, "upstream_error", 502) + sse.DONE)
                    await sr.write_eof()
                    return "reset", sr
                resp, chunk, current = nxt
                parts.append(resp)
                sp.next_part()
                call.continuations += 1
            if not sp.done_sent:
                # the body ended cleanly after every choice finished: a whole answer whose provider does
                # not send the sentinel (or a continued one). The app's SDK waits for one: it is added, once.
                await sr.write(sse.DONE)
            completion = sp.asm.completion()
            up.metrics.tokens(model, completion.get("usage"), op, current)
            if up.tracing is not None and IN_SPAN.get():
                self.trace_call(up, preq, completion)
            if sp.part:
                up.metrics.stream_recovery("recovered")
            assembled = None
            if sp.part == 0 and not sp.blind:
                assembled = json.dumps(completion).encode()
            # the answering part's verdict (its model's breaker, a half-open probe) before its release
            resp.body_done(Verdict.SUCCESS, assembled if assembled is not None and len(assembled) <= resp.keep else None)
            await sr.write_eof()
            return "200", sr
        finally:
            for r in parts[1:]:
                r.release()

    async def _continue(self, route, preq: ProxyRequest, doc: dict):
        """Ask for the rest of the answer → (its response, first bytes, the model answering), or None."""
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
        headers = CIMultiDict(preq.headers)
        headers["Content-Length"] = str(len(body))
        nreq = ProxyRequest(preq.method, preq.path_qs, preq.path, headers, preq.client_headers, body, True,
                            preq.request_id, preq.route, preq.target, True)
        call = nreq.llm = LLMCall(time.monotonic())
        call.doc, call.stream, call.model, call.cache_mode = doc, True, preq.llm.model, "no-store"
        msgs = doc.get("messages") or ()
        call.prefill = bool(msgs) and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"
        resp = await route.continue_chain(nreq)
        preq.attempts += nreq.attempts
        if (resp.status == 200 and resp.stream is not None
                and resp.headers.get("Content-Type", "").startswith("text/event-stream")):
            return resp, call.first_chunk, call.model_fallback or doc.get("model")
        resp.release()
        return None


_FAULTS = {"cut": "the upstream stream was interrupted",
           "idle": "no event from the upstream within the idle timeout",
           "early_end": "the upstream stream ended early",
           "error_event": "the upstream sent an error event mid-stream",
           "malformed": "the upstream sent a malformed event mid-stream"}
