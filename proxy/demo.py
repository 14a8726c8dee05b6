"""`resilience-proxy demo [--port-base N]`: the proxy on config/demo.yaml in front of a built-in fake
database gateway, offline. The gateway can be made slow or failing from its control endpoint, so a
newcomer sees a breaker open and a fallback served within a minute. With a port base the listener,
admin and gateway take N, N+1 and N+2 instead of the config's ports (a demo beside a running proxy or
a benchmark); the lines it prints name the ports it really uses. Not on the data path."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
from pathlib import Path

import yaml
from aiohttp import web

from proxy.settings import yaml12

DEMO_PORT = 18002
MODES = ("ok", "fail", "slow")


def demo_config_path() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "config" / "demo.yaml", here / "demo.yaml"):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("config/demo.yaml not found: run the demo from a checkout (pip install -e .)")


def gateway_app() -> web.Application:
    """A tiny database gateway: GET /products/{id} answers JSON; POST /_chaos/{mode} changes its mood."""
    state = {"mode": "ok", "hits": 0}

    async def product(request: web.Request) -> web.Response:
        state["hits"] += 1
        if state["mode"] == "fail":
            return web.json_response({"error": "database unavailable"}, status=503)
        if state["mode"] == "slow":
            await asyncio.sleep(5)
        pid = request.match_info["id"]
        return web.json_response({"id": pid, "name": f"product {pid}", "price": 10 + len(pid), "served_by": "gateway"})

    async def chaos(request: web.Request) -> web.Response:
        mode = request.match_info["mode"]
        if mode not in MODES:
            return web.json_response({"error": f"mode must be one of {', '.join(MODES)}"}, status=400)
        state["mode"] = mode
        print(f"[demo gateway] mode is now {mode}", flush=True)
        return web.json_response({"mode": mode})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state)

    app = web.Application()
    app.router.add_get("/products/{id}", product)
    app.router.add_post("/_chaos/{mode}", chaos)
    app.router.add_get("/_stats", stats)
    return app


CURLS = """
resilience-proxy demo is running.
  app → proxy 127.0.0.1:{listen} → fake database gateway 127.0.0.1:{port}
  admin/metrics on 127.0.0.1:{admin}, admin token: {token_file}

Try, in another terminal:
  curl -s localhost:{listen}/products/42                      # pass-through, with X-Request-Id
  curl -s -X POST localhost:{port}/_chaos/fail             # make the gateway fail (503)
  curl -si localhost:{listen}/products/42                     # cached answer: X-Fallback: cache
  curl -si localhost:{listen}/products/7                      # never cached: static degraded answer
  curl -s localhost:{admin}/metrics | grep circuit_breaker   # breaker opened after 3 failures
  curl -s -H "Authorization: Bearer $(cat {token_file})" localhost:{admin}/admin/upstreams
  curl -s -X POST localhost:{port}/_chaos/ok               # heal; the breaker closes after 15s
Ctrl-C stops.
"""


def _with_port_base(path: str, base: int, tmp: str) -> tuple[str, int]:
    """The demo config with its listener, admin and gateway on base, base+1, base+2 → (path, gateway port)."""
    with open(path, "rb") as f:
        cfg = yaml12.load(f.read()) or {}  # the proxy's own reading (YAML 1.2: `on:` stays a key)
    gateway = base + 2
    cfg.setdefault("admin", {})["listen"] = f"127.0.0.1:{base + 1}"
    up = next(iter((cfg.get("upstreams") or {}).values()), None)  # the demo's one upstream, whatever its name
    if up is None:
        raise ValueError(f"{path}: the demo needs an upstream to put in front of its gateway")
    up["listen"] = f"127.0.0.1:{base}"
    for t in up.get("targets") or []:
        t["url"] = f"http://127.0.0.1:{gateway}"
    out = os.path.join(tmp, "demo.yaml")
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return out, gateway


async def run_demo(config: str | None = None, port_base: int | None = None) -> int:
    from proxy.app import run
    from proxy.obs import log
    from proxy.settings import ConfigError, load

    tmp = tempfile.mkdtemp(prefix="resilience-proxy-demo-")
    token_file = os.path.join(tmp, "admin-token")
    with open(token_file, "w") as f:
        f.write(secrets.token_hex(16))
    os.environ["PROXY_ADMIN__TOKEN_FILE"] = token_file
    path = config or demo_config_path()
    gateway = DEMO_PORT
    if port_base is not None:
        try:
            path, gateway = _with_port_base(path, port_base, tmp)
        except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
    try:
        loaded = load(path)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 1
    log.configure(loaded.settings.log.level)
    runner = web.AppRunner(gateway_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", gateway).start()
    except OSError as exc:
        from proxy.app import os_reason

        print(f"cannot start the demo gateway on 127.0.0.1:{gateway}: {os_reason(exc)}", file=sys.stderr)
        return 3

    async def announce(app) -> None:
        s = app.runtime.settings
        first = next(iter(s.upstreams.values()), None)
        listen = first.listen.rsplit(":", 1)[1] if first is not None else "(no upstream)"
        print(CURLS.format(port=gateway, token_file=token_file, listen=listen,
                           admin=s.admin.listen.rsplit(":", 1)[1]), flush=True)

    try:
        return await run(path, loaded, ready_hook=announce)
    finally:
        await runner.cleanup()
