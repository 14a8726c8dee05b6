"""The lean HTTP/1.1 client fed bytes without a socket (a recording transport): framing, keep-alive,
interim answers, and what a cut or invalid answer becomes."""

from __future__ import annotations

import asyncio

import pytest

from proxy.http1.client import BODY_ERRORS, ClientConnection, UpstreamClosed
from tests.support.transport import RecordingTransport


class Pool:
    idle_timeout = 30.0

    def __init__(self) -> None:
        self.idle, self.released = [], 0

    def h1_idle(self, conn) -> None:
        self.idle.append(conn)

    def release(self) -> None:
        self.released += 1


def connect():
    pool, t = Pool(), RecordingTransport()
    conn = ClientConnection(pool, 0.0)
    conn.connection_made(t)
    return conn, pool, t


async def answer(conn, *chunks: bytes):
    task = asyncio.ensure_future(conn.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
    await asyncio.sleep(0)
    for c in chunks:
        conn.data_received(c)
    return await task


async def test_a_complete_keep_alive_answer_goes_back_to_the_pool():
    conn, pool, t = connect()
    r = await answer(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhel", b"lo")
    assert (r.status, r.reason, r.headers.getall("X-A")) == (200, "OK", ["1", "2"])
    assert await r.read() == b"hello"
    r.release()
    assert pool.idle == [conn] and pool.released == 1 and not t.closed
    assert t.out == [b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"]  # the request in one write


async def test_connection_close_and_unread_bodies_are_not_reused():
    conn, pool, t = connect()
    r = await answer(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert await r.read() == b"ok"
    r.release()
    assert pool.idle == [] and t.closed
    conn, pool, t = connect()
    r = await answer(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    r.release()  # released with 7 bytes still owed: the connection cannot carry another request
    assert pool.idle == [] and t.closed and pool.released == 1


async def test_an_interim_100_is_skipped_for_the_final_answer():
    conn, _, _ = connect()
    r = await answer(conn, b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert (r.status, r.reason) == (201, "Created")


async def test_a_body_without_length_ends_with_the_connection():
    conn, _, _ = connect()
    r = await answer(conn, b"HTTP/1.1 200 OK\r\n\r\nall of it")
    conn.connection_lost(None)
    assert await r.read() == b"all of it"


async def test_a_cut_answer_raises_a_body_error_not_a_short_body():
    conn, _, _ = connect()
    r = await answer(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    conn.connection_lost(ConnectionResetError())
    with pytest.raises(BODY_ERRORS) as ei:
        await r.read()
    assert isinstance(ei.value, UpstreamClosed)


async def test_an_invalid_answer_fails_the_request_and_closes():
    conn, _, t = connect()
    with pytest.raises(UpstreamClosed, match="invalid answer"):
        await answer(conn, b"NOT HTTP AT ALL\r\n\r\n")
    assert t.closed


async def test_a_slow_reader_pauses_the_upstream_and_resumes_it_when_drained():
    conn, _, t = connect()
    r = await answer(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(70):
        conn.data_received(b"1\r\nx\r\n")
    assert not t.reading
    for _ in range(60):
        await r.content.readany()
    assert t.reading


async def test_the_raw_header_list_is_the_answers_own_and_never_gets_the_trailers():
    """The listener serialises the forwarded head from `raw`: a chunked body's trailers (parsed after
    the head) must not land in it, nor the interim answer's headers."""
    conn, pool, t = connect()
    r = await answer(conn, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nX-A: 1\r\nX-A: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                     b"3\r\nabc\r\n0\r\nSet-Cookie: trailer=1\r\nX-Trailer: t\r\n\r\n")
    assert await r.read() == b"abc"
    assert r.raw == [("X-A", "1"), ("X-A", "2"), ("Transfer-Encoding", "chunked")]
    assert list(r.headers.items()) == r.raw
