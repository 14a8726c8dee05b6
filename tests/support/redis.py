"""A real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from tests.support.net import free_port


def start_redis(*args: str) -> tuple[subprocess.Popen, int]:
    """A real redis-server (extra command-line `args`), answering once this returns."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--databases", "16", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16)[:1] in (b"+", b"-"):  # PONG, or NOAUTH with --requirepass: it answers
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


def start_redis_tls(cert_file: str, key_file: str, ca_file: str, *args: str) -> tuple[subprocess.Popen, int]:
    """A real redis-server speaking TLS only (rediss://), answering once this returns."""
    import ssl

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--tls-cert-file", cert_file, "--tls-key-file", key_file,
                             "--tls-ca-cert-file", ca_file, "--tls-auth-clients", "no", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.check_hostname = False
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, ctx.wrap_socket(raw) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16)[:1] == b"+":
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("redis-server (TLS) did not start")
        time.sleep(0.05)
