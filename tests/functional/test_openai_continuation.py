"""Mid-stream recovery by continuation (issue 16): a stream that breaks after events reached the app —
cut, stalled, an in-band error event, a malformed event — is asked again with the text sent so far as an
assistant prefill, and the rest is spliced into the app's stream. The real `openai` SDK reads it; the
fake provider (tests/support/fake_openai.py) continues a prefill as providers that support it do."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from proxy.llm import sse
from tests.support.proxy import upstream_config

MSG = [{"role": "user", "content": "hi"}]


def llm_config(url, **sections):
    sections.setdefault("breaker", {"fail_max": 100})
    return upstream_config(url, protocol="openai", **sections)


def client(p) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=p.url + "/api/v1", api_key="sk-app-placeholder", max_retries=0)


async def _raw_events(p, body) -> list[bytes]:
    async with aiohttp.ClientSession() as s, s.post(p.url + "/api/v1/chat/completions", json=body) as r:
        assert r.status == 200
        raw = await r.read()
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


def _chunks(events: list[bytes]) -> list[dict]:
    return [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]


@pytest.mark.parametrize("fault", ["cut_after", "stall_after", "error_after", "malformed_after"])
async def test_a_broken_stream_is_continued_into_one_whole_answer(fake, start_proxy, metrics, fault):
    name, cfg = llm_config(fake.url, timeouts={"idle": "1s"})
    p = await start_proxy(cfg)
    setattr(fake, fault, 4)
    fake.fault_times = 1
    events = await _raw_events(p, {"model": "fake/a", "messages": MSG, "stream": True})
    chunks = _chunks(events)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == fake.content({"messages": MSG})
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}, "one completion id for the whole answer"
    assert sum("role" in c["choices"][0]["delta"] for c in chunks if c["choices"]) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == ["stop"]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage == [{"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17}]
    assert events[-1] == sse.DONE and events.count(sse.DONE) == 1
    assert not any(b'"error"' in e for e in events), "the in-band error never reaches the app"
    sent = "".join(fake.pieces(fake.content({"messages": MSG}))[:4])
    assert fake.requests[1]["body"]["messages"] == [*MSG, {"role": "assistant", "content": sent.rstrip()}]
    # the break is a failure of the model's breaker, the continuation's whole answer the success after it
    # (a consecutive count back at 0); the track's breaker saw only answers
    mb = p.model_breaker()
    assert mb.last_failure == "the answer failed after its headers were sent" and mb.cb.fail_counter == 0
    assert p.breaker.cb.fail_counter == 0 and p.breaker.last_failure is None
    assert metrics.delta("llm_stream_recoveries_total", name=name, outcome="recovered") == 1
    assert metrics.delta("llm_tokens_total", name=name, model="other", kind="completion") == 10


async def test_the_seam_whitespace_is_sent_once(fake, start_proxy):
    """A prefill goes without its trailing whitespace (providers refuse it), so the model sends it
    again: the app, which has it already, must not get it twice."""
    name, cfg = llm_config(fake.url)
    p = await start_proxy(cfg)
    pieces = fake.pieces(fake.content({"messages": MSG}))
    k = next(i for i in range(1, len(pieces)) if "".join(pieces[:i]).endswith(" "))
    fake.cut_after, fake.fault_times = k, 1
    stream = await client(p).chat.completions.create(model="fake/a", messages=MSG, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == fake.content({"messages": MSG})
    assert fake.requests[1]["body"]["messages"][-1]["content"] == "".join(pieces[:k]).rstrip()


async def test_the_continuation_goes_to_a_fallback_model_that_takes_prefill_and_learns_who_does_not(
        fake, start_proxy, metrics):
    """The primary is cut mid-stream and then down; the first fallback refuses prefill (400), the second
    continues. The refusal is never what the app sees, and the next break skips that model."""
    name, cfg = llm_config(fake.url, retry={"attempts": 1},
                           llm={"fallback_models": ["fake/b", "fake/c"], "continuation": {"max": 2}})
    p = await start_proxy(cfg)
    fake.no_prefill_models = {"fake/b"}
    fake.fault_models, fake.cut_after = {"fake/a"}, 4

    async def ask(question):
        fake.fail_models = set()
        stream = await client(p).chat.completions.create(model="fake/a", messages=question, stream=True)
        out = []
        async for ch in stream:
            if ch.choices:
                out.append(ch.choices[0].delta.content or "")
                if len(out) == 2:
                    fake.fail_models = {"fake/a"}  # down from now on: the continuation must move on
        return "".join(out)

    assert await ask(MSG) == fake.content({"messages": MSG})
    assert [(a[0], a[2]) for a in fake.attempts] == [("fake/a", "cut"), ("fake/a", "500"), ("fake/b", "400"),
                                                    ("fake/c", "ok")]
    fake.attempts.clear()
    q2 = [{"role": "user", "content": "again"}]
    assert await ask(q2) == fake.content({"messages": q2})
    assert [(a[0], a[2]) for a in fake.attempts] == [("fake/a", "cut"), ("fake/a", "500"), ("fake/c", "ok")]
    assert metrics.delta("llm_stream_recoveries_total", name=name, outcome="recovered") == 2


async def test_when_nothing_can_continue_the_app_gets_the_original_failure_then_done(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url, retry={"attempts": 1},
                           llm={"fallback_models": ["fake/b"], "continuation": {"no_prefill_models": ["fake/a"]}})
    p = await start_proxy(cfg)
    fake.no_prefill_models = {"fake/b"}
    fake.fault_models, fake.cut_after = {"fake/a"}, 4
    events = await _raw_events(p, {"model": "fake/a", "messages": MSG, "stream": True})
    assert events[-1] == sse.DONE
    assert json.loads(events[-2][6:]) == {"error": {"message": "the upstream stream was interrupted",
                                                    "type": "upstream_error", "code": 502}}
    # fake/a is configured as no-prefill: not asked; fake/b refused: the app never sees its 400
    assert [(a[0], a[2]) for a in fake.attempts] == [("fake/a", "cut"), ("fake/b", "400")]
    assert metrics.delta("llm_stream_recoveries_total", name=name, outcome="failed") == 1
    # a broken answer is not a completion: no tokens counted (nor spend)
    assert metrics.family_delta("llm_tokens_total", name=name) == 0


async def test_continuation_is_bounded_by_max(fake, start_proxy, metrics):
    """Every part is cut: two continuations (max 2), then the error event — not an endless loop."""
    name, cfg = llm_config(fake.url, llm={"continuation": {"max": 2}})
    p = await start_proxy(cfg)
    fake.chunks, fake.cut_after = 30, 2
    stream = await client(p).chat.completions.create(model="fake/a", messages=MSG, stream=True)
    with pytest.raises(openai.APIError) as ei:
        async for _ in stream:
            pass
    assert str(ei.value) == "the upstream stream was interrupted"
    assert len(fake.requests) == 3
    assert metrics.delta("llm_stream_recoveries_total", name=name, outcome="failed") == 1


async def test_continuation_off_gives_the_error_event(fake, start_proxy, metrics):
    name, cfg = llm_config(fake.url, llm={"continuation": {"enabled": False}})
    p = await start_proxy(cfg)
    fake.cut_after = 4
    stream = await client(p).chat.completions.create(model="fake/a", messages=MSG, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert len(fake.requests) == 1
    assert metrics.delta("llm_stream_recoveries_total", name=name, outcome="not_continuable") == 1


async def test_max_tokens_of_the_continuation_is_what_is_left(fake, start_proxy):
    name, cfg = llm_config(fake.url)
    p = await start_proxy(cfg)
    fake.cut_after, fake.fault_times = 4, 1
    stream = await client(p).chat.completions.create(model="fake/a", messages=MSG, stream=True, max_tokens=50)
    [ch async for ch in stream]
    assert fake.requests[1]["body"]["max_tokens"] == 46


@pytest.mark.parametrize("after", [b"", b'data: {"error": {"message": "late", "code": 502}}\n\n', b"data: {bad\n\n"])
async def test_a_break_after_every_choice_finished_is_a_whole_answer_not_continued(raw_upstream, start_proxy, after):
    """Found in review: a cut (or a late error or broken event) after the finish_reason chunk, before the
    usage chunk or [DONE], was "continued", and the app got text after "stop" and a second one."""
    import asyncio

    asked = []

    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        n = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        asked.append(await reader.readexactly(n))
        events = [json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}),
                  json.dumps({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})]
        body = b"".join(b"data: " + e.encode() + b"\n\n" for e in events) + after
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(body) + body + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # no terminating chunk: the connection is cut

    url = await raw_upstream(handler)
    name, cfg = llm_config(url)
    p = await start_proxy(cfg)
    events = await _raw_events(p, {"model": "m", "messages": MSG, "stream": True})
    chunks = _chunks(events)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get("finish_reason")] == ["stop"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hi"
    assert events[-1] == sse.DONE and not any(b'"error"' in e for e in events)
    assert len(asked) == 1
