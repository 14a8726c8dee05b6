"""Processes the benchmark starts: the upstream (nginx serving a small JSON answer, on the load core), the
proxy under test and each peer (pinned to the proxy core), all configured for equivalent behaviour:
keep-alive to the upstream, retry on connect failure, passive health/ejection."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROXY_CORE, LOAD_CORE = "0", "1"
BODY = '{"id":42,"name":"product","price":12.5,"tags":["a","b"]}'


def tool(name: str) -> str | None:
    """A command on PATH, or one scripts/tools.sh built into its cache (outside the clone)."""
    found = shutil.which(name)
    if found:
        return found
    cache = Path(os.environ.get("RESILIENCE_PROXY_TOOLS")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resilience-proxy/tools")
    c = cache / "bin" / name
    return str(c) if os.access(c, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Proc:
    def __init__(self, name: str, cmd: list[str], port: int | None, core: str, cwd=None, env=None) -> None:
        self.name, self.port = name, port
        self.p = subprocess.Popen(["taskset", "-c", core, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True)
        if port:
            try:
                wait_port(port)
            except RuntimeError:
                err = self.p.stderr.read(2000).decode(errors="replace") if self.p.poll() is not None else ""
                self.stop()
                raise RuntimeError(f"{name} did not start: {err}") from None

    @property
    def pid(self) -> int:
        # taskset execs the command: same pid
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGINT)
                self.p.wait(5)
            except Exception:
                os.killpg(self.p.pid, signal.SIGKILL)


def nginx_upstream(tmp: Path) -> tuple[Proc, list[int]]:
    ports = [free_port(), free_port()]
    servers = "\n".join(
        f"  server {{ listen 127.0.0.1:{p}; location / {{ default_type application/json; return 200 '{BODY}'; }} }}"
        for p in ports)
    conf = tmp / "nginx-upstream.conf"
    conf.write_text(f"""worker_processes 1; daemon off; pid {tmp}/nginx-up.pid; error_log {tmp}/nginx-up.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
{servers}
}}""")
    return Proc("nginx-upstream", ["nginx", "-c", str(conf), "-p", str(tmp)], ports[0], LOAD_CORE), ports


def nginx_proxy(tmp: Path, up: int) -> Proc:
    port = free_port()
    conf = tmp / "nginx-proxy.conf"
    conf.write_text(f"""worker_processes 1; daemon off; pid {tmp}/nginx-px.pid; error_log {tmp}/nginx-px.err;
events {{ worker_connections 4096; }}
http {{ access_log off;
  upstream up {{ server 127.0.0.1:{up} max_fails=3 fail_timeout=10s; keepalive 128; }}
  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://up; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_next_upstream error timeout; proxy_connect_timeout 5s; }} }}
}}""")
    return Proc("nginx", ["nginx", "-c", str(conf), "-p", str(tmp)], port, PROXY_CORE)


def haproxy(tmp: Path, up: int) -> Proc:
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  retry-on conn-failure
  server s1 127.0.0.1:{up} check inter 2s fall 3 rise 1 observe layer4 error-limit 3 on-error mark-down
""")
    return Proc("haproxy", ["haproxy", "-f", str(conf)], port, PROXY_CORE)


