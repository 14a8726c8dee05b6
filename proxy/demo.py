"""`resilience-proxy demo [--port-base N]` (`make demo`): the proxy on config/demo.yaml in front of built-in
upstreams for all three protocols, offline — a fake database gateway and a canary build of it, a fake
OpenAI-compatible provider that streams, and a redis-server when one is installed (else it says how to
get one and leaves Redis out). Each upstream can be broken from a control endpoint, so a newcomer sees,
for each path, a call answered and the same call answered again while its dependency fails: the cached
and static fallbacks, a stream cut mid-answer and continued, a model failover, a stale Redis read with
the server stopped, a canary aborted by the local watchdog, and the status page.

With a port base the listeners, admin and built-in upstreams move to N..N+7 (the order of
`config/demo.yaml`'s header), so the demo runs beside anything else; the lines it prints name the ports
it really uses. Not on the data path."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from aiohttp import web

from proxy.settings import yaml12

MODES = ("ok", "fail", "slow")
# where each part lives, as offsets from --port-base
OFFSETS = {"database": 0, "admin": 1, "gateway": 2, "llm": 3, "provider": 4, "cache": 5, "server": 6, "canary": 7}
BEHIND = {"database": "gateway", "llm": "provider", "cache": "server"}  # each listener's built-in upstream
ANSWER = ("The sidecar kept this answer coming: a breaker per model, a failover to the next model, and a "
          "stream that was cut is continued where it broke.")


def demo_config_path() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "config" / "demo.yaml", here / "demo.yaml"):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("config/demo.yaml not found: run the demo from a checkout (pip install -e .)")


# -- the built-in upstreams ----------------------------------------------------------------------------
def gateway_app(name: str = "gateway", state: dict | None = None, redis: Redis | None = None) -> web.Application:
    """A tiny database gateway: GET /products/{id} answers JSON; POST /_chaos/{mode} changes its mood
    (`state` is shared by the stable and the canary build, each keyed by its name); with `redis`, also
    POST /_chaos/redis-stop and /_chaos/redis-start (the demo's one control port)."""
    state = state if state is not None else {}
    mine = state.setdefault(name, {"mode": "ok", "hits": 0})

    async def product(request: web.Request) -> web.Response:
        mine["hits"] += 1
        if mine["mode"] == "fail":
            return web.json_response({"error": "database unavailable"}, status=503)
        if mine["mode"] == "slow":
            await asyncio.sleep(5)
        pid = request.match_info["id"]
        return web.json_response({"id": pid, "name": f"product {pid}", "price": 10 + len(pid), "served_by": name})

    async def chaos(request: web.Request) -> web.Response:
        mode = request.match_info["mode"]
        if redis is not None and mode in ("redis-stop", "redis-start"):
            return await redis.chaos(mode.split("-", 1)[1])
        if mode not in MODES:
            return web.json_response({"error": f"mode must be one of {', '.join(MODES)}"}, status=400)
        mine["mode"] = mode
        print(f"[demo {name}] mode is now {mode}", flush=True)
        return web.json_response({"mode": mode})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(mine)

    app = web.Application()
    app.router.add_get("/products/{id}", product)
    app.router.add_post("/_chaos/{mode}", chaos)
    app.router.add_get("/_stats", stats)
    return app


class Provider:
    """A fake OpenAI-compatible provider (OpenRouter's paths): streams its answer word by word, continues
    an assistant prefill as providers do, and misbehaves on request — `cut` drops the next stream after a
    few words, `down` makes demo/large answer 503, `ok` heals."""

    def __init__(self) -> None:
        self.cut_next = False
        self.down: set[str] = set()

    def app(self) -> web.Application:
        a = web.Application()
        a.router.add_post("/api/v1/chat/completions", self.chat)
        a.router.add_get("/api/v1/models", self.models)
        a.router.add_post("/_chaos/{mode}", self.chaos)
        return a

    async def chaos(self, request: web.Request) -> web.Response:
        mode = request.match_info["mode"]
        if mode == "cut":
            self.cut_next = True
        elif mode == "down":
            self.down = {"demo/large"}
        elif mode == "ok":
            self.cut_next, self.down = False, set()
        else:
            return web.json_response({"error": "mode must be one of cut, down, ok"}, status=400)
        print(f"[demo provider] {mode}", flush=True)
        return web.json_response({"mode": mode})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "demo/large"}, {"id": "demo/small"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            model = str(body.get("model", "demo/large"))
            msgs = list(body.get("messages") or [])
        except (ValueError, AttributeError):
            return web.json_response({"error": {"message": "a JSON chat request is needed"}}, status=400)
        if model in self.down:
            return web.json_response({"error": {"message": f"{model} is overloaded", "code": 503}}, status=503)
        text = f"{ANSWER} ({model})"
        prefill = msgs[-1].get("content") if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" else None
        if isinstance(prefill, str) and text.startswith(prefill.rstrip()):
            text = text[len(prefill.rstrip()):]  # go on from the text already sent, as providers do
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1].rstrip()
        cid, created = f"chatcmpl-demo{secrets.token_hex(4)}", int(time.time())
        usage = {"prompt_tokens": 12, "completion_tokens": len(words), "total_tokens": 12 + len(words)}
        if not body.get("stream"):
            return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": "".join(words)}}],
                                      "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cut, self.cut_next = self.cut_next, False

        def event(delta: dict, finish: str | None = None, **extra) -> bytes:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        await resp.write(event({"role": "assistant", "content": ""}))
        for i, w in enumerate(words):
            if cut and i == 6:
                print("[demo provider] the stream is cut mid-answer", flush=True)
                assert request.transport is not None
                request.transport.close()  # the connection drops: no finish, no [DONE]
                return resp
            await resp.write(event({"content": w}))
            await asyncio.sleep(0.03)
        await resp.write(event({}, "stop", usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        return resp


class Redis:
    """A redis-server the demo owns, so its control endpoint can stop and start it again."""

    def __init__(self, port: int, workdir: str) -> None:
        self.port, self.dir = port, workdir
        self.proc: subprocess.Popen | None = None
        self.binary = shutil.which("redis-server")

    async def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen([self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise OSError(f"redis-server exited ({self.proc.returncode}): is 127.0.0.1:{self.port} free?") from None
                await asyncio.sleep(0.05)
        raise OSError(f"redis-server did not answer on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    async def chaos(self, mode: str) -> web.Response:
        if mode == "stop":
            await asyncio.to_thread(self.stop)
        elif self.proc is None:
            await self.start()
        print(f"[demo redis] {mode}", flush=True)
        return web.json_response({"redis": mode})


# -- the config ----------------------------------------------------------------------------------------
def _port(hostport: str) -> int:
    return int(str(hostport).rsplit(":", 1)[1])


def _read(path: str) -> dict:
    with open(path, "rb") as f:
        return yaml12.load(f.read()) or {}  # the proxy's own reading (YAML 1.2: `on:` stays a key)


def _with_port_base(path: str, base: int, tmp: str) -> tuple[str, int]:
    """The demo config with everything on the port base (see OFFSETS) → (path, the gateway's port). Any
    demo config works: its first upstream is the database (the gateway behind it), the others are moved
    where they are named in OFFSETS (llm, cache) or left out of the base."""
    cfg = _read(path)
    ups = cfg.get("upstreams") or {}
    if not ups:
        raise ValueError(f"{path}: the demo needs an upstream to put in front of its gateway")
    cfg.setdefault("admin", {})["listen"] = f"127.0.0.1:{base + OFFSETS['admin']}"
    for i, (name, up) in enumerate(ups.items()):
        role = "database" if i == 0 else name
        if role not in OFFSETS:
            continue
        up["listen"] = f"127.0.0.1:{base + OFFSETS[role]}"
        for t in up.get("targets") or []:
            where = "canary" if role == "database" and t.get("name") == "canary" else BEHIND[role]
            t["url"] = _moved(str(t.get("url", "http://127.0.0.1")), base + OFFSETS[where])
    out = os.path.join(tmp, "demo.yaml")
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)  # the first upstream is the database: keep the order
    return out, base + OFFSETS["gateway"]


def _moved(url: str, port: int) -> str:
    """The URL on 127.0.0.1:port, its scheme and path kept."""
    return urlsplit(url)._replace(netloc=f"127.0.0.1:{port}").geturl()


def _without(path: str, name: str, tmp: str) -> str:
    cfg = _read(path)
    (cfg.get("upstreams") or {}).pop(name, None)
    out = os.path.join(tmp, f"demo-without-{name}.yaml")
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)  # the first upstream is the database: keep the order
    return out


def _targets(cfg: dict) -> dict[str, int]:
    """Where the built-in upstreams must listen, read from the config the proxy runs."""
    ups = cfg.get("upstreams") or {}
    found: dict[str, int] = {}
    for i, (name, up) in enumerate(ups.items()):
        for t in up.get("targets") or []:
            port = urlsplit(str(t["url"])).port
            if i == 0:
                found["canary" if t.get("name") == "canary" else "gateway"] = port
            elif name in BEHIND:
                found[BEHIND[name]] = port
    return found


def lines(ports: dict[str, int], token_file: str, redis_note: str | None) -> str:
    """What the demo prints: per path, a line to call it and a line to break it (every `curl`/`redis-cli`
    line runs as printed, in order: tests/functional/test_lifecycle.py does)."""
    db, admin, gw = ports["database"], ports["admin"], ports["gateway"]
    auth = f'-H "Authorization: Bearer $(cat {token_file})"'
    out = [
        "resilience-proxy demo is running.",
        f"  app → proxy 127.0.0.1:{db} → fake database gateway 127.0.0.1:{gw} (canary build 127.0.0.1:{ports['canary']})",
        f"  admin/metrics on 127.0.0.1:{admin}, admin token: {token_file}",
        f"  status page: http://127.0.0.1:{admin}/admin/ui  (admin on loopback: reading needs no token)",
        "",
        "HTTP: the cache and static fallbacks, the breaker",
        f"  curl -s localhost:{db}/products/42                      # call: pass-through, with X-Request-Id",
        f"  curl -s -X POST localhost:{gw}/_chaos/fail             # break: the gateway answers 503",
        f"  curl -si localhost:{db}/products/42                     # cached answer: X-Fallback: cache",
        f"  curl -si localhost:{db}/products/7                      # never cached: static degraded answer",
        f"  curl -s localhost:{admin}/metrics | grep circuit_breaker   # the breaker opened after 3 failures",
        f"  curl -s {auth} localhost:{admin}/admin/upstreams",
        f"  curl -s -X POST localhost:{gw}/_chaos/ok               # heal; the breaker closes after 15s",
    ]
    if "llm" in ports:
        llm, prov = ports["llm"], ports["provider"]
        ask = (f"curl -sN localhost:{llm}/api/v1/chat/completions -H 'Content-Type: application/json' -d "
               "'{\"model\": \"demo/large\", \"stream\": %s, \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")
        out += [
            "",
            "LLM (OpenAI-compatible, streaming): a stream cut mid-answer and continued, a model failover",
            f"  {ask % 'true'}   # call: a streamed answer",
            f"  curl -s -X POST localhost:{prov}/_chaos/cut            # break: the next stream is cut after 6 words",
            f"  {ask % 'true'}   # still one whole answer: continued where it broke",
            f"  curl -s -X POST localhost:{prov}/_chaos/down           # break: demo/large answers 503",
            f"  {ask % 'false'}   # answered by demo/small (the fallback model)",
            f"  curl -s -X POST localhost:{prov}/_chaos/ok             # heal",
        ]
    if "cache" in ports:
        cache, ctl = ports["cache"], ports["gateway"]
        cli = "redis-cli" if shutil.which("redis-cli") else f"{sys.executable} -m proxy.demo redis-cli"
        out += [
            "",
            f"Redis: a stale read with the server stopped (the listener is 127.0.0.1:{cache})",
            f"  {cli} -p {cache} SET greeting hello                   # call: through the proxy",
            f"  {cli} -p {cache} GET greeting                         # a read the proxy remembers",
            f"  curl -s -X POST localhost:{ctl}/_chaos/redis-stop      # break: redis-server stopped",
            f"  {cli} -p {cache} GET greeting                         # still hello: the stale read",
            f"  curl -s -X POST localhost:{ctl}/_chaos/redis-start     # heal",
        ]
    elif redis_note:
        out += ["", f"Redis: {redis_note}"]
    out += [
        "",
        "Canary: a bad canary build aborted by the local watchdog",
        f"  curl -s -X POST {auth} localhost:{admin}/admin/upstreams/database/weights -d '{{\"canary\": 20}}'   "
        "# call: the canary gets 20%",
        f"  curl -s -X POST localhost:{ports['canary']}/_chaos/fail             # break: the canary build fails",
        f"  for i in $(seq 30); do curl -s -o /dev/null -H 'X-Canary: always' localhost:{db}/products/1; done",
        f"  curl -s localhost:{admin}/metrics | grep canary_weight   # canary 0: aborted (error_rate)",
        f"  curl -s -X POST localhost:{ports['canary']}/_chaos/ok               # heal",
        "Ctrl-C stops.",
    ]
    return "\n".join(out) + "\n"


async def run_demo(config: str | None = None, port_base: int | None = None) -> int:
    from proxy.app import os_reason, run
    from proxy.obs import log
    from proxy.settings import ConfigError, load

    tmp = tempfile.mkdtemp(prefix="resilience-proxy-demo-")
    token_file = os.path.join(tmp, "admin-token")
    with open(token_file, "w") as f:
        f.write(secrets.token_hex(16))
    os.environ["PROXY_ADMIN__TOKEN_FILE"] = token_file
    path = config or demo_config_path()
    try:
        if port_base is not None:
            path, _ = _with_port_base(path, port_base, tmp)
        cfg = _read(path)
    except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    where = _targets(cfg)
    redis_note = None
    redis = None
    if "server" in where:
        if shutil.which("redis-server") is None:
            redis_note = ("left out: redis-server is not installed (apt-get install redis-server, brew install "
                          "redis, or any Redis on the port the config names)")
            path = _without(path, "cache", tmp)
            cfg = _read(path)
            where.pop("server")
        else:
            redis = Redis(where["server"], tmp)
    try:
        loaded = load(path)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 1
    log.configure(loaded.settings.log.level)

    state: dict = {}
    provider = Provider()
    apps = {"gateway": gateway_app("gateway", state, redis), "canary": gateway_app("canary", state),
            "provider": provider.app()}
    runners = []
    try:
        for part, app in apps.items():
            if part not in where:
                continue
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", where[part]).start()
        if redis is not None:
            await redis.start()
    except OSError as exc:
        print(f"cannot start the demo's built-in upstreams: {os_reason(exc) if exc.errno else exc}", file=sys.stderr)
        for r in runners:
            await r.cleanup()
        if redis is not None:
            redis.stop()
        return 3

    async def announce(app) -> None:
        s = app.runtime.settings
        ports = {"admin": _port(s.admin.listen), **where}
        for i, (name, up) in enumerate(s.upstreams.items()):
            ports["database" if i == 0 else name] = _port(up.listen)
        print(lines(ports, token_file, redis_note), flush=True)

    try:
        return await run(path, loaded, ready_hook=announce)
    finally:
        for r in runners:
            await r.cleanup()
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the admin token and the configs written for this run


def _redis_cli(argv: list[str]) -> int:
    """`python3 -m proxy.demo redis-cli -p PORT CMD ARGS...`: the demo's lines where redis-cli is missing."""
    import socket

    port = int(argv[argv.index("-p") + 1]) if "-p" in argv else 6379
    words = [a for i, a in enumerate(argv) if a != "-p" and (i == 0 or argv[i - 1] != "-p")]
    payload = f"*{len(words)}\r\n".encode() + b"".join(f"${len(w.encode())}\r\n".encode() + w.encode() + b"\r\n"
                                                     for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        reply = s.recv(65536)
    kind, rest = reply[:1], reply[1:].split(b"\r\n")
    if kind == b"$":
        print(rest[1].decode() if rest[0] != b"-1" else "(nil)")
    else:
        print(rest[0].decode())
    return 0 if kind != b"-" else 1


if __name__ == "__main__" and sys.argv[1:2] == ["redis-cli"]:
    raise SystemExit(_redis_cli(sys.argv[2:]))
