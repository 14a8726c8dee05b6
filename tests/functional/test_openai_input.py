"""What a client sends to the openai listener never reaches a 500: JSON Python can read but not write
back (a lone surrogate, deep nesting), and answers that cannot be replayed (a maintenance page, SSE text
asked for with a non-boolean "stream") are not cached, so they are never served as a completion."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from tests.support.proxy import upstream_config

COMPLETION = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def _upstream(aiohttp_server, answers):
    """An upstream answering each POST with the next of `answers` (status, content type, body)."""
    seen = []

    async def chat(request):
        seen.append(await request.read())
        status, ctype, body = answers[min(len(seen), len(answers)) - 1]
        return web.Response(status=status, body=body, content_type=ctype)

    app = web.Application()
    app.router.add_post("/api/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", seen


async def _post(url, body: bytes, **headers):
    async with aiohttp.ClientSession() as s, s.post(url + "/api/v1/chat/completions", data=body,
                                                    headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


async def test_a_lone_surrogate_is_forwarded_as_sent(aiohttp_server, start_proxy):
    import json
    url, seen = await _upstream(aiohttp_server, [(200, "application/json", json.dumps(COMPLETION).encode())])
    _, cfg = upstream_config(url, protocol="openai", llm={"fallback_models": ["other/model"]})
    p = await start_proxy(cfg)
    body = b'{"model":"m","messages":[{"role":"user","content":"\\ud800 and \\udfff"}]}'
    status, _, _ = await _post(p.url, body)
    assert status == 200 and seen == [body]


async def test_json_nested_deeper_than_it_can_be_written_back_is_a_400(aiohttp_server, start_proxy):
    url, seen = await _upstream(aiohttp_server, [(500, "application/json", b"{}")])
    _, cfg = upstream_config(url, protocol="openai", llm={"fallback_models": ["other/model"]})
    p = await start_proxy(cfg)
    for depth in (*range(900, 1000, 5), 5000, 100_000):
        deep = b'{"model":"m","messages":[{"role":"user","content":"x"}],"x":' + b"[" * depth + b"]" * depth + b"}"
        status, ctype, body = await _post(p.url, deep)
        assert status == 400 and b"nested" in body and ctype.startswith("application/json"), (depth, status, body[:200])
    assert seen == []


async def test_a_maintenance_page_is_not_cached_nor_replayed_to_a_streaming_caller(aiohttp_server, start_proxy):
    url, seen = await _upstream(aiohttp_server, [(200, "text/html", b"<html>down for maintenance</html>"),
                                                 (503, "application/json", b'{"error": {"message": "down"}}')])
    _, cfg = upstream_config(url, protocol="openai", retry={"attempts": 1}, llm={"degraded": {"enabled": False}})
    p = await start_proxy(cfg)
    req = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    status, ctype, body = await _post(p.url, req)
    assert status == 200 and body == b"<html>down for maintenance</html>"  # passed on as it came
    streaming = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    status, ctype, body = await _post(p.url, streaming)
    assert status == 503 and b"maintenance" not in body  # the upstream's error, not the page as SSE
    status, _, body = await _post(p.url, req, **{"X-Proxy-Cache": "only-if-cached"})
    assert status == 504  # nothing was stored


async def test_sse_text_answered_to_a_non_boolean_stream_is_not_cached_as_json(aiohttp_server, start_proxy):
    sse_text = b'data: {"id":"c","object":"chat.completion.chunk","choices":[]}\n\ndata: [DONE]\n\n'
    url, _ = await _upstream(aiohttp_server, [(200, "text/event-stream", sse_text),
                                              (503, "application/json", b'{"error": {"message": "down"}}')])
    _, cfg = upstream_config(url, protocol="openai", retry={"attempts": 1}, llm={"degraded": {"enabled": False}})
    p = await start_proxy(cfg)
    req = b'{"model":"m","stream":"yes","messages":[{"role":"user","content":"hi"}]}'
    status, ctype, body = await _post(p.url, req)
    assert status == 200 and ctype.startswith("text/event-stream") and body == sse_text
    status, ctype, body = await _post(p.url, req)
    assert status == 503 and b"chat.completion.chunk" not in body  # the upstream's error, not the SSE as JSON
    status, _, _ = await _post(p.url, req, **{"X-Proxy-Cache": "only-if-cached"})
    assert status == 504


async def test_a_valid_completion_is_still_cached_and_replayed(aiohttp_server, start_proxy):
    import json
    url, _ = await _upstream(aiohttp_server, [(200, "application/json", json.dumps(COMPLETION).encode()),
                                              (503, "application/json", b'{"error": {"message": "down"}}')])
    _, cfg = upstream_config(url, protocol="openai", retry={"attempts": 1})
    p = await start_proxy(cfg)
    req = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    assert (await _post(p.url, req))[0] == 200
    status, ctype, body = await _post(p.url, req.replace(b'"model"', b'"stream":true,"model"'))
    assert status == 200 and ctype.startswith("text/event-stream") and b'"content":"ok"' in body


async def test_one_event_over_max_body_leaves_a_healthy_stream_healthy(aiohttp_server, start_proxy, metrics):
    """An event larger than fallback.max_body only stops the caching: the client gets the stream as sent,
    one [DONE] and no error event, and five such streams do not open the breaker."""
    import json

    def event(doc) -> bytes:
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    body = (event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]})
            + event({**chunk, "choices": [{"index": 0, "delta": {"content": "b" * 200_000}}]})
            + event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n")
    url, _ = await _upstream(aiohttp_server, [(200, "text/event-stream", body)])
    name, cfg = upstream_config(url, protocol="openai", fallback={"max_body": "64KiB"}, breaker={"fail_max": 5})
    p = await start_proxy(cfg)
    req = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    for _ in range(6):
        status, ctype, got = await _post(p.url, req)
        assert status == 200 and got == body  # as sent: no error event, one [DONE]
    assert metrics.family_delta("circuit_breaker_opened_total", name=name) == 0
    assert metrics.family_delta("upstream_requests_total", name=name, status="reset") == 0
    status, _, _ = await _post(p.url, req, **{"X-Proxy-Cache": "only-if-cached"})
    assert status == 504  # the copy missed the large event: not cached


@pytest.mark.parametrize("body", [b'{"model":["x"],"messages":[]}', b'{"model":{"a":1},"stream":true,"messages":[]}',
                                  b'{"model":5,"messages":[]}'])
async def test_a_model_that_is_not_a_string_is_a_400(aiohttp_server, start_proxy, body):
    """Found in review: failover keeps the models it tried in a set, and a list is not hashable (a 500)."""
    url, seen = await _upstream(aiohttp_server, [(200, "application/json", b"{}")])
    _, cfg = upstream_config(url, protocol="openai", llm={"fallback_models": ["other/model"]})
    p = await start_proxy(cfg)
    status, _, answer = await _post(p.url, body)
    assert status == 400 and b"model must be a string" in answer and seen == []


@pytest.mark.parametrize("messages", [b"5", b"true", b'"text"', b"null", b'[1, "a", null]'])
async def test_odd_messages_with_limits_on_are_forwarded_not_a_500(aiohttp_server, start_proxy, messages):
    url, seen = await _upstream(aiohttp_server, [(400, "application/json", b'{"error": {"message": "bad"}}')])
    _, cfg = upstream_config(url, protocol="openai", llm={"limits": {"tokens_per_minute": 1000}})
    p = await start_proxy(cfg)
    status, _, _ = await _post(p.url, b'{"model":"m","messages":' + messages + b"}")
    assert status == 400 and len(seen) == 1  # the provider's own verdict on it


async def test_a_choice_index_that_is_not_a_number_does_not_cut_a_finished_stream(aiohttp_server, start_proxy):
    import json

    def event(doc) -> bytes:
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    body = (event({"id": "c", "choices": [{"index": "one", "delta": {"role": "assistant", "content": "a"},
                                           "finish_reason": "stop"}]})
            + event({"id": "c", "choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}]})
            + b"data: [DONE]\n\n")
    url, _ = await _upstream(aiohttp_server, [(200, "text/event-stream", body)])
    _, cfg = upstream_config(url, protocol="openai", llm={"continuation": {"enabled": False}})
    p = await start_proxy(cfg)
    status, _, got = await _post(p.url, b'{"model":"m","stream":true,"messages":[{"role":"user","content":"q"}]}')
    # found in review: sorting the choices' indices raised and cut the app's stream mid-chunk; an index
    # that is not a number is now not a choice the proxy can vouch for: the stream ends in-band
    assert status == 200 and got.startswith(body[:40]) and got.endswith(b"data: [DONE]\n\n")
    assert b'"error"' in got
