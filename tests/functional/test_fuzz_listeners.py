"""Property-based runs at the listeners, through real sockets, against the proxy as a real process:
arbitrary bytes to the HTTP and RESP listeners, arbitrary JSON to the openai listener. Whatever comes in:
no 500 and no proxy 502–504 (an upstream that always answers is behind it; the documented 501/505
refusals are fine), no crash, bounded memory, and a client on another connection is served throughout.
Bounded in examples, so a CI run takes seconds; the property, not the example count, is the point."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import psutil
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.net import free_port
from tests.support.wait import eventually_sync

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("fuzz")
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.support.fuzz_upstream", str(up_port)])
    ports = {n: free_port() for n in ("http", "llm", "redis", "admin")}
    cfg = {"admin": {"listen": f"127.0.0.1:{ports['admin']}"}, "log": {"level": "warning"}, "upstreams": {
        "db": {"listen": f"127.0.0.1:{ports['http']}", "targets": [{"name": "s", "url": f"http://127.0.0.1:{up_port}"}],
               "limits": {"client_header_timeout": "2s"}, "health": {"enabled": False}},
        "llm": {"protocol": "openai", "listen": f"127.0.0.1:{ports['llm']}",
                "targets": [{"name": "s", "url": f"http://127.0.0.1:{up_port}"}], "health": {"enabled": False}},
        "cache": {"protocol": "redis", "listen": f"127.0.0.1:{ports['redis']}",
                  "targets": [{"name": "s", "url": redis_server + "/0"}],
                  "limits": {"max_request_body": "1MiB"}, "health": {"enabled": False}}}}
    path = tmp / "fuzz.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp / "proxy.log", "wb")
    proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)], stdout=log,
                             stderr=subprocess.STDOUT)
    for port in (up_port, *ports.values()):
        eventually_sync(lambda port=port: _listening(port), what=f"port {port} listening")
    ports["proc"] = psutil.Process(proxy.pid)
    yield ports
    for p in (proxy, upstream):
        p.terminate()
    for p in (proxy, upstream):
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    log.close()
    text = (tmp / "proxy.log").read_text(errors="replace")
    assert "Traceback" not in text and '"level": "error"' not in text, text[-3000:]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def _exchange(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send `data`, read what comes back until the proxy closes or is quiet for `wait`. No half-close: a FIN
    from the app is the app giving up (the proxy cancels the request, as nginx's 499)."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(wait)
        try:
            s.sendall(data)
        except OSError:
            pass  # refused half-way (e.g. closed at a limit): what it answered is still read
        out = b""
        while len(out) < 1 << 20:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            out += chunk
        return out


def _statuses(answer: bytes) -> list[int]:
    return [int(line.split(b" ")[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.") and
            len(line.split(b" ")) > 1 and line.split(b" ")[1].isdigit()]


def _control_http(port: int) -> None:
    got = _exchange(port, b"GET /control HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _statuses(got)[:1] == [200], got[:300]


_METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"FOO"])
_TOKENS = st.sampled_from([b"Host: x", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999",
                           b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked", b"Host: a", b"Expect: 100-continue",
                           b"Connection: upgrade", b"Upgrade: h2c", b"X-Forwarded-For: 1.2.3.4", b"Content-Length: 0",
                           b"Connection: close", b"Te: trailers", b"\x00", b"Host:", b" Host: x", b"Host : x"])
_HTTP = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda m, path, ver, hs, body: m + b" " + path + b" " + ver + b"\r\n" + b"\r\n".join(hs) + b"\r\n\r\n" + body,
              _METHODS, st.sampled_from([b"/", b"/a?b=c", b"*", b"http://evil/x", b"/%00", b"//x", b"/" + b"a" * 9000]),
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1"]),
              st.lists(_TOKENS, max_size=6), st.binary(max_size=64)))


@FUZZ
@given(data=_HTTP)
def test_http_listener_takes_any_bytes(proxied, data):
    answer = _exchange(proxied["http"], data, wait=0.15)  # bytes that are not a whole request get silence
    for status in _statuses(answer):
        assert status not in (500, 502, 503, 504), (status, data[:200], answer[:300])
    _control_http(proxied["http"])


_RESP = st.one_of(
    st.binary(max_size=2048),
    st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), max_size=8).map(
        lambda cmds: b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in c) for c in cmds)),
    st.lists(st.sampled_from([b"*1\r\n", b"$3\r\nGET\r\n", b"*-1\r\n", b"$-5\r\n", b"*999999999\r\n", b"PING\r\n",
                              b"SUBSCRIBE a\r\n", b"MULTI\r\n", b"EXEC\r\n", b"CONFIG GET *\r\n", b"DEBUG SLEEP 0\r\n",
                              b"AUTH x\r\n", b"HELLO 3\r\n", b"CLIENT REPLY OFF\r\n", b"$99999999\r\n", b"\r\n"]),
             max_size=12).map(b"".join))


@FUZZ
@given(data=_RESP)
def test_resp_listener_takes_any_bytes(proxied, data):
    answer = _exchange(proxied["redis"], data, wait=0.15)
    # a healthy Redis is behind it: an UNAVAILABLE is the proxy waiting on a reply that cannot come
    assert b"-UNAVAILABLE" not in answer, (data[:300], answer[:300])
    with socket.create_connection(("127.0.0.1", proxied["redis"]), 5) as s:  # another client is fine
        s.settimeout(5)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert s.recv(64) == b"+PONG\r\n"


# text with lone surrogates too: JSON carries them ("\ud800"), Python reads them, UTF-8 cannot hold them
_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _TEXT,
                     lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
                     max_leaves=30)
_BODY = st.one_of(
    _JSON,
    st.fixed_dictionaries({"model": _JSON, "messages": _JSON}, optional={"stream": _JSON, "temperature": _JSON}))


@FUZZ
@given(doc=_BODY, stream_header=st.sampled_from([None, "no-store", "only-if-cached", "bogus"]))
def test_openai_listener_takes_any_json(proxied, doc, stream_header):
    body = json.dumps(doc, allow_nan=True).encode()
    extra = f"X-Proxy-Cache: {stream_header}\r\n".encode() if stream_header else b""
    head = (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    answer = _exchange(proxied["llm"], head + body)
    statuses = _statuses(answer)
    assert statuses, answer[:300]
    status = statuses[0]
    # 504 is the documented answer to only-if-cached with nothing cached; nothing else may be the proxy's 5xx
    allowed_504 = stream_header == "only-if-cached" and b'"cache_miss"' in answer
    assert status not in (500, 502, 503) and (status != 504 or allowed_504), (status, body[:200], answer[:400])


def test_after_the_fuzz_nothing_is_held_and_no_breaker_opened(proxied):
    """Runs after the fuzz tests above (file order): the proxy is still there, every command and request
    the fuzz sent is uncounted again (a leak here would use up max_in_flight for good), and client
    input opened no breaker."""
    import urllib.request

    proc = proxied["proc"]
    assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE

    def settled():
        with urllib.request.urlopen(f"http://127.0.0.1:{proxied['admin']}/admin/upstreams", timeout=10) as r:
            ups = json.loads(r.read())
        return all(u["in_flight"] == 0 for u in ups.values()) and ups

    ups = eventually_sync(settled, what="in_flight back to 0 on every upstream")
    for name, u in ups.items():
        for track, t in u["targets"].items():
            assert t["breaker"]["state"] == "closed" and t["breaker"]["opened_total"] == 0, (name, track, t)
