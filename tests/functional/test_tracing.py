"""OpenTelemetry traces end to end, into a real OpenTelemetry Collector (tests/support/otel.py: its OTLP
receiver and the contrib file exporter): the span tree of a retried request, of a fallback, of a model
failover and of a Redis pipeline; the app's traceparent continued and the attempt's injected upstream;
gRPC as well as http/protobuf; an exporter that is away never slows or fails the data path (its queue
is bounded and drops are counted); and tracing off imports nothing of the SDK."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import aiohttp
import pytest
import redis.asyncio as aredis
from aiohttp import web

from tests.support.fake_openai import FakeOpenAI
from tests.support.net import free_port
from tests.support.otel import Collector
from tests.support.wait import eventually

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"
SERVER, CLIENT = 2, 3  # SpanKind in OTLP JSON
_names = itertools.count(1)


@pytest.fixture
def collector():
    c = Collector().start()
    yield c
    c.stop()


def tracing(c: Collector, **kw) -> dict:
    return {"enabled": True, "endpoint": c.http, **kw}


async def spans_of(c: Collector, trace_id: str | None = None, *, at_least: int = 1, where=None) -> list[dict]:
    """The spans the Collector wrote (of one trace), once at least `at_least` are there."""
    async def enough():
        found = [s for s in c.spans() if (trace_id is None or s["trace"] == trace_id) and (where is None or where(s))]
        return found if len(found) >= at_least else None

    return await eventually(enough, what=f"{at_least} spans reached the Collector's file exporter")


def _kind(spans, kind):
    return [s for s in spans if s["kind"] == kind]


async def test_a_retried_request_is_one_server_span_with_a_client_span_per_attempt(collector, start_proxy,
                                                                                  aiohttp_server):
    seen = []

    async def flaky(request):
        seen.append(request.headers.get("traceparent"))
        return web.Response(status=503 if len(seen) == 1 else 200, text="ok")

    app = web.Application()
    app.router.add_get("/{p:.*}", flaky)
    server = await aiohttp_server(app)
    name = f"t{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector),
           "upstreams": {name: {"listen": f"127.0.0.1:{free_port()}", "retry": {"attempts": 3, "backoff_base": "1ms"},
                                "targets": [{"name": "stable", "url": f"http://127.0.0.1:{server.port}"}]}}}
    await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{cfg['upstreams'][name]['listen']}/items/1", headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
    spans = await spans_of(collector, APP_TRACE, at_least=3)
    (srv,) = _kind(spans, SERVER)
    attempts = sorted(_kind(spans, CLIENT), key=lambda s: s["attributes"].get("http.request.resend_count", 0))
    assert srv["parent"] == APP_SPAN and srv["name"] == f"GET {name}"  # the app's trace continued
    assert srv["attributes"]["http.response.status_code"] == 200 and srv["attributes"]["resilience.track"] == "stable"
    assert srv["attributes"]["resilience.attempts"] == 2 and srv["resource"]["service.name"] == "resilience-proxy"
    assert [a["parent"] for a in attempts] == [srv["span"]] * 2
    first, second = attempts
    assert "http.request.resend_count" not in first["attributes"] and second["attributes"]["http.request.resend_count"] == 1
    assert first["attributes"]["http.response.status_code"] == 503 and first["status"].get("code") == 2  # ERROR
    assert second["attributes"]["resilience.breaker.state"] == "closed"
    # what the upstream got: each attempt's own context, so its spans hang under that attempt
    assert seen == [f"00-{APP_TRACE}-{a['span']}-01" for a in attempts]


async def test_a_fallback_says_which_and_why_on_the_server_span(collector, start_proxy, make_upstream):
    up = await make_upstream()
    name = f"t{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector),
           "upstreams": {name: {"listen": f"127.0.0.1:{free_port()}", "retry": {"attempts": 1},
                                "targets": [{"name": "stable", "url": up.url}], "fallback": {"cache_ttl": "1ms"}}}}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x") as r:
            assert r.status == 200
        async def failing(request):
            return web.Response(status=500)

        up.behaviour = failing
        async with s.get(p.url + "/x") as r:
            assert r.headers["X-Fallback"] == "stale"
    spans = await spans_of(collector, at_least=2, where=lambda s: s["kind"] == SERVER and
                           s["attributes"].get("resilience.upstream") == name)
    fb = [s for s in spans if s["attributes"].get("resilience.fallback")]
    assert len(fb) == 1
    assert fb[0]["attributes"]["resilience.fallback"] == "stale"
    assert fb[0]["attributes"]["resilience.fallback_reason"] == "upstream_5xx"
    assert fb[0]["attributes"]["resilience.outcome"] == "fallback"
    (attempt,) = [s for s in collector.spans() if s["trace"] == fb[0]["trace"] and s["kind"] == CLIENT]
    assert attempt["attributes"]["http.response.status_code"] == 500 and attempt["parent"] == fb[0]["span"]


async def test_a_model_failover_shows_each_model_asked_and_the_one_that_answered(collector, start_proxy,
                                                                                aiohttp_server):
    import openai

    fake = FakeOpenAI()
    fake.fail_models = {"big"}
    server = await aiohttp_server(fake.app())
    name = f"llm{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector),
           "upstreams": {name: {"protocol": "openai", "listen": f"127.0.0.1:{free_port()}",
                                "targets": [{"name": "stable", "url": f"http://127.0.0.1:{server.port}"}],
                                "retry": {"attempts": 1}, "health": {"enabled": False},
                                "llm": {"fallback_models": ["small"], "degraded": {"enabled": False}}}}}
    await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=f"http://{cfg['upstreams'][name]['listen']}/api/v1", api_key="sk-test",
                                max_retries=0, default_headers={"traceparent": TRACEPARENT})
    r = await client.chat.completions.create(model="big", messages=[{"role": "user", "content": "secret prompt"}])
    assert r.model == "small"
    spans = await spans_of(collector, APP_TRACE, at_least=3)
    (srv,) = _kind(spans, SERVER)
    a = srv["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "big"
    assert a["gen_ai.response.model"] == "small" and a["resilience.model_fallback"] == "small"
    assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens and a["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    asked = [(s["attributes"]["gen_ai.request.model"], s["attributes"]["http.response.status_code"])
             for s in sorted(_kind(spans, CLIENT), key=lambda s: s["attributes"].get("http.request.resend_count", 0))]
    assert asked == [("big", 500), ("small", 200)]
    assert all(s["parent"] == srv["span"] for s in _kind(spans, CLIENT))
    assert "secret prompt" not in json.dumps(spans)  # no prompt text unless capture_content


async def test_a_redis_pipeline_is_one_span_with_the_command_names_only(collector, start_proxy, redis_server):
    name = f"r{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector, protocol="grpc",
                                                                                 endpoint=collector.grpc),
           "upstreams": {name: {"protocol": "redis", "listen": f"127.0.0.1:{free_port()}",
                                "targets": [{"name": "stable", "url": redis_server + "/3"}]}}}
    await start_proxy(cfg)
    r = aredis.Redis.from_url(f"redis://{cfg['upstreams'][name]['listen']}/0")
    try:
        async with r.pipeline(transaction=False) as pipe:
            pipe.set("tracing-key", "secret-value").get("tracing-key").incr("tracing-n")
            assert (await pipe.execute())[1] == b"secret-value"
    finally:
        await r.aclose()
    spans = await spans_of(collector, at_least=1, where=lambda s: s["attributes"].get("resilience.upstream") == name
                           and s["attributes"].get("db.operation.name") == "PIPELINE")
    (p,) = spans
    assert p["kind"] == CLIENT and p["attributes"]["db.system.name"] == "redis"
    assert p["attributes"]["db.operation.batch.size"] == 3
    assert p["attributes"]["resilience.redis.commands"] == ["SET", "GET", "INCRBY"]  # redis-py sends INCR as INCRBY
    everything = json.dumps(collector.spans())
    assert "secret-value" not in everything and "tracing-key" not in everything  # never an argument


async def test_an_exporter_that_is_away_never_fails_a_request_and_every_lost_span_is_counted(
        start_proxy, make_upstream, metrics):
    up = await make_upstream()
    name = f"t{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"},
           "tracing": {"enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}", "max_queue": 4, "timeout": "1s"},
           "upstreams": {name: {"listen": f"127.0.0.1:{free_port()}", "targets": [{"name": "stable", "url": up.url}]}}}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for i in range(60):
            async with s.get(p.url + f"/x{i}") as r:
                assert r.status == 200
    # two spans a request, none delivered: each is lost from the full queue or in a failed export, and
    # counted as one or the other (at most a queue's worth can still be waiting)
    async def lost():
        n = sum(metrics.added("tracing_spans_dropped_total", reason=r) for r in ("queue_full", "export_failed"))
        return n if n >= 120 - 4 else None

    await eventually(lost, what="every span the Collector never got is counted")
    assert metrics.added("tracing_spans_dropped_total", reason="export_failed") > 0  # the Collector is away


def test_tracing_off_imports_nothing_of_the_sdk(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"admin": {"listen": f"127.0.0.1:{free_port()}"},
                               "upstreams": {"db": {"listen": f"127.0.0.1:{free_port()}",
                                                    "targets": [{"name": "stable", "url": "http://127.0.0.1:1"}]}}}))
    script = (f"import asyncio, sys\nfrom proxy.app import ProxyApp\nfrom proxy.settings import load\n"
              f"async def main():\n    app = ProxyApp({str(cfg)!r})\n    await app.start(load({str(cfg)!r}))\n"
              f"    await app.close()\n    print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
              f"asyncio.run(main())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


async def test_sampling_follows_the_apps_decision_and_the_ratio_for_the_rest(collector, start_proxy, aiohttp_server):
    seen = []

    async def ok(request):
        seen.append(request.headers.get("traceparent"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{p:.*}", ok)
    server = await aiohttp_server(app)
    name = f"t{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector, sample_ratio=0),
           "upstreams": {name: {"listen": f"127.0.0.1:{free_port()}", "fallback": {"cache_entries": 0},
                                "targets": [{"name": "stable", "url": f"http://127.0.0.1:{server.port}"}]}}}
    p = await start_proxy(cfg)
    unsampled = f"00-{APP_TRACE[::-1]}-{APP_SPAN}-00"
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"traceparent": unsampled}, {"traceparent": TRACEPARENT}):
            async with s.get(p.url + "/x", headers=headers) as r:
                assert r.status == 200
    # ratio 0: nothing of its own; the app's unsampled context passes through untouched; the app's
    # sampled one is followed whatever the ratio
    assert seen[0] is None and seen[1] == unsampled and seen[2].startswith(f"00-{APP_TRACE}-")
    spans = await spans_of(collector, APP_TRACE, at_least=2)
    assert {s["kind"] for s in spans} == {SERVER, CLIENT}
    assert {s["trace"] for s in collector.spans() if s["attributes"].get("resilience.upstream") == name} == {APP_TRACE}


def test_the_sampling_decision():
    from proxy.obs.tracing import Tracing
    from proxy.settings.spec import TracingSpec

    t = Tracing.__new__(Tracing)  # the decision alone: no exporter
    t.spec = TracingSpec(enabled=True, sample_ratio=0.25)
    assert t.sampled({}, rand=lambda: 0.2) and not t.sampled({}, rand=lambda: 0.3)
    assert t.sampled({"traceparent": TRACEPARENT}, rand=lambda: 0.99)
    assert not t.sampled({"traceparent": TRACEPARENT[:-2] + "00"}, rand=lambda: 0.0)
    assert t.sampled({"traceparent": "garbage"}, rand=lambda: 0.1)  # unreadable: as if none was sent


async def test_credentials_in_a_target_url_never_reach_a_span_and_a_cut_body_is_an_error(
        collector, start_proxy, raw_upstream):
    """user:password@ in a target URL (sent as Basic auth) is never exported; an answer whose body broke
    after its headers is an error on the server span, whatever its status line said."""
    import asyncio

    async def cut(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70000)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    url = await raw_upstream(cut)
    name = f"t{next(_names)}"
    target = url.replace("http://", "http://svcuser:s3cr3t-pw@")
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector),
           "upstreams": {name: {"listen": f"127.0.0.1:{free_port()}", "retry": {"attempts": 1},
                                "fallback": {"cache_entries": 0}, "targets": [{"name": "stable", "url": target}]}}}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(p.url + "/big", headers={"traceparent": TRACEPARENT}) as r:
                await r.read()
    spans = await spans_of(collector, APP_TRACE, at_least=2)
    everything = json.dumps(spans)
    assert "s3cr3t-pw" not in everything and "svcuser" not in everything
    (attempt,) = _kind(spans, CLIENT)
    assert attempt["attributes"]["server.address"] == "127.0.0.1"
    (srv,) = _kind(spans, SERVER)
    assert srv["attributes"]["resilience.result"] == "reset" and srv["status"].get("code") == 2


async def test_a_stream_cut_and_continued_is_one_server_span_with_both_attempts(collector, start_proxy,
                                                                              aiohttp_server):
    import openai

    fake = FakeOpenAI()
    fake.cut_after, fake.fault_times = 3, 1  # the first stream is cut after three chunks, once
    server = await aiohttp_server(fake.app())
    name = f"llm{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector),
           "upstreams": {name: {"protocol": "openai", "listen": f"127.0.0.1:{free_port()}",
                                "targets": [{"name": "stable", "url": f"http://127.0.0.1:{server.port}"}],
                                "health": {"enabled": False}, "llm": {"degraded": {"enabled": False}}}}}
    await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=f"http://{cfg['upstreams'][name]['listen']}/api/v1", api_key="sk-test",
                                max_retries=0, default_headers={"traceparent": TRACEPARENT})
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True, stream_options={"include_usage": True})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == fake.content({"messages": [{"role": "user", "content": "hi"}]})  # whole, once
    spans = await spans_of(collector, APP_TRACE, at_least=3)
    (srv,) = _kind(spans, SERVER)
    attempts = _kind(spans, CLIENT)
    assert len(attempts) == 2 and all(a["parent"] == srv["span"] for a in attempts)  # the first, its continuation
    assert all(a["attributes"]["gen_ai.request.model"] == "m" for a in attempts)
    assert srv["attributes"]["resilience.stream.continuations"] == 1
    assert srv["attributes"]["gen_ai.response.finish_reasons"] == ["stop"]


async def test_redis_batches_are_sampled_by_the_ratio(collector, start_proxy, redis_server, monkeypatch):
    from proxy.obs import tracing as tracing_module

    draws = iter([0.05, 0.5, 0.05, 0.9])  # two of four batches under the ratio of 0.1
    monkeypatch.setattr(tracing_module, "random", type("R", (), {"random": staticmethod(lambda: next(draws, 0.99))}))
    name = f"r{next(_names)}"
    cfg = {"admin": {"listen": f"127.0.0.1:{free_port()}"}, "tracing": tracing(collector, sample_ratio=0.1),
           "upstreams": {name: {"protocol": "redis", "listen": f"127.0.0.1:{free_port()}",
                                "targets": [{"name": "stable", "url": redis_server + "/4"}]}}}
    await start_proxy(cfg)
    import asyncio

    host, port = cfg["upstreams"][name]["listen"].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))  # raw RESP: one batch per command, no
    try:                                                              # handshake of a client library
        for i, cmd in enumerate((b"SET", b"GET", b"INCR", b"DEL")):
            args = [cmd, f"k{i}".encode()] + ([b"v"] if cmd == b"SET" else [])
            writer.write(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
            await writer.drain()
            assert await reader.readline()
    finally:
        writer.close()
    spans = await spans_of(collector, at_least=2, where=lambda s: s["attributes"].get("resilience.upstream") == name)
    assert sorted(s["attributes"]["db.operation.name"] for s in spans) == ["INCR", "SET"]  # the 1st and 3rd
