"""The Redis listener without sockets: clients on recording transports, the real runtime behind them.
What waiting for room under max_in_flight must never do — answer out of order, strand a client, let one
client that cannot run block the others, or free room the upstream has not freed."""

from __future__ import annotations

import asyncio
import types

from proxy.clock import REAL, ManualClock
from proxy.exchange import Reason
from proxy.obs.metrics import METRICS
from proxy.redis import codec
from proxy.redis.listener import RedisClientProtocol
from proxy.runtime import UpstreamRuntime
from proxy.settings.spec import UpstreamSpec
from proxy.upstream.state import StateStore
from tests.support.transport import RecordingTransport

_n = iter(range(10**6))


def upstream(clock=REAL, **limits):
    name = f"rl{next(_n)}"
    spec = UpstreamSpec.model_validate({
        "protocol": "redis", "listen": "127.0.0.1:6390", "targets": [{"name": "stable", "url": "redis://r:6379/0"}],
        "limits": {"max_in_flight": 1, "pending_timeout": "100s", **limits}, "health": {"enabled": False}})
    up = UpstreamRuntime(name, spec, StateStore(clock, METRICS), clock)
    app = types.SimpleNamespace(runtime=types.SimpleNamespace(upstreams={name: up}), clock=clock)

    def client() -> RedisClientProtocol:
        c = RedisClientProtocol(app, name)
        c.connection_made(RecordingTransport())
        return c

    return up, client


def get(key: bytes) -> bytes:
    return codec.encode_command([b"GET", key])


def open_breaker(up) -> None:
    up.targets[0].breaker.force("open")  # a command that goes out is answered at once, without I/O


async def test_the_reply_owed_first_goes_first_when_the_same_client_is_woken():
    up, client = upstream()
    c = client()
    first = c._new_slot()  # GET a, in flight: the one unit of room
    c.data_received(get(b"b"))  # waits for room, unread
    assert list(up.counters.waiting) == [c] and not c.transport.reading
    open_breaker(up)
    c._resolve(first, b"$1\r\na\r\n")
    assert b"".join(c.transport.out) == b"$1\r\na\r\n" + up.wire.chain.unavailable(Reason.CIRCUIT_BREAKER_OPEN)
    assert c.transport.reading and not up.counters.waiting


async def test_many_waiting_clients_are_all_answered_without_deep_recursion():
    up, client = upstream()
    holder = client()
    slot = holder._new_slot()
    waiting = [client() for _ in range(300)]
    for w in waiting:
        w.data_received(get(b"k"))
    assert len(up.counters.waiting) == 300
    open_breaker(up)
    holder._resolve(slot, b"+OK\r\n")
    assert all(w.transport.out for w in waiting), "a client was left without its reply"
    assert all(w._parked is None and w.transport.reading for w in waiting)
    assert up.counters.in_flight == 0 and not up.counters.waiting


async def test_a_waiter_that_cannot_run_keeps_its_place_and_the_next_one_gets_the_room():
    up, client = upstream()
    holder = client()
    slot = holder._new_slot()
    slow, other = client(), client()
    slow.data_received(get(b"a"))
    other.data_received(get(b"b"))
    slow.pause_writing()  # its socket is full: it may not take a command now
    open_breaker(up)
    holder._resolve(slot, b"+OK\r\n")
    assert other.transport.out and not slow.transport.out
    assert list(up.counters.waiting) == [slow] and slow._room_timer is not None  # its deadline kept
    slow.resume_writing()
    assert slow.transport.out and not up.counters.waiting


async def test_a_client_that_hangs_up_frees_only_what_redis_has_answered():
    up, client = upstream()
    c = client()
    c._new_slot()
    c._new_slot()
    c.shared_out = 1  # one of the two is out on a shared connection, unanswered
    waiter = client()
    waiter.data_received(get(b"k"))
    c.connection_lost(None)
    assert up.counters.in_flight == 1 and list(up.counters.waiting) == [waiter]
    open_breaker(up)
    c._shared_done()  # Redis answers the abandoned command: now the room is free
    assert up.counters.in_flight == 0 and waiter.transport.out and not up.counters.waiting


async def test_a_command_still_waiting_after_pending_timeout_is_shed(metrics):
    clock = ManualClock()
    up, client = upstream(clock, pending_timeout="2s")
    holder = client()
    holder._new_slot()
    c = client()
    c.data_received(get(b"cold") + codec.encode_command([b"PING"]))
    assert not c.transport.out
    await asyncio.sleep(0)  # the manual clock runs the pending_timeout timer at once
    assert clock.sleeps == [2.0]
    assert c.transport.out[0] == codec.error(f"UNAVAILABLE redis upstream '{up.name}' is unavailable (overloaded)")
    assert metrics.delta("upstream_shed_total", name=up.name) == 2  # the PING behind it waited too
    assert c.transport.reading and not up.counters.waiting


class _Buffering(RecordingTransport):
    """A client socket whose peer does not read: everything written stays in its buffer, and past the
    high-water mark the protocol is told, as asyncio's transports do."""

    protocol = None
    _told = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.get_write_buffer_size() > 64 * 1024 and not self._told:
            self._told = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.out))


