"""The egress listeners' HTTP/1.1 server (proxy/http1/server.py) at the socket: framing, keep-alive,
pipelining and hostile input, spoken to with raw bytes so nothing in a client library smooths it over."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import psutil
from aiohttp import web

from tests.support.proxy import upstream_config
from tests.support.upstreams import Gate
from tests.support.wait import eventually


async def _open(p):
    host, port = p.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One response framed by Content-Length (what the proxy sends for small answers)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 30)
    return lines[0].encode(), headers, body


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 30) == b""
    except ConnectionResetError:
        return True


def _server(p):
    return p.app._bound[p.name].web_server


async def test_pipelined_requests_answered_in_order_on_one_connection(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)

    async def answer(request):
        if request.path == "/slow":
            await asyncio.sleep(0.2)  # the first answer is the slowest: order must still hold
        return web.json_response({"path": request.path})

    upstream.behaviour = answer
    reader, writer = await _open(p)
    writer.write(b"".join(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in ("slow", "b", "c")))
    await writer.drain()
    paths = []
    for _ in range(3):
        status, headers, body = await _answer(reader)
        assert status.startswith(b"HTTP/1.1 200")
        paths.append(json.loads(body)["path"])
    assert paths == ["/slow", "/b", "/c"]
    # still open for more: keep-alive
    writer.write(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n")
    assert json.loads((await _answer(reader))[2])["path"] == "/d"
    writer.close()


async def test_http10_and_connection_close(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    reader, writer = await _open(p)
    writer.write(b"GET /old HTTP/1.0\r\n\r\n")
    status, headers, body = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 200") and headers["connection"] == "close"
    assert await _closed(reader)
    # HTTP/1.0 with keep-alive (ab -k): told so, and the connection stays open for the next request
    reader, writer = await _open(p)
    writer.write(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = await _answer(reader)
    assert headers["connection"].lower() == "keep-alive"
    writer.write(b"GET /ka2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert (await _answer(reader))[0].startswith(b"HTTP/1.1 200")
    writer.close()
    reader, writer = await _open(p)
    writer.write(b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 200") and headers["connection"] == "close"
    assert await _closed(reader)
    assert [r["path_qs"] for r in upstream.requests] == ["/old", "/ka", "/ka2", "/bye"]


async def test_streamed_answer_to_http10_client_is_close_delimited(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)

    async def answer(request):
        r = web.StreamResponse()
        await r.prepare(request)  # no length: chunked to the proxy
        for i in range(3):
            await r.write(f"part{i};".encode())
        await r.write_eof()
        return r

    upstream.behaviour = answer
    reader, writer = await _open(p)
    writer.write(b"GET /s HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 30)  # read to EOF: the close ends the body
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding" not in head
    assert body == b"part0;part1;part2;"


async def test_malformed_requests_get_400_and_the_listener_keeps_serving(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    bad = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # smuggling
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
    ]
    for data in bad:
        reader, writer = await _open(p)
        writer.write(data)
        status, headers, body = await _answer(reader)
        assert status.split(b" ")[1] == b"400", (data, status)
        assert json.loads(body)["error"]["type"] == "bad_request"
        assert await _closed(reader)
    assert upstream.hits == 0
    async with aiohttp.ClientSession() as s, s.get(p.url + "/fine") as r:
        assert r.status == 200


async def test_oversized_heads_refused_before_they_are_buffered(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, limits={"max_header_bytes": 8192})
    p = await start_proxy(cfg)
    proc = psutil.Process()
    # many headers, each short: over max_header_bytes is the listener's JSON 431; a head that goes on
    # past the parser's hard limit is refused before it ends
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    reader, writer = await _open(p)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    status, headers, body = await _answer(reader)
    assert status.split(b" ")[1] == b"431" and json.loads(body)["error"]["type"] == "headers_too_large"
    reader, writer = await _open(p)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + many * 5)
    assert (await _answer(reader))[0].split(b" ")[1] == b"431"
    # one header line that never ends: llhttp buffers a header until its end, so this is counted as it
    # arrives; 20 MB of it must be refused early, not accumulated
    before = proc.memory_info().rss
    reader, writer = await _open(p)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    sent = 0
    try:
        while sent < 20 * 1024 * 1024:
            writer.write(b"a" * 65536)
            sent += 65536
            await writer.drain()
    except ConnectionError:
        pass
    status, headers, body = await _answer(reader)
    assert status.split(b" ")[1] == b"431"
    assert proc.memory_info().rss - before < 10 * 1024 * 1024  # whatever was sent, nothing accumulated
    # an endless request target: refused at the line limit
    reader, writer = await _open(p)
    writer.write(b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _answer(reader))[0].split(b" ")[1] == b"400"
    assert upstream.hits == 0


async def test_pipelined_flood_is_parsed_only_a_bounded_way_ahead(upstream, start_proxy):
    """Clients that pipeline thousands of requests without reading: what is parsed ahead is bounded."""
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    gate = asyncio.Event()

    async def answer(request):
        await gate.wait()  # nothing is answered while the flood arrives
        return web.Response(text="ok")

    upstream.behaviour = answer
    flood = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n" * 8000  # 248 KB: one read
    conns = []
    for _ in range(10):
        reader, writer = await _open(p)
        writer.write(flood)
        await writer.drain()
        conns.append((reader, writer))
    server = _server(p)
    # every connection has its first request at the upstream and has parsed ahead what it will
    await eventually(lambda: upstream.hits == 10 and len(server.connections) == 10
                     and all(len(c._queue) > 0 for c in server.connections))
    queued = [len(c._queue) for c in server.connections]
    assert max(queued) <= 16 + 1024 // 16  # the queue cap plus one parse slice, not 8,000
    assert upstream.hits == 10  # one in flight per connection, the rest wait unparsed
    gate.set()
    # and the pipeline is still answered in order once the upstream answers
    status, headers, body = await _answer(conns[0][0])
    assert status.startswith(b"HTTP/1.1 200") and body == b"ok"
    for _, w in conns:
        w.close()


async def test_trailers_are_not_forwarded_as_headers(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    reader, writer = await _open(p)
    writer.write(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
                 b"0\r\nAuthorization: Bearer injected\r\nCookie: a=b\r\n\r\n")
    assert (await _answer(reader))[0].startswith(b"HTTP/1.1 200")
    seen = upstream.requests[0]
    assert seen["body"] == b"abc"
    assert "Authorization" not in seen["headers"] and "Cookie" not in seen["headers"]


async def test_unsupported_versions_and_upgrades(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    for line, status in ((b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"505"), (b"GET / HTTP/0.9\r\n\r\n", b"505")):
        reader, writer = await _open(p)
        writer.write(line)
        assert (await _answer(reader))[0].split(b" ")[1] == status, line
    assert upstream.hits == 0
    # curl --http2 on http:// asks for h2c: answered as plain HTTP/1.1, then closed
    reader, writer = await _open(p)
    writer.write(b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                 b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    status, headers, body = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 200") and json.loads(body)["path"] == "/h2c"
    assert headers["connection"] == "close"
    # an upgrade with a body cannot be parsed past its head: 400, not a timeout
    reader, writer = await _open(p)
    writer.write(b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\nContent-Length: 3\r\n\r\nabc")
    assert (await _answer(reader))[0].split(b" ")[1] == b"400"


async def test_head_cut_off_by_a_half_close_gets_400(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    reader, writer = await _open(p)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    writer.write_eof()
    assert (await _answer(reader))[0].split(b" ")[1] == b"400"
    assert upstream.hits == 0


async def test_refused_body_is_not_read_as_the_next_request(upstream, start_proxy):
    """A 413 answered before the body was read: the body's bytes must never be parsed as a request."""
    name, cfg = upstream_config(upstream.url, limits={"max_request_body": 100})
    p = await start_proxy(cfg)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    # the whole body arrived: it was framed by its length and discarded; the connection stays usable
    reader, writer = await _open(p)
    writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (200 + len(smuggled))
                 + b"x" * 200 + smuggled + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _answer(reader))[0].split(b" ")[1] == b"413"
    assert json.loads((await _answer(reader))[2])["path"] == "/next"
    writer.close()
    # most of the body is still to come: the connection closes after the answer (which the client reads)
    reader, writer = await _open(p)
    writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000 + smuggled)
    status, headers, body = await _answer(reader)
    assert status.split(b" ")[1] == b"413" and headers["connection"] == "close"  # the client must not reuse it
    assert await _closed(reader)
    assert [r["path_qs"] for r in upstream.requests] == ["/next"]


