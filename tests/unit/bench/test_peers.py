"""The benchmark's own peers do what their rows say: the lean Python forwarder forwards (status, body,
headers, hop-by-hop dropped, keep-alive reused), and the interpreted launcher loads the proxy from source."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
from aiohttp import web

from bench import lean, peers


async def test_the_lean_peer_forwards_and_reuses_its_upstream_connection(aiohttp_server):
    seen = []

    async def item(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs, request.headers.get("X-App"), request.headers.get("X-Hop"),
                     request.headers.get("Expect"), await request.read(), request.transport.get_extra_info("peername")))
        return web.Response(status=201, body=b'{"id":42}', headers={"X-Up": "1", "Keep-Alive": "timeout=5"})

    app = web.Application()
    app.router.add_route("*", "/item", item)
    up = await aiohttp_server(app)
    listener, server, pool = await lean.serve(0, f"http://127.0.0.1:{up.port}")
    port = listener.sockets[0].getsockname()[1]

    async def chunks():
        yield b"pay"
        yield b"load"

    try:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{port}/item?q=1"
            for body in (b"", chunks()):  # the second one chunked (no Content-Length from the app)
                async with s.post(url, data=body, headers={"X-App": "é€", "X-Hop": "1", "Connection": "keep-alive, X-Hop",
                                                           "Expect": "100-continue"}) as r:
                    assert (r.status, await r.read(), r.headers["X-Up"]) == (201, b'{"id":42}', "1")
                    assert "Keep-Alive" not in r.headers  # hop-by-hop: not passed back
            async with s.head(url) as r:
                assert r.status == 501  # refused, not a hang: the lean client does not do HEAD
    finally:
        listener.close()
        await server.shutdown(5.0)
        for c in pool.idle:
            c.close()
    assert [x[:6] for x in seen[:2]] == [("POST", "/item?q=1", "é€", None, None, b""),
                                        ("POST", "/item?q=1", "é€", None, None, b"payload")]
    assert seen[0][6] == seen[1][6]  # the second request rode the first one's upstream connection


async def test_the_lean_peer_sends_again_when_a_kept_alive_connection_was_closed_by_the_upstream():
    """An upstream that answers the first request of each connection with keep-alive, then closes the
    connection at the second without a byte: the second app request is sent again on a new one."""
    conns = []

    async def upstream(reader, writer):
        conns.append(writer)
        for n in range(2):
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            if n == 1:
                break  # the kept-alive connection is gone by the time the next request reaches it
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    listener, server, pool = await lean.serve(0, f"http://127.0.0.1:{up.sockets[0].getsockname()[1]}")
    port = listener.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(f"http://127.0.0.1:{port}/item") as r:
                    assert (r.status, await r.read()) == (200, b"ok")
    finally:
        listener.close()
        await server.shutdown(5.0)
        for c in pool.idle:
            c.close()
        up.close()
    assert len(conns) == 2  # the second request went out twice: on the dead connection, then a new one


def test_the_interpreted_launcher_loads_source_where_an_extension_module_would_win(tmp_path):
    """A `proxy` package whose module has an extension file beside its .py (not a loadable one: were it
    tried, the import would fail): the plain import tries it, under the launcher the .py is loaded."""
    import importlib.machinery

    pkg = tmp_path / "proxy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("WHERE = 'source'\n")
    (pkg / f"mod{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not an ELF file")
    base = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(peers.ROOT)!r}]; "
    plain = subprocess.run([sys.executable, "-c", base + "import proxy.mod"], capture_output=True, text=True)
    assert plain.returncode != 0 and "ImportError" in plain.stderr  # the extension file shadows the .py
    launched = subprocess.run([sys.executable, "-c", base + "import bench.purepy as p; p.install(); import proxy.mod; "
                               "print(proxy.mod.WHERE, proxy.mod.__file__, p.compiled_modules())"],
                              capture_output=True, text=True, check=True)
    where, path, compiled = launched.stdout.split(" ", 2)
    assert (where, path, compiled.strip()) == ("source", str(pkg / "mod.py"), "[]")
