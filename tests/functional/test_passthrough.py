"""Pass-through fidelity against a real aiohttp upstream."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.support.net import free_port, raw_head
from tests.support.proxy import upstream_config
from tests.support.upstreams import Gate
from tests.support.wait import eventually


async def test_methods_query_and_body_pass_unchanged(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            async with s.request(method, p.url + "/a%2Fb/c?x=%20y&y=a+b&flag&x=2", data=b"payload" if method != "GET" else None) as r:
                assert r.status == 200
                await r.read()
    assert [r["method"] for r in upstream.requests] == ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    assert {r["path_qs"] for r in upstream.requests} == {"/a%2Fb/c?x=%20y&y=a+b&flag&x=2"}
    assert upstream.requests[1]["body"] == b"payload"


async def test_headers_hop_by_hop_stripped_and_configured_headers_replace(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, request_headers={"Authorization": "Bearer proxy-key", "X-Team": "core"})
    p = await start_proxy(cfg)

    async def answer(request):
        return web.Response(text="ok", headers={"X-Up": "1", "Keep-Alive": "timeout=5", "Connection": "keep-alive"})

    upstream.behaviour = answer
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/h", headers={
            "Authorization": "Bearer app-placeholder", "X-Custom": "v", "Keep-Alive": "300", "TE": "trailers",
            "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "secret", "Proxy-Authorization": "Basic x",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "a=1",
            "X-Forwarded-For": "10.0.0.1",
        }) as r:
            assert r.status == 200
            assert r.headers["X-Up"] == "1"
            assert "Keep-Alive" not in r.headers
            rid = r.headers["X-Request-Id"]
            assert len(rid) >= 16
    h = upstream.requests[0]["headers"]
    assert h.getall("Authorization") == ["Bearer proxy-key"]
    assert h["X-Team"] == "core" and h["X-Custom"] == "v"
    for gone in ("Keep-Alive", "TE", "X-Drop-Me", "Proxy-Authorization"):
        assert gone not in h, gone
    assert h["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert h["tracestate"] == "a=1"
    assert h["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["Host"] == upstream.url.removeprefix("http://")
    assert h["X-Request-Id"] == rid


async def test_request_id_kept_when_given(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/", headers={"X-Request-Id": "abc-123"}) as r:
            assert r.headers["X-Request-Id"] == "abc-123"
    assert upstream.requests[0]["headers"]["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304, 400, 404, 418, 500, 503])
async def test_statuses_pass_through(upstream, start_proxy, metrics, status):
    name, cfg = upstream_config(upstream.url, retry={"attempts": 1}, breaker={"fail_max": 100})

    async def answer(request):
        if status in (204, 304):
            return web.Response(status=status)
        return web.Response(status=status, text=f"s{status}", headers={"Location": "/x"} if status == 301 else None)

    upstream.behaviour = answer
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/s", allow_redirects=False) as r:
            assert r.status == status
            body = await r.read()
            assert body == (b"" if status in (204, 304) else f"s{status}".encode())
            if status == 301:
                assert r.headers["Location"] == "/x"
    assert metrics.delta("upstream_requests_total", name=name, track="stable", route="default", status=str(status),
                         outcome="upstream") == 1


async def test_head_has_length_but_no_body(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)

    async def answer(request):
        return web.Response(body=b"x" * 1234)

    upstream.behaviour = answer
    p = await start_proxy(cfg)
    reader, writer = await asyncio.open_connection(*p.url.removeprefix("http://").split(":"))
    writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /h HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 1234" in head
    # the next bytes belong to the pipelined GET, proving the HEAD answer carried no body
    second = await reader.readuntil(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 200")
    assert len(await reader.readexactly(1234)) == 1234
    writer.close()


async def test_expect_100_continue(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    reader, writer = await asyncio.open_connection(*p.url.removeprefix("http://").split(":"))
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    assert upstream.requests[0]["body"] == b"hello"
    assert "Expect" not in upstream.requests[0]["headers"]


async def test_chunked_both_ways(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)

    async def answer(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
        await resp.write_eof()
        return resp

    upstream.behaviour = answer
    p = await start_proxy(cfg)

    async def gen():
        for i in range(3):
            yield f"c{i}".encode()

    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/chunk", data=gen()) as r:
            assert r.headers.get("Transfer-Encoding") == "chunked"
            assert await r.read() == b"part0;part1;part2;part3;part4;"
    assert upstream.requests[0]["body"] == b"c0c1c2"


async def test_100mb_streamed_both_ways_with_flat_memory(start_proxy, aiohttp_server):
    size = 100 * 1024 * 1024
    chunk = b"z" * (256 * 1024)
    received = {"n": 0}

    async def sink(request):
        async for data in request.content.iter_any():
            received["n"] += len(data)
        return web.json_response({"n": received["n"]})

    async def source(request):
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        for _ in range(size // len(chunk)):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=2 * size)
    app.router.add_post("/up", sink)
    app.router.add_get("/down", source)
    server = await aiohttp_server(app)
    name, cfg = upstream_config(f"http://127.0.0.1:{server.port}")
    p = await start_proxy(cfg)
    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss

    peak = base
    samples = []

    async def body():
        nonlocal peak
        for i in range(size // len(chunk)):
            if i % 8 == 0:  # RSS is not a peak: sample it while the upload is under way
                rss = proc.memory_info().rss
                samples.append((received["n"], rss))
                peak = max(peak, rss)
            yield chunk

    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/up", data=body(), headers={"Content-Length": str(size)}) as r:
            assert (await r.json())["n"] == size
        # the samples were taken while the upstream was receiving, not before it started or after it ended
        assert sum(1 for n, _ in samples if 0 < n < size) >= 10, samples[:3]
        got = 0
        async with s.get(p.url + "/down") as r:
            async for data in r.content.iter_any():
                got += len(data)
                if got % (8 * len(chunk)) < len(data):
                    peak = max(peak, proc.memory_info().rss)
        assert got == size
    # client, proxy and upstream share this process: flat means far below the 200 MB that moved
    assert peak - base < 40 * 1024 * 1024, (peak - base) / 1e6


async def test_limits_431_and_413_forward_nothing(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, limits={"max_header_bytes": "1KiB", "max_request_body": "1KiB"})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/", headers={"X-Big": "a" * 2000}) as r:
            assert r.status == 431
            err = (await r.json())["error"]
            assert err["type"] == "headers_too_large" and err["upstream"] == name and err["request_id"]
        async with s.post(p.url + "/", data=b"a" * 2000) as r:
            assert r.status == 413
            assert (await r.json())["error"]["type"] == "request_too_large"

        async def gen():
            for _ in range(4):
                yield b"b" * 600

        async with s.post(p.url + "/", data=gen()) as r:
            assert r.status == 413
    assert upstream.hits == 0


async def test_unsupported_requests_refused(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)

    async def raw(data: bytes) -> bytes:
        return await raw_head(p.url, data)

    assert (await raw(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")).startswith(b"HTTP/1.1 405")
    assert (await raw(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")).startswith(b"HTTP/1.1 400")
    ws = (b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert (await raw(ws)).startswith(b"HTTP/1.1 501")
    assert (await raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")).split(b" ")[1] == b"400"  # no HTTP/2
    assert upstream.hits == 0


async def test_connect_failure_is_502_with_json_error(start_proxy):
    name, cfg = upstream_config(f"http://127.0.0.1:{free_port()}", retry={"attempts": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/x", headers={"X-Request-Id": "rid-1"}) as r:
            assert r.status == 502
            err = (await r.json())["error"]
            assert err["type"] == "connect_failure"
            assert err["upstream"] == name and err["request_id"] == "rid-1"
            assert "cannot connect" in err["message"]


async def test_metrics_and_admin_endpoints(upstream, start_proxy, metrics):
    name, cfg = upstream_config(upstream.url, fallback={"cache_ttl": "1m"})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(p.url + "/m") as r:
                await r.read()
        async with s.get(p.admin + "/metrics") as r:
            text = await r.text()
        assert f'upstream_requests_total{{name="{name}",outcome="upstream",route="default",status="200",track="stable"}} 3.0' in text
        assert f'upstream_request_duration_seconds_count{{name="{name}",track="stable"}} 3.0' in text
        assert 'build_info{version="' in text
        assert f'upstream_in_flight{{name="{name}"}} 0.0' in text
        async with s.get(p.admin + "/health/live") as r:
            assert r.status == 200
        async with s.get(p.admin + "/health/ready") as r:
            assert r.status == 200
        # one request held at the upstream: in flight everywhere it is shown
        gate = Gate()
        upstream.behaviour = gate
        held = asyncio.create_task(s.get(p.url + "/held"))
        await eventually(lambda: gate.arrived == 1)
        assert metrics.value("upstream_in_flight", name=name) == 1
        async with s.get(p.admin + "/admin/upstreams") as r:
            data = (await r.json())[name]
        assert (data["protocol"], data["listen"], data["in_flight"]) == ("http", cfg["upstreams"][name]["listen"], 1)
        assert (data["retries_in_flight"], data["retry_budget"], data["retry_budget_exhausted"]) == (0, 3, 0)
        stable = data["targets"]["stable"]
        assert stable["url"] == upstream.url and (stable["weight"], stable["effective_weight"]) == (100, 100)
        assert stable["breaker"] == {"state": "closed", "failures": 0, "opened_total": 0, "last_failure": None}
        assert stable["pool"] == {"busy": 1, "pending": 0, "max_connections": 100}
        assert stable["canary"] is None
        assert data["cache"] == {"default": {"entries": 1, "bytes": data["cache"]["default"]["bytes"]}}
        assert data["cache"]["default"]["bytes"] > 0  # the /m answer, cached
        gate.open()
        (await held).release()
        await eventually(lambda: metrics.value("upstream_in_flight", name=name) == 0)


async def test_response_headers_are_not_invented(start_proxy, raw_upstream):
    """A raw upstream (no framework adding headers): its exact headers and body arrive. aiohttp's server
    labels a body without Content-Type as application/octet-stream, which RFC 9110 §8.3 makes equivalent."""

    async def answer(reader, writer):
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Exact: yes\r\n\r\nabc")
            await writer.drain()
        writer.close()

    name, cfg = upstream_config(await raw_upstream(answer))
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/") as r:
            assert await r.read() == b"abc"
            assert r.headers["X-Exact"] == "yes"
            assert r.headers.get("Content-Type", "application/octet-stream") == "application/octet-stream"


async def test_close_delimited_and_odd_upstream_answers(start_proxy, raw_upstream):
    """HTTP/1.0-style answers (no length: the body ends with the connection), a 204, and a 304 through
    the lean upstream client; the breaker stays closed."""

    async def answer(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1]
        if path == b"/close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Kind: close\r\n\r\nhello, until close")
            await writer.drain()
            writer.close()
            return
        if path == b"/http10":
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nold school")
            await writer.drain()
            writer.close()
            return
        code = b"204 No Content" if path == b"/204" else b"304 Not Modified"
        writer.write(b"HTTP/1.1 " + code + b"\r\nETag: x\r\n\r\n")
        await writer.drain()
        writer.close()

    name, cfg = upstream_config(await raw_upstream(answer), breaker={"fail_max": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/close") as r:
            assert r.status == 200 and await r.read() == b"hello, until close" and r.headers["X-Kind"] == "close"
        async with s.get(p.url + "/http10") as r:
            assert r.status == 200 and await r.read() == b"old school"
        async with s.get(p.url + "/204") as r:
            assert r.status == 204 and await r.read() == b""
        async with s.get(p.url + "/304") as r:
            assert r.status == 304 and r.headers["ETag"] == "x"
    assert p.upstream.targets[0].breaker.state == "closed"


async def test_egress_honours_http_proxy_and_no_proxy(start_proxy, monkeypatch):
    """HTTP_PROXY/HTTPS_PROXY/NO_PROXY, read once per pool: a forward proxy sees the absolute-form request."""
    seen = []

    async def forward_proxy(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nvia-proxy!")
        await writer.drain()
        writer.close()

    fp = await asyncio.start_server(forward_proxy, "127.0.0.1", 0)
    fp_port = fp.sockets[0].getsockname()[1]
    for v in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(v, raising=False)  # the lowercase ones win in urllib: none may leak in
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{fp_port}")
    name, cfg = upstream_config("http://127.0.0.3:8080")  # loopback only: nothing here may leave the machine
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/through?x=1") as r:
            assert r.status == 200 and await r.read() == b"via-proxy!"
    assert seen == [b"GET http://127.0.0.3:8080/through?x=1 HTTP/1.1"]
    # NO_PROXY: the same target reached directly (here: refused, since nothing listens there)
    monkeypatch.setenv("NO_PROXY", "127.0.0.3")
    name2, cfg2 = upstream_config("http://127.0.0.3:8080", retry={"attempts": 1})
    p2 = await start_proxy(cfg2)
    async with aiohttp.ClientSession() as s:
        async with s.get(p2.url + "/direct") as r:
            assert r.status == 502 and (await r.json())["error"]["type"] == "connect_failure"
    assert len(seen) == 1
    fp.close()


async def test_egress_honours_https_proxy_with_a_connect_tunnel(start_proxy, monkeypatch, aiohttp_server, tmp_path):
    """HTTPS_PROXY for an https:// target: a CONNECT tunnel through the forward proxy, TLS end to end.
    The target's name resolves nowhere but at the forward proxy, so an answer proves the tunnel."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("db.internal").configure_cert(server_ctx)

    async def secret(request):
        return web.json_response({"over": "tls", "host": request.headers["Host"]})

    app = web.Application()
    app.router.add_get("/{t:.*}", secret)
    tls_server = await aiohttp_server(app, ssl=server_ctx)
    connects = []

    async def forward_proxy(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        connects.append(head.split(b"\r\n")[0])
        ur, uw = await asyncio.open_connection("127.0.0.1", tls_server.port)  # "db.internal", as resolved here
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    fp = await asyncio.start_server(forward_proxy, "127.0.0.1", 0)
    for v in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{fp.sockets[0].getsockname()[1]}")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    name, cfg = upstream_config(f"https://db.internal:{tls_server.port}", retry={"attempts": 1})
    cfg["upstreams"][name]["targets"][0]["tls"] = {"ca_file": str(ca_file)}
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.get(p.url + "/rows?id=7") as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"over": "tls", "host": f"db.internal:{tls_server.port}"}
    assert connects == [f"CONNECT db.internal:{tls_server.port} HTTP/1.1".encode()]
    fp.close()