async def test_stalled_headers_are_timed_out(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, limits={"client_header_timeout": "300ms"})
    p = await start_proxy(cfg)
    reader, writer = await _open(p)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    status, headers, body = await asyncio.wait_for(_answer(reader), 30)
    assert status.split(b" ")[1] == b"408"
    assert await _closed(reader)
    assert upstream.hits == 0


async def test_idle_keepalive_connections_are_closed(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, limits={"client_idle_timeout": "1h"})
    p = await start_proxy(cfg)
    # a reload that only changes the timeout applies to the listener already bound

    cfg["upstreams"][name]["limits"]["client_idle_timeout"] = "300ms"
    p.rewrite(cfg)
    ok, message = await p.app.reload("test")
    assert ok, message
    reader, writer = await _open(p)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _answer(reader))[0].startswith(b"HTTP/1.1 200")
    assert await _closed(reader)
    assert not _server(p).connections


async def test_client_gone_mid_request_cancels_the_upstream_call(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, timeouts={"attempt": "10s", "total": "10s"})
    p = await start_proxy(cfg)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def answer(request):
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    upstream.behaviour = answer
    reader, writer = await _open(p)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(started.wait(), 30)
    writer.close()
    # the proxy drops its upstream connection, so the upstream's handler is cancelled too
    await asyncio.wait_for(cancelled.wait(), 30)
    await eventually(lambda: p.upstream.counters.in_flight == 0)


