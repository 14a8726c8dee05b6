"""A real redis-server on a free loopback port, plain or TLS-only (rediss://)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

from tests.support.net import free_port
from tests.support.tools import start_process


def start_redis(*args: str, tls: tuple[str, str, str] | None = None,
                server: str = "redis-server", port: int | None = None) -> tuple[subprocess.Popen, int]:
    """A real redis-server (extra command-line `args`; `tls` = (cert, key, CA) files for a TLS-only one;
    `server`: redis-server-7.4 for Redis 7.4, which scripts/tools.sh fetches; `port`: a given one, to
    start a server again where one was killed), answering once this returns."""
    binary = shutil.which(server)
    if binary is None:
        raise RuntimeError(f"{server} is not installed (redis-server: apt-get install redis-server; "
                           "redis-server-7.4: scripts/tools.sh; .ci/run does both)")
    port = port or free_port()
    argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--databases", "16"]
    wrap = lambda s: s  # noqa: E731
    if tls is None:
        argv += ["--port", str(port)]
    else:
        cert, key, ca = tls
        argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", cert, "--tls-key-file", key,
                 "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        wrap = ctx.wrap_socket

    def answers() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, wrap(raw) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16)[:1] in (b"+", b"-")  # PONG, or NOAUTH with --requirepass: it answers

    return start_process([*argv, *args], answers, "redis-server"), port


async def read_len(reader, n: int, timeout: float = 30) -> bytes:
    """At least n bytes of replies, however many reads they take."""
    import asyncio

    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(reader.read(4096), timeout)
        assert chunk, data
        data += chunk
    return data


async def read_until(reader, *needles: bytes, timeout: float = 30) -> bytes:
    """Replies until every needle has arrived (or the connection ends)."""
    import asyncio

    data = b""
    while not all(n in data for n in needles):
        chunk = await asyncio.wait_for(reader.read(4096), timeout)
        if not chunk:
            break
        data += chunk
    return data


async def start_cluster(another_redis, tmp_path) -> list[int]:
    """A real three-master Redis Cluster on loopback (no replicas), its slots assigned and its state ok.
    `another_redis` is the fixture of that name (it stops the servers after the test)."""
    import asyncio

    from tests.support.net import free_port
    from tests.support.wait import eventually

    # the bus port named, not the default port + 10000 (past 65535 for a high free port)
    ports = [another_redis("--cluster-enabled", "yes", "--dir", str(tmp_path), "--cluster-config-file",
                           f"nodes-{i}.conf", "--cluster-node-timeout", "2000", "--cluster-port", str(free_port()))
             for i in range(3)]
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli is needed (apt-get install redis-tools; .ci/run does it)")
    await asyncio.to_thread(subprocess.run, [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                                             "--cluster-yes"], check=True, capture_output=True, timeout=60)

    # every node, not just one: a node whose own view is not ok yet answers CLUSTERDOWN to what it is sent
    async def ok():
        for p in ports:
            out = await asyncio.to_thread(subprocess.run, [cli, "-p", str(p), "cluster", "info"],
                                          capture_output=True, text=True)
            if "cluster_state:ok" not in out.stdout:
                return False
        return True

    await eventually(ok, what="every node of the cluster is ok")
    return ports