def caddy(tmp: Path, up: int) -> Proc | None:
    binary = shutil.which("caddy") or str(Path(sys.executable).parent / "caddy")
    if not os.access(binary, os.X_OK):
        return None
    port = free_port()
    conf = tmp / "Caddyfile"
    conf.write_text(f"""{{
  admin off
  auto_https off
}}
http://127.0.0.1:{port} {{
  log {{
    output discard
  }}
  reverse_proxy 127.0.0.1:{up} {{
    lb_try_duration 5s
    fail_duration 10s
    max_fails 3
  }}
}}""")
    return Proc("caddy", [binary, "run", "--config", str(conf), "--adapter", "caddyfile"], port, PROXY_CORE,
                env={"HOME": str(tmp), "XDG_DATA_HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp)})


def naive(up: int) -> Proc:
    port = free_port()
    return Proc("naive-aiohttp", [sys.executable, "-m", "bench.naive", str(port), f"http://127.0.0.1:{up}"], port,
                PROXY_CORE, cwd=ROOT)


def lean(up: int) -> Proc:
    """A forwarder on the proxy's own server and client code with no policies (bench/lean.py)."""
    port = free_port()
    return Proc("lean-python", [sys.executable, "-m", "bench.lean", str(port), f"http://127.0.0.1:{up}"], port,
                PROXY_CORE, cwd=ROOT)


def proxy(tmp: Path, ups: list[int], name: str = "resilience-proxy", extra: dict | None = None,
          interpreted: bool = False, tracing: dict | None = None) -> tuple[Proc, dict]:
    """The proxy with the full chain on: breaker, retry with budget, timeouts, fallback cache, metrics and
    two canary tracks (stable 95 / canary 5, to the two nginx servers)."""
    port, admin = free_port(), free_port()
    tok = tmp / "admin-token"
    tok.write_text("bench-token")
    cfg = {"admin": {"listen": f"127.0.0.1:{admin}", "token_file": str(tok)}, "log": {"level": "error"},
           "upstreams": {"db": {
               "listen": f"127.0.0.1:{port}",
               "targets": [{"name": "stable", "url": f"http://127.0.0.1:{ups[0]}", "weight": 95},
                           {"name": "canary", "url": f"http://127.0.0.1:{ups[-1]}", "weight": 5}],
               "timeouts": {"connect": "1s", "attempt": "2s", "total": "5s"},
               "retry": {"attempts": 3, "backoff_base": "20ms", "backoff_max": "200ms"},
               "breaker": {"fail_max": 5, "reset_timeout": "5s"},
               "fallback": {"cache_entries": 20000, "cache_ttl": "5m"},
               "pool": {"max_connections": 256},
               "limits": {"max_in_flight": 5000, "max_pending": 1000},
               "canary": {"rollback": {"enabled": False}},
           }}}
    for k, v in (extra or {}).items():
        cfg["upstreams"]["db"][k] = v
    if tracing is not None:
        cfg["tracing"] = tracing
    p = _run_proxy(tmp, name, cfg, port, admin, interpreted)
    return p, {"port": port, "admin": admin, "config": cfg, "path": tmp / f"{name}.yaml"}


def proxy_for(tmp: Path, name: str, protocol: str, target_url: str) -> Proc:
    """The proxy with one upstream of `protocol` in front of `target_url`, defaults otherwise (S4, S5)."""
    port, admin = free_port(), free_port()
    cfg = {"admin": {"listen": f"127.0.0.1:{admin}"}, "log": {"level": "error"},
           "upstreams": {protocol: {"protocol": protocol, "listen": f"127.0.0.1:{port}",
                                    "targets": [{"name": "stable", "url": target_url}], "health": {"enabled": False}}}}
    return _run_proxy(tmp, name, cfg, port, admin)


def _run_proxy(tmp: Path, name: str, cfg: dict, port: int, admin: int, interpreted: bool = False) -> Proc:
    """Write the config, start the proxy on the proxy core, and wait until its admin port answers too.
    `interpreted`: from the .py sources even where the hot modules are compiled (bench/purepy.py)."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    entry = "bench.purepy" if interpreted else "proxy"
    p = Proc(name, [sys.executable, "-m", entry, "run", "--config", str(path)], port, PROXY_CORE, cwd=ROOT)
    wait_port(admin)
    return p


def extension_modules() -> list[Path]:
    """The proxy's compiled modules in this tree (an extension module beside its .py shadows it)."""
    return sorted((ROOT / "proxy").rglob("*.so"))


def compiled() -> bool:
    """Whether this tree's hot modules are compiled; refuses a tree where one is older than its .py (an
    edit the compiled module does not have: the run would measure code that is not there)."""
    sos = extension_modules()
    stale = [so for so in sos
             if (py := so.with_name(so.name.split(".", 1)[0] + ".py")).exists() and py.stat().st_mtime > so.stat().st_mtime]
    if stale:
        raise RuntimeError(f"compiled modules older than their source: {[str(p.relative_to(ROOT)) for p in stale]}; "
                           "rebuild (RESILIENCE_PROXY_COMPILE=1 pip install --no-build-isolation -e .) or delete them")
    return bool(sos)


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process and its children have used (nginx's workers are its children)."""
    import psutil

    p = psutil.Process(pid)
    total = 0.0
    for q in (p, *p.children(recursive=True)):
        try:
            t = q.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6