async def test_chunked_request_body_sent_slowly_is_forwarded(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    reader, writer = await _open(p)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in (b"hello ", b"slow ", b"world"):
        writer.write(b"%x\r\n%b\r\n" % (len(part), part))
        await writer.drain()
        await asyncio.sleep(0.05)
    writer.write(b"0\r\n\r\n")
    status, headers, body = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0]["body"] == b"hello slow world"
    writer.close()


async def test_drain_closes_idle_connections_and_finishes_in_flight(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)

    async def done(request):
        return web.Response(text="done")

    gate = Gate(done)
    upstream.behaviour = gate
    idle_r, idle_w = await _open(p)
    busy_r, busy_w = await _open(p)
    busy_w.write(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: gate.arrived == 1)
    shutdown = asyncio.ensure_future(_server(p).shutdown(30))
    assert await _closed(idle_r)
    assert not shutdown.done()  # waiting for the request in flight
    gate.open()
    status, headers, body = await _answer(busy_r)
    assert status.startswith(b"HTTP/1.1 200") and body == b"done" and headers["connection"] == "close"
    await asyncio.wait_for(shutdown, 30)


async def test_drain_aborts_a_client_that_stopped_reading(upstream, start_proxy):
    """A streamed answer to an app that reads nothing: the drain's timeout ends it, and nothing leaks."""
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)

    written = 0

    async def answer(request):
        nonlocal written
        r = web.StreamResponse()
        await r.prepare(request)
        try:
            for _ in range(10_000):
                await r.write(b"x" * 65536)
                written += 1
        except (ConnectionError, asyncio.CancelledError):
            pass
        return r

    upstream.behaviour = answer
    reader, writer = await _open(p)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    # the proxy's write buffer and the sockets' fill up: the upstream stops getting its writes through
    await eventually(lambda: written > 8)
    await eventually(stopped_moving(lambda: written))
    assert p.upstream.counters.in_flight == 1
    await asyncio.wait_for(_server(p).shutdown(0.3), 30)
    await eventually(lambda: p.upstream.counters.in_flight == 0)
    assert not _server(p).connections
    writer.close()


def stopped_moving(count):
    """A condition: true once `count()` has not moved between two polls (back-pressure reached the writer)."""
    seen: list = []

    def check() -> bool:
        now = count()
        still = bool(seen) and seen[-1] == now
        seen.append(now)
        return still

    return check


async def test_target_url_credentials_host_override_and_encoded_paths_reach_the_upstream(upstream, start_proxy):
    """What the lean client and the active check put on the wire, as aiohttp's client did: Basic auth
    from the target URL, a configured Host instead of the target's, the target's path prefix still
    percent-encoded."""
    host_port = upstream.url.removeprefix("http://")
    name, cfg = upstream_config(f"http://svc:s3cret@{host_port}/a%20b", request_headers={"Host": "api.internal"},
                                health={"path": "/healthz", "interval": "200ms"})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.get(p.url + "/item?x=1") as r:
        assert r.status == 200
    await eventually(lambda: any(q["path_qs"].endswith("/healthz") for q in upstream.requests))
    import base64

    want_auth = "Basic " + base64.b64encode(b"svc:s3cret").decode()
    data = next(q for q in upstream.requests if q["path_qs"].endswith("/item?x=1"))
    check = next(q for q in upstream.requests if q["path_qs"].endswith("/healthz"))
    for seen, path in ((data, "/a%20b/item?x=1"), (check, "/a%20b/healthz")):
        assert seen["path_qs"] == path
        assert seen["headers"].getall("Host") == ["api.internal"]
        assert seen["headers"]["Authorization"] == want_auth
    assert p.upstream.targets[0].health.healthy is True


