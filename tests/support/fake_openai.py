"""A fake OpenAI-compatible upstream (OpenRouter-shaped paths): streams chunks (paced by delays or by a
gate the test opens chunk by chunk), fails on demand per model or for the first N calls, rate-limits,
stalls or cuts a stream mid-answer, and records every request (with every Authorization value)."""

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
        self.fail_first = 0               # the first N completions answer fail_all's status (then heal)
        self.rate_limit_reset: str | None = None  # X-RateLimit-Reset on failures
        self.gate: asyncio.Queue | None = None    # a stream sends chunk i > 0 only after a token is put
        self.stall_after: int | None = None       # a stream goes silent after this many chunks
        self.cut_after: int | None = None         # a stream's connection is dropped after this many chunks
        self.completions = 0

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
        last = body.get("messages", [{}])[-1].get("content", "") if body.get("messages") else body.get("prompt", "")
        return "".join(WORDS[: self.chunks]) + f" [{last}]"

    async def _accept(self, request):
        """Read and record a request → (body, the failure to answer instead, if one is configured)."""
        body = await request.json()
        self._record(request, body)
        return body, await self._gate(body)

    async def _gate(self, body):
        self.completions += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.slow:
            await asyncio.sleep(self.slow)
        failing = self.fail_all is not None and (not self.fail_first or self.completions <= self.fail_first)
        if failing:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            if self.rate_limit_reset:
                headers["X-RateLimit-Reset"] = self.rate_limit_reset
            return web.json_response({"error": {"message": "fake failure", "code": self.fail_all}},
                                     status=self.fail_all, headers=headers)
        if body.get("model") in self.rate_limit_models:
            return web.json_response({"error": {"message": "rate limited", "code": 429}}, status=429)
        if body.get("model") in self.fail_models:
            return web.json_response({"error": {"message": "model down", "code": 500}}, status=500)
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, failed = await self._accept(request)
        if failed is not None:
            return failed
        cid, model, created = f"chatcmpl-{len(self.requests)}", body.get("model", "m"), 1700000000
        text = self.content(body)
        usage = {"prompt_tokens": 7, "completion_tokens": self.chunks, "total_tokens": 7 + self.chunks}
        if not body.get("stream"):
            return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                   "finish_reason": "stop"}], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pieces = [text[i * len(text) // self.chunks:(i + 1) * len(text) // self.chunks] for i in range(self.chunks)]
        try:
            for i, piece in enumerate(pieces):
                if i == self.stall_after:
                    await asyncio.Event().wait()  # silent from here on
                if i == self.cut_after:
                    request.transport.close()  # the provider's connection dies mid-answer
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
        final = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
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
