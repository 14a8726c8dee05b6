"""The benchmark's own peers do what their rows say: the lean Python forwarder forwards (status, body,
headers, hop-by-hop dropped, keep-alive reused), and the interpreted launcher loads the proxy from source."""

from __future__ import annotations

import subprocess
import sys

import aiohttp
from aiohttp import web

from bench import lean, peers


async def test_the_lean_peer_forwards_and_reuses_its_upstream_connection(aiohttp_server):
    seen = []

    async def item(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs, request.headers.get("X-App"), request.headers.get("Connection"),
                     await request.read(), request.transport.get_extra_info("peername")))
        return web.Response(status=201, body=b'{"id":42}', headers={"X-Up": "1", "Keep-Alive": "timeout=5"})

    app = web.Application()
    app.router.add_route("*", "/item", item)
    up = await aiohttp_server(app)
    srv = await lean.serve(0, f"http://127.0.0.1:{up.port}")
    port = srv.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as s:
            for body in (b"", b"payload"):
                async with s.post(f"http://127.0.0.1:{port}/item?q=1", data=body,
                                  headers={"X-App": "a", "Connection": "keep-alive"}) as r:
                    assert (r.status, await r.read(), r.headers["X-Up"]) == (201, b'{"id":42}', "1")
                    assert "Keep-Alive" not in r.headers  # hop-by-hop: not passed back
    finally:
        srv.close()
    assert [s[:5] for s in seen] == [("POST", "/item?q=1", "a", None, b""), ("POST", "/item?q=1", "a", None, b"payload")]
    assert seen[0][5] == seen[1][5]  # the second request rode the first one's upstream connection


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