async def test_forwarded_and_cached_heads_keep_order_duplicates_and_drop_hop_by_hop(start_proxy, raw_upstream):
    """The head the app gets, byte for byte in what matters: the upstream's headers in order with their
    duplicates and UTF-8 values, without the hop-by-hop ones, the ones its Connection header lists, its own
    X-Request-Id or track header (the proxy's replace them, once). Then the same answer from the cache,
    once the upstream fails: the same headers plus Age/X-Fallback/X-Fallback-Reason, each once."""
    failing = asyncio.Event()

    async def answer(reader, writer):
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if failing.is_set():
                break  # closes without answering: a reset, which the cache covers
            writer.write("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-Dup: first\r\n"
                         "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
                         "X-Request-Id: upstream-made\r\nX-Canary-Track: upstream-made\r\nX-Dup: second\r\n"
                         "X-Fallback: upstream-made\r\nX-Name: caf\u00e9\r\nX-Z: last\r\n\r\nabc".encode())
            await writer.drain()
        writer.close()

    name, cfg = upstream_config(await raw_upstream(answer), retry={"attempts": 1})
    p = await start_proxy(cfg)
    request = b"GET /h HTTP/1.1\r\nHost: app\r\nX-Request-Id: app-rid\r\n\r\n"

    def header_lines(head: bytes) -> list[str]:
        return head.decode("utf-8").split("\r\n")[1:-2]

    fresh = header_lines(await raw_head(p.url, request))
    names = [line.split(":", 1)[0].lower() for line in fresh]
    assert [line for line in fresh if line.lower().startswith(("x-a:", "x-dup:", "x-name:", "x-z:"))] == [
        "X-A: 1", "X-Dup: first", "X-Dup: second", "X-Name: caf\u00e9", "X-Z: last"]
    for gone in ("connection", "x-hop", "keep-alive"):
        assert gone not in names, gone
    assert names.count("x-request-id") == 1 and "X-Request-Id: app-rid" in fresh
    assert names.count("x-canary-track") == 1 and "X-Canary-Track: stable" in fresh
    assert names.count("content-length") == 1 and names.count("date") == 1

    failing.set()
    cached = header_lines(await raw_head(p.url, request))
    cnames = [line.split(":", 1)[0].lower() for line in cached]
    assert [line for line in cached if line.lower().startswith(("x-a:", "x-dup:", "x-name:", "x-z:"))] == [
        "X-A: 1", "X-Dup: first", "X-Dup: second", "X-Name: caf\u00e9", "X-Z: last"]
    for once in ("x-request-id", "x-canary-track", "x-fallback", "x-fallback-reason", "age", "content-length", "date"):
        assert cnames.count(once) == 1, (once, cached)
    assert "X-Fallback: cache" in cached and "X-Fallback-Reason: upstream_error" in cached
    assert "X-Request-Id: app-rid" in cached and "X-Canary-Track: stable" in cached
    for gone in ("connection", "x-hop", "keep-alive"):
        assert gone not in cnames, gone