async def test_admin_api_on_the_listener_server(upstream, start_proxy, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok\n")
    name, cfg = upstream_config(upstream.url)
    cfg["admin"]["token_file"] = str(token)
    p = await start_proxy(cfg)
    host, port = p.admin.removeprefix("http://").split(":")
    async with aiohttp.ClientSession() as s:
        # without the token an /admin/ path says nothing, not even whether it exists
        for method, path in (("POST", "/admin/nope"), ("DELETE", "/admin/reload"), ("POST", "/admin/reload")):
            async with s.request(method, p.admin + path) as r:
                assert r.status == 401, (method, path)
        auth = {"Authorization": "Bearer tok"}
        async with s.request("PUT", p.admin + "/admin/reload", headers=auth) as r:
            assert r.status == 405 and "POST" in r.headers["Allow"]
        async with s.get(p.admin + "/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "admin"
        async with s.head(p.admin + "/health/live") as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) > 0
        async with s.post(p.admin + "/admin/log-level", headers=auth, data=b"x" * (2 << 20)) as r:
            assert r.status == 413
    # curl's Expect: 100-continue gets its 100 before the body is sent
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"level": "info"}'
    writer.write(b"POST /admin/log-level HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
                 b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).startswith(b"HTTP/1.1 100")
    writer.write(body)
    status, headers, data = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 200") and json.loads(data) == {"level": "info"}
    # a malformed chunked body is answered, not dropped
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /admin/log-level HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n")
    assert (await _answer(reader))[0].split(b" ")[1] == b"400"


async def test_host_must_be_there_once(upstream, start_proxy):
    """RFC 9112 §3.2: an HTTP/1.1 request without Host, or any request with two, is a 400 — never
    forwarded with a guess (the upstream might pick the other one)."""
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    for head in (b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n"):
        reader, writer = await _open(p)
        writer.write(head)
        status, _, body = await _answer(reader)
        assert status.split(b" ")[1] == b"400" and b"Host" in body, head
        assert await _closed(reader)
    reader, writer = await _open(p)
    writer.write(b"GET /old HTTP/1.0\r\n\r\n")  # HTTP/1.0 had no Host: still served
    assert (await _answer(reader))[0].split(b" ")[1] == b"200"
    assert upstream.hits == 1


async def test_a_transfer_coding_the_proxy_does_not_implement_is_a_501(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url)
    p = await start_proxy(cfg)
    for te in (b"gzip, chunked", b"deflate,chunked", b"gzip\r\nTransfer-Encoding: chunked"):
        reader, writer = await _open(p)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        status, _, body = await _answer(reader)
        assert status.split(b" ")[1] == b"501" and b"not implemented" in body, te
    reader, writer = await _open(p)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert (await _answer(reader))[0].split(b" ")[1] == b"200"
    assert upstream.hits == 1


async def test_a_connection_that_never_sends_a_byte_gets_the_header_timeout(upstream, start_proxy):
    name, cfg = upstream_config(upstream.url, limits={"client_header_timeout": "300ms", "client_idle_timeout": "1h"})
    p = await start_proxy(cfg)
    reader, writer = await _open(p)
    assert await _closed(reader)  # within the header timeout, not the hour of keep-alive
    reader, writer = await _open(p)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _answer(reader))[0].split(b" ")[1] == b"200"
    await asyncio.sleep(2.5)  # past the header timeout and two sweeps: one that has served keeps its hour
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _answer(reader))[0].split(b" ")[1] == b"200"


async def test_bytes_after_a_complete_answer_are_never_served_to_the_next_request(start_proxy, raw_upstream):
    """An upstream that sends more than it said (bytes past Content-Length, a second answer nobody asked
    for) must not have them read as the answer to the next request on that pooled connection."""
    conns = []

    async def serve(reader, writer):
        conns.append(writer)
        first = len(conns) == 1
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if first:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON")
                first = False
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
            await writer.drain()

    name, cfg = upstream_config(await raw_upstream(serve), retry={"attempts": 1})
    p = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/a") as r:
            assert await r.read() == b"ok"
        for _ in range(3):
            async with s.get(p.url + "/b") as r:
                assert r.status == 200 and await r.read() == b"fresh"
    assert len(conns) == 2  # the poisoned connection was closed, the next one reused
