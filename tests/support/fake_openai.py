"""A fake OpenAI-compatible upstream (OpenRouter-shaped paths): streams chunks (paced by delays or by a
gate the test opens chunk by chunk), fails on demand per model or for the first N calls, rate-limits,
stalls or cuts a stream mid-answer, and records every request (with every Authorization value).

It misbehaves the ways providers do (the faults LLM failover benchmarks use): resets before the head,
never answers, sends the first token late (with OpenRouter's keep-alive comments meanwhile), cuts,
stalls, sends a malformed or an in-band error event mid-stream, omits `[DONE]`, refuses a prompt longer
than a model's context, refuses on content policy, refuses assistant prefill. It also honours prefill
as the providers that support it do: a last assistant message is continued, its text not repeated, and
counted as prompt tokens (one token per streamed piece of the canonical answer)."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

WORDS = ["Hello", " from", " the", " fake", " model", ",", " one", " chunk", " at", " a time", "."]


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.model_requests: list[dict] = []
        self.chunks = 10
        self.chunks_sent = 0
        self.aborted = 0
        self.delay = 0.0                  # seconds between stream chunks
        self.fail_models: set[str] = set()  # these models answer 500
        self.rate_limit_models: set[str] = set()  # these models answer 429 without Retry-After
        self.fail_all: int | None = None  # every call answers this status
        self.retry_after: str | None = None
        self.slow: float = 0.0            # delay before answering at all
        self.hang = False                 # never answer (until the proxy gives up)
        self.stream_done = True           # send [DONE] at the end
        self.stream_finish = True         # send the final chunk (finish_reason, usage)
        self.stream_usage = True          # ... with usage (OpenAI sends it only with stream_options)
        self.fail_first = 0               # the first N completions answer fail_all's status (then heal)
        self.rate_limit_reset: str | None = None  # X-RateLimit-Reset on failures
        self.gate: asyncio.Queue | None = None    # a stream sends chunk i > 0 only after a token is put
        self.stall_after: int | None = None       # a stream goes silent after this many chunks
        self.cut_after: int | None = None         # a stream's connection is dropped after this many chunks
        self.completions = 0
        self.fail_status = 500            # what fail_models answer
        self.hang_models: set[str] = set()          # these models never answer
        self.reset_first = 0              # the first N completions: connection closed before any head
        self.context_limit_models: set[str] = set()  # a 400 context_length_exceeded
        self.content_filter = False       # every completion: a 400 content-policy refusal
        self.no_prefill_models: set[str] = set()    # a last assistant message: 400, prefill unsupported
        self.body_cut_first = 0           # non-streamed: the first N bodies are cut halfway
        self.first_delay = 0.0            # a stream's first token comes this late (head sent at once)
        self.comments = False             # `: OPENROUTER PROCESSING` every 100 ms while waiting
        self.malformed_after: int | None = None  # a stream sends a broken event after this many chunks
        self.error_after: int | None = None      # ... an in-band {"error": ...} event (HTTP 200), and ends
        self.fault_models: set[str] | None = None  # stream faults apply to these models only (None: all)
        self.fault_times: int | None = None        # ... and to this many streams only (None: always)
        self.faulted = 0
        self.fail_until: float | None = None  # fail_models fail until this monotonic time, then heal
        self.usage_cost: float | None = None  # usage.cost in USD, as OpenRouter reports it
        self.fail_after_fault = False     # a model that had a stream fault answers fail_status from then on
        self.attempts: list[tuple[str, float, str]] = []  # (model, time, what happened)

    def app(self) -> web.Application:
        a = web.Application(client_max_size=64 * 1024 * 1024)
        a.router.add_post("/api/v1/chat/completions", self.chat)
        a.router.add_post("/api/v1/completions", self.text)
        a.router.add_post("/api/v1/embeddings", self.embeddings)
        a.router.add_get("/api/v1/models", self.models)
        return a

    def _record(self, request, body) -> None:
        self.requests.append({"path": request.path, "auth": request.headers.getall("Authorization", []),
                              "headers": dict(request.headers), "body": body, "t": time.monotonic()})

    def content(self, body) -> str:
        """The canonical answer to this request (a prefill is not part of the question)."""
        msgs = [m for m in body.get("messages") or () if m.get("role") != "assistant"]
        last = msgs[-1].get("content", "") if msgs else body.get("prompt", "")
        return "".join(WORDS[i % len(WORDS)] for i in range(self.chunks)) + f" [{last}]"

    def pieces(self, text: str) -> list[str]:
        return [text[i * len(text) // self.chunks:(i + 1) * len(text) // self.chunks] for i in range(self.chunks)]

    @staticmethod
    def prefill(body) -> str | None:
        msgs = body.get("messages") or ()
        return msgs[-1].get("content") if msgs and msgs[-1].get("role") == "assistant" else None

    def _stream_fault(self, model) -> bool:
        """Whether this stream gets the configured mid-stream fault (and counts it)."""
        if self.fault_models is not None and model not in self.fault_models:
            return False
        if self.fault_times is not None and self.faulted >= self.fault_times:
            return False
        self.faulted += 1
        if self.fail_after_fault:
            self.fail_models = {*self.fail_models, model}
        return True

    async def _accept(self, request):
        """Read and record a request → (body, the failure to answer instead, if one is configured)."""
        body = await request.json()
        self._record(request, body)
        return body, await self._gate(body, request)

    async def _gate(self, body, request=None):
        self.completions += 1
        model = body.get("model")
        if self.reset_first and self.completions <= self.reset_first and request is not None:
            self.attempts.append((model, time.monotonic(), "reset"))
            request.transport.close()  # before any head: the TCP reset of a provider's front end
            await asyncio.Event().wait()
        if self.hang or model in self.hang_models:
            self.attempts.append((model, time.monotonic(), "hang"))
            await asyncio.Event().wait()
        if self.slow:
            await asyncio.sleep(self.slow)
        failing = self.fail_all is not None and (not self.fail_first or self.completions <= self.fail_first)
        if failing:
            self.attempts.append((model, time.monotonic(), str(self.fail_all)))
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            if self.rate_limit_reset:
                headers["X-RateLimit-Reset"] = self.rate_limit_reset
            return web.json_response({"error": {"message": "fake failure", "code": self.fail_all}},
                                     status=self.fail_all, headers=headers)
        if model in self.rate_limit_models:
            return self._refuse(model, 429, {"message": "rate limited", "code": 429})
        if model in self.fail_models and (self.fail_until is None or time.monotonic() < self.fail_until):
            return self._refuse(model, self.fail_status, {"message": "model down", "code": self.fail_status})
        if model in self.context_limit_models:
            return self._refuse(model, 400, {
                "message": "This model's maximum context length is 8192 tokens. However, your messages "
                           "resulted in 9001 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"})
        if self.content_filter:
            return self._refuse(model, 400, {
                "message": "Your request was rejected as a result of our safety system.",
                "type": "invalid_request_error", "param": None, "code": "content_policy_violation"})
        if self.prefill(body) is not None and model in self.no_prefill_models:
            return self._refuse(model, 400, {
                "message": "This model does not support assistant message prefill. The conversation must "
                           "end with a user message.", "type": "invalid_request_error", "code": 400})
        return None

    def _refuse(self, model, status: int, error: dict) -> web.Response:
        self.attempts.append((model, time.monotonic(), str(status)))
        return web.json_response({"error": error}, status=status)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, failed = await self._accept(request)
        if failed is not None:
            return failed
        cid, model, created = f"chatcmpl-{len(self.requests)}", body.get("model", "m"), 1700000000
        text = self.content(body)
        pieces = self.pieces(text)
        prefill = self.prefill(body)
        skip = 0
        completion_tokens = len(pieces)
        if prefill is not None:
            # continue after the prefill: the pieces it touches are prompt (the rest of a piece it ends in
            # — whitespace a client stripped — comes first, free), the pieces after it are the answer
            assert text.startswith(prefill), f"prefill {prefill!r} is not the start of {text!r}"
            covered = 0
            while skip < len(pieces) and covered < len(prefill):
                covered += len(pieces[skip])
                skip += 1
            completion_tokens = len(pieces) - skip
            pieces = [x for x in [text[len(prefill):covered], *pieces[skip:]] if x] or [""]
        usage = {"prompt_tokens": 7 + skip, "completion_tokens": completion_tokens,
                 "total_tokens": 7 + skip + completion_tokens}
        if self.usage_cost is not None:
            usage["cost"] = self.usage_cost
        if not body.get("stream"):
            doc = json.dumps({"id": cid, "object": "chat.completion", "created": created, "model": model,
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                           "finish_reason": "stop"}], "usage": usage}).encode()
            if self.body_cut_first and self.completions <= self.body_cut_first:
                self.attempts.append((model, time.monotonic(), "body-cut"))
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                resp.content_length = len(doc)
                await resp.prepare(request)
                await resp.write(doc[: len(doc) // 2])
                request.transport.close()
                return resp
            self.attempts.append((model, time.monotonic(), "ok"))
            return web.Response(body=doc, content_type="application/json")
        faulty = self._stream_fault(model)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        outcome = "ok"
        try:
            if self.first_delay and faulty:
                end = time.monotonic() + self.first_delay
                while time.monotonic() < end:
                    if self.comments:
                        await resp.write(b": OPENROUTER PROCESSING\n\n")
                    await asyncio.sleep(min(0.1, max(0.0, end - time.monotonic())))
            for i, piece in enumerate(pieces):
                if faulty and i == self.stall_after:
                    outcome = "stall"
                    self.attempts.append((model, time.monotonic(), outcome))
                    await asyncio.Event().wait()  # silent from here on
                if faulty and i == self.cut_after:
                    self.attempts.append((model, time.monotonic(), "cut"))
                    request.transport.close()  # the provider's connection dies mid-answer
                    return resp
                if faulty and i == self.malformed_after:
                    self.attempts.append((model, time.monotonic(), "malformed"))
                    await resp.write(b'data: {"id": "' + cid.encode() + b'", "choices": [{"delta": {"cont\n\n')
                    await resp.write_eof()
                    return resp
                if faulty and i == self.error_after:
                    self.attempts.append((model, time.monotonic(), "error-event"))
                    await resp.write(b'data: {"error": {"message": "Provider returned error", "code": 502}}\n\n')
                    await resp.write_eof()
                    return resp
                if i and self.gate is not None:
                    await self.gate.get()
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.chunks_sent += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
        except (ConnectionError, asyncio.CancelledError):
            self.aborted += 1  # the caller (the proxy) went away mid-stream
            raise
        self.attempts.append((model, time.monotonic(), outcome))
        final = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
        if not self.stream_usage:
            del final["usage"]
        if self.stream_finish:
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        if self.stream_done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def text(self, request: web.Request) -> web.Response:
        body, failed = await self._accept(request)
        if failed is not None:
            return failed
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "created": 1700000000,
                                  "model": body.get("model"), "choices": [{"index": 0, "text": self.content(body),
                                                                           "finish_reason": "stop"}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        body, failed = await self._accept(request)
        if failed is not None:
            return failed
        return web.json_response({"object": "list", "model": body.get("model"),
                                  "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]})

    async def models(self, request: web.Request) -> web.Response:
        # the proxy's active health check lands here too: kept apart from the completions
        self.model_requests.append({"auth": request.headers.getall("Authorization", [])})
        return web.json_response({"data": [{"id": "fake/model-a"}, {"id": "fake/model-b"}]})