def memory_upstream(clock=REAL, **redis):
    name = f"rm{next(_n)}"
    spec = UpstreamSpec.model_validate({
        "protocol": "redis", "listen": "127.0.0.1:6390", "targets": [{"name": "stable", "url": "redis://r:6379/0"}],
        "health": {"enabled": False}, "redis": redis})
    up = UpstreamRuntime(name, spec, StateStore(clock, METRICS), clock)
    app = types.SimpleNamespace(runtime=types.SimpleNamespace(upstreams={name: up}), clock=clock)

    def client(transport=None) -> RedisClientProtocol:
        c = RedisClientProtocol(app, name)
        c.connection_made(transport or RecordingTransport())
        c.transport.protocol = c
        return c

    return up, client


async def test_a_client_past_its_output_limit_is_closed_and_its_memory_given_back():
    """client_output_limit is a soft limit (Redis's): over it for the grace, the client is closed; one that
    reads its replies is not, however large one reply is; over twice it, at once."""
    clock = ManualClock()
    up, client = memory_upstream(clock, client_output_limit="64KiB")
    slow, fine, reader = client(_Buffering()), client(), client()
    for _ in range(3):
        slow._resolve(slow._new_slot(), b"$40000\r\n" + b"x" * 40000 + b"\r\n")  # replies it never reads
    assert not slow.gone and clock.sleeps[-1] == 10.0  # over the soft limit: the grace runs
    await asyncio.sleep(0)  # the grace has passed (the manual clock): still over it
    assert slow.transport.closed and slow.gone
    assert up.wire.memory.total == 0 and slow not in up.wire.memory.clients
    reader._resolve(reader._new_slot(), b"$100000\r\n" + b"r" * 100000 + b"\r\n")  # a reply larger than it, read
    assert not reader.gone and reader.transport.out
    fine._resolve(fine._new_slot(), b"+OK\r\n")
    assert not fine.transport.closed and fine.transport.out == [b"+OK\r\n"]
    hard = client(_Buffering())
    hard._resolve(hard._new_slot(), b"$140000\r\n" + b"h" * 140000 + b"\r\n")  # over twice the limit
    assert hard.gone and hard.transport.closed


async def test_past_max_client_memory_the_client_holding_most_is_closed():
    up, client = memory_upstream(max_client_memory="1MiB", client_output_limit="1MiB")
    small, big = client(_Buffering()), client(_Buffering())
    small._resolve(small._new_slot(), b"+" + b"s" * 100_000 + b"\r\n")
    owed = big._new_slot()  # replies held in order behind one still owed count too
    for _ in range(10):
        big._resolve(big._new_slot(), b"+" + b"b" * 100_000 + b"\r\n")
    assert not big.transport.out and big.replies_held > 900_000  # all waiting behind `owed`
    big._resolve(owed, b"+OK\r\n")  # now they are written, and over the limit
    assert big.gone and big.transport.closed and not small.gone
    assert up.wire.memory.total == small.mem <= up.wire.memory.limit


async def test_over_three_quarters_clients_between_commands_are_not_read_and_resume_once_it_drains():
    up, client = memory_upstream(max_client_memory="1MiB")
    open_breaker(up)  # a finished command is answered at once, without I/O
    writer, idle = client(), client()
    head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$900000\r\n"
    writer.data_received(head + b"v" * 850_000)  # in the middle of one command: it keeps being read
    assert writer.transport.reading and up.wire.memory.total > 850_000
    idle.data_received(b"*1\r\n$4\r\nPING\r\n")
    assert not idle.transport.reading and idle.mem_paused  # between commands: waits for memory
    writer.data_received(b"v" * 50_000 + b"\r\n")  # the command completes and is answered
    assert up.wire.memory.total < 1024 * 1024 // 2
    assert idle.transport.reading and not idle.mem_paused


async def test_clients_that_hold_memory_and_never_read_do_not_starve_the_rest():
    """Holders under the bound that never read would keep the total over 3/4 for good: a second of
    waiting later the biggest are closed until it is back under, and the waiting client is read again."""
    clock = ManualClock()
    up, client = memory_upstream(clock, max_client_memory="1MiB", client_output_limit="1MiB")
    holders = [client(_Buffering()) for _ in range(3)]
    for h in holders:
        owed = h._new_slot()  # its replies wait in order behind one still owed: held, never drained
        h._resolve(h._new_slot(), b"+" + b"h" * 280_000 + b"\r\n")
        h.owed = owed
    pool = up.wire.memory
    assert pool.soft < pool.total <= pool.limit and not any(h.gone for h in holders)
    reader = client()
    reader.data_received(b"*1\r\n$4\r\nPING\r\n")
    assert reader.mem_paused and not reader.transport.reading
    assert clock.sleeps[-1] == 1.0  # the wait before relief, on the injected clock (it runs next turn)
    await asyncio.sleep(0)
    assert sum(h.gone for h in holders) == 1 and pool.total <= pool.soft
    assert reader.transport.reading and not reader.mem_paused
