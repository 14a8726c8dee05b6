"""A Redis upstream connection fed by a recording transport: commands whose total runs out while they
wait in its queue are answered alone, the connection and the rest carry on, and replies still match."""

from __future__ import annotations

import asyncio

from proxy.redis.codec import Map, encode_command
from proxy.redis.upstream import Pending, RedisTarget, UpstreamConnection
from proxy.settings.spec import TargetSpec
from tests.support.transport import RecordingTransport
from tests.support.wait import eventually


class Recorded(Pending):
    def __init__(self, name: str, seen: list, timeout: float, until: float | None) -> None:
        super().__init__(encode_command([b"GET", name.encode()]), self.reply, self.failure, timeout, until)
        self.name, self.seen = name, seen

    def reply(self, raw: bytes, kind: str) -> None:
        self.seen.append((self.name, "reply", raw))

    def failure(self, kind: str) -> None:
        self.seen.append((self.name, "failure", kind))

    def late(self, raw: bytes, kind: str) -> None:
        self.seen.append((self.name, "late", raw or kind))


async def connected() -> tuple[UpstreamConnection, RecordingTransport]:
    target = RedisTarget(TargetSpec(name="s", url="redis://127.0.0.1:1/0"))
    target.server = Map()  # already learned: no HELLO in the setup, the test's replies are the commands'
    conn = UpstreamConnection(target, 2, 0, None, 5.0, lambda d: None, lambda d: None, shared=True)
    conn.connecting.cancel()  # no socket: the test is the upstream
    t = RecordingTransport()
    conn.connection_made(t)
    return conn, t


async def test_totals_run_out_in_the_queue_each_answered_alone_and_replies_still_match():
    conn, t = await connected()
    now = asyncio.get_running_loop().time()
    seen: list = []
    for name, until in (("a", now + 0.05), ("b", now + 0.1), ("c", now + 60)):
        conn.send(b"", Recorded(name, seen, timeout=30.0, until=until))
    await eventually(lambda: len(seen) == 2)
    assert seen == [("a", "failure", "deadline"), ("b", "failure", "deadline")]
    assert not conn.failed and not t.closed  # the connection, and c on it, carry on
    conn.data_received(b"$1\r\nA\r\n$1\r\nB\r\n$1\r\nC\r\n")
    assert seen[2:] == [("a", "late", b"$1\r\nA\r\n"), ("b", "late", b"$1\r\nB\r\n"), ("c", "reply", b"$1\r\nC\r\n")]
    assert not conn.pending


async def test_the_heads_attempt_timeout_still_fails_the_connection():
    conn, t = await connected()
    now = asyncio.get_running_loop().time()
    seen: list = []
    conn.send(b"", Recorded("a", seen, timeout=0.05, until=now + 60))
    conn.send(b"", Recorded("b", seen, timeout=0.05, until=now + 60))
    await eventually(lambda: len(seen) == 2)
    assert seen == [("a", "failure", "timeout"), ("b", "failure", "timeout-collateral")]
    assert conn.failed == "timeout" and t.closed
