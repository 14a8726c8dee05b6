"""Upstream Redis connections. A dedicated one belongs to one client connection (opened lazily,
replaced after a failure); a shared one (`SharedRedis`) carries the plain reads and writes of every client
that has no connection state of its own, the way twemproxy multiplexes: commands from all clients that
arrive in one event-loop turn go out in one write, and their replies come back in one read. Commands are
written in order (pipelining kept) and replies matched to them in order.

The connection opens with what the app would have sent itself, from the target URL and the client's
state: `HELLO <proto> [AUTH user pass]` (or `AUTH` for RESP2), `SELECT db`, `CLIENT SETNAME`. Only the
command at the head of the queue has a timer: pipelined commands behind it are not yet being worked on.
A timed-out command closes the connection; every command still on it then fails with it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from proxy.obs import log
from proxy.redis.codec import Map, ProtocolError, ReplyFramer, encode_command, hello_fields
from proxy.upstream.pool import ssl_context

# uvloop's loop.time() moves in whole milliseconds, once per loop turn: a timer set for a deadline may
# run a little before it by that clock
_SLACK = 0.002
_LARGE = 64 * 1024  # a queued piece this large is written on its own (codec.encode_pieces)


class RedisTarget:
    """What the target URL says, parsed once per config load."""

    def __init__(self, spec) -> None:
        u = urlsplit(spec.url)
        self.host, self.port = u.hostname or "localhost", u.port or 6379
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        if spec.password_file:
            with open(spec.password_file, encoding="utf-8") as f:  # an OSError is a config error upstream
                self.password = f.read().rstrip("\r\n")
        path = (u.path or "/").strip("/")
        self.db = int(path) if path.isdigit() else 0
        self.ssl = ssl_context(spec)
        self.server_hostname = spec.tls.server_name or (self.host if self.ssl else None)
        # loop time of the last failure charged to this target: a connection whose command was already
        # out by then met the same event (one stall times out every connection at once)
        self.failed_at = float("-inf")
        # what the upstream's HELLO says (server, version, mode, role, modules), learned on the first
        # connection: the proxy answers its clients' HELLO with it (redis-py gates features on it)
        self.server: Map | None = None


def _setup_label(cmd: list[bytes]) -> bytes:
    """How a setup command's reply is told apart: HELLO? only asks for the server's facts."""
    if cmd[0] == b"CLIENT":
        return cmd[1]
    if cmd[0] == b"HELLO" and len(cmd) == 1:
        return b"HELLO?"
    return cmd[0]


class Pending:
    """A command's place in a connection's queue. `timeout` bounds its wait once it is at the head (the
    attempt timeout, restarted by every read that brings bytes); `until` (loop time) is the command's
    total deadline, wherever it is in the queue."""

    __slots__ = ("on_reply", "on_failure", "timeout", "until", "raw", "conn", "at_head")

    def __init__(self, raw: bytes, on_reply: Callable, on_failure: Callable, timeout: float | None,
                 until: float | None = None) -> None:
        self.raw, self.on_reply, self.on_failure, self.timeout = raw, on_reply, on_failure, timeout
        self.until = until
        self.conn: UpstreamConnection | None = None  # set when the connection fails: whose error it was
        self.at_head: float | None = None  # loop time its attempt timer started

    def late(self, raw: bytes, kind: str) -> None:
        """The reply (or failure) of a command already answered `deadline`: nobody waits for it."""


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, target: RedisTarget, proto: int, db: int, name: bytes | None, connect_timeout: float,
                 on_push: Callable[[bytes], None], on_raw: Callable[[bytes], None], shared: bool = False,
                 lib_info: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.target, self.proto, self.db, self.client_name = target, proto, db, name
        self.lib_info = lib_info  # the client's CLIENT SETINFO (lib-name, lib-ver), replayed on its own connection
        self.connect_timeout = connect_timeout
        self.on_push, self.on_raw = on_push, on_raw
        self.on_tunnel_closed: Callable[[], None] | None = None
        self.on_closed: Callable[[UpstreamConnection], None] | None = None
        self.error: str | None = None
        self.transport: asyncio.Transport | None = None
        self.framer = ReplyFramer()
        self.pending: collections.deque[Pending] = collections.deque()
        self.backlog: list[bytes] = []      # written before the connection is up
        self.failed: str | None = None      # "connect-failure" | "reset" | "timeout"
        self.tunnel = False                 # pub/sub or MONITOR: bytes flow raw from now on
        self.retiring = False
        self.paused = False
        self.corked = False
        self.on_batch: Callable[[bool], None] | None = None  # the client corks its replies around a read
        self.setup_failed_on: bytes | None = None
        self.paused_at_start = False
        self._timer: asyncio.TimerHandle | None = None
        self._soonest: float | None = None  # no total deadline in the queue comes before this
        self.shared = shared
        self._flush_due = False
        self._large = False  # the backlog holds a large piece (written on its own)
        self._loop = asyncio.get_running_loop()
        self.connecting = self._loop.create_task(self._connect())

    # -- connect -----------------------------------------------------------------------------------------
    async def _connect(self) -> None:
        t = self.target
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._loop.create_connection(lambda: self, t.host, t.port, ssl=t.ssl,
                                                   server_hostname=t.server_hostname)
        except (OSError, TimeoutError) as exc:
            self._fail("connect-failure", exc)

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.paused_at_start:
            self.pause()
        t = self.target
        setup: list[list[bytes]] = []
        if self.proto == 3:
            hello = [b"HELLO", b"3"]
            if t.password is not None:
                hello += [b"AUTH", (t.username or "default").encode(), t.password.encode()]
            setup.append(hello)
        elif t.password is not None:
            setup.append([b"AUTH", t.username.encode(), t.password.encode()] if t.username
                         else [b"AUTH", t.password.encode()])
        if self.proto == 2 and t.server is None:
            setup.append([b"HELLO"])  # no protover: the server's facts, in RESP2, nothing switched
        db = self.db if self.db is not None else t.db
        if db:
            setup.append([b"SELECT", str(db).encode()])
        if self.client_name:
            setup.append([b"CLIENT", b"SETNAME", self.client_name])
        for attr, value in self.lib_info:
            setup.append([b"CLIENT", b"SETINFO", attr, value])
        head = [Pending(b"", lambda raw, kind, c=_setup_label(c): self._setup_reply(raw, kind, c),
                        ignore, self.connect_timeout) for c in setup]
        self.pending.extendleft(reversed(head))
        self.backlog[:0] = [encode_command(c) for c in setup]
        self._write_backlog()
        self._arm()

    def _setup_reply(self, raw: bytes, kind: str, command: bytes = b"") -> None:
        if command in (b"HELLO", b"HELLO?") and kind == "ok" and self.target.server is None:
            self.target.server = hello_fields(raw, self.proto)
        if kind == "error":
            if command in (b"SETINFO", b"HELLO?"):
                return  # what a Redis before 7.2 (SETINFO) or 6 (HELLO) does not know: fine without it
            if command in (b"SELECT", b"SETNAME"):
                # the client's own state (a db that does not exist): its fault, not the upstream's
                self.setup_failed_on = command
                self._fail("client-setup", ConnectionError(raw[1:].strip().decode(errors="replace")))
            else:
                # a wrong password: the target is unusable as configured
                self._fail("connect-failure", ConnectionError(raw[1:].strip().decode(errors="replace")))

    # -- send --------------------------------------------------------------------------------------------
    def send(self, raw: bytes | list[bytes], pending: Pending | None) -> None:
        """`raw`: a command's bytes, or its pieces (codec.encode_pieces) for one with a large argument."""
        if self.failed:
            if pending is not None:
                pending.conn = self
                pending.on_failure(self.failed)
            return
        if pending is not None:
            self.pending.append(pending)
        if type(raw) is list:  # a large command: out now (what was queued goes first), not joined into a copy
            self.backlog += raw
            self._large = True
            self._write_backlog()
        elif self.shared:
            # every client's command of this loop turn in one write, sent once their reads are done
            self.backlog.append(raw)
            if not self._flush_due and self.transport is not None:
                self._flush_due = True
                self._loop.call_soon(self._flush_shared)
        elif self.transport is None or self.corked:
            self.backlog.append(raw)  # one write for the batch (uncork), or when the connection is up
        else:
            self.transport.write(raw)
        if pending is not None:
            u = pending.until
            if u is not None and (self._soonest is None or u < self._soonest):
                self._soonest = u  # the earliest total deadline in the queue (a lower bound)
                self._arm()
            elif len(self.pending) == 1:
                self._arm()

    def _write_backlog(self) -> None:
        """What is queued, in one write — but a large piece (codec.encode_pieces) on its own, as it is."""
        if not self.backlog or self.transport is None or self.failed:
            return
        backlog, self.backlog = self.backlog, []
        write = self.transport.write
        if not self._large:  # the usual case: small commands only
            write(b"".join(backlog) if len(backlog) > 1 else backlog[0])
            return
        self._large, start = False, 0
        for i, data in enumerate(backlog):
            if len(data) > _LARGE:
                if i > start:
                    write(b"".join(backlog[start:i]))
                write(data)
                start = i + 1
        if start < len(backlog):
            write(b"".join(backlog[start:]) if len(backlog) - start > 1 else backlog[start])

    def _flush_shared(self) -> None:
        self._flush_due = False
        self._write_backlog()

    def cork(self) -> None:
        """Commands of one client read go out in one write (a pipeline of 16 is one syscall, not 16)."""
        self.corked = True

    def uncork(self) -> None:
        self.corked = False
        self._write_backlog()

    def _arm(self, progress: bool = False) -> None:
        """One timer per connection: the head's attempt timeout, or the earliest total deadline in the
        queue, whichever comes first. `progress`: bytes arrived, the head's attempt timer restarts."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.paused or self.transport is None or not self.pending:
            return
        now = self._loop.time()
        head = self.pending[0]
        fire = None
        if head.timeout is not None:
            if head.at_head is None or progress:
                head.at_head = now
            fire = head.at_head + head.timeout
        soonest = self._soonest
        if soonest is not None and (fire is None or soonest < fire):
            fire = soonest
        if fire is not None:
            self._timer = self._loop.call_later(max(0.0, fire - now), self._tick)

    def _tick(self) -> None:
        """The head's attempt timed out: the upstream is too slow, the connection goes. Or commands' totals
        ran out while they waited in the queue (behind others, or at the head): that is no failure of the
        upstream. Each is answered alone (`deadline`) and leaves a placeholder that takes its reply when it
        comes; the connection and every other command on it (other clients', on a shared one) carry on."""
        self._timer = None
        if self.failed or not self.pending:
            return
        now = self._loop.time() + _SLACK
        head = self.pending[0]
        if head.timeout is not None and head.at_head is not None and now >= head.at_head + head.timeout:
            self._fail("timeout", TimeoutError("command timeout"))
            return
        expired, kept, soonest = [], collections.deque(), None
        for p in self.pending:
            u = p.until
            if u is not None and u <= now:
                placeholder = Pending(b"", p.late, functools.partial(p.late, b""), p.timeout)
                placeholder.at_head = p.at_head
                kept.append(placeholder)
                expired.append(p)
                continue
            if u is not None and (soonest is None or u < soonest):
                soonest = u
            kept.append(p)
        self.pending, self._soonest = kept, soonest
        for p in expired:
            p.conn = self
            try:
                p.on_failure("deadline")
            except Exception as exc:  # noqa: BLE001 — one client's bug must not break the connection for all
                log.error("redis_failure_callback", error=type(exc).__name__, message=str(exc)[:200])
        if not self.failed:
            self._arm()

    # -- receive -----------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel and not self.pending:
            self.on_raw(data)
            return
        try:
            frames = self.framer.feed(data)
        except ProtocolError as exc:
            self._fail("reset", exc)
            return
        batch = self.on_batch
        if batch is not None and len(frames) > 1:
            batch(True)  # the replies of one read go to the client in one write
            try:
                self._deliver(frames)
            finally:
                batch(False)
        else:
            self._deliver(frames)

    def _deliver(self, frames) -> None:
        for raw, kind in frames:
            if kind == "push" and self.proto == 3:
                self.on_push(raw)
                continue
            if not self.pending:
                if self.tunnel:
                    self.on_raw(raw)
                continue  # a reply nobody waits for (after a failure): drop it
            p = self.pending.popleft()
            try:
                p.on_reply(raw, kind)
            except Exception as exc:  # noqa: BLE001 — one client's bug must not break the connection for all
                log.error("redis_reply_callback", error=type(exc).__name__, message=str(exc)[:200])
            if self.failed:
                return
            if self.retiring and not self.pending:
                self.close()
                return
        if self.tunnel and not self.pending and self.framer.buf:
            rest = bytes(self.framer.buf)
            self.framer.buf.clear()
            self.on_raw(rest)
        if not self.failed:
            self._arm(progress=True)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.failed:
            self._fail("reset", exc)
        if self.tunnel and self.on_tunnel_closed is not None:
            self.on_tunnel_closed()

    def _fail(self, kind: str, exc: BaseException | None) -> None:
        if self.failed:
            return
        self.failed = kind
        self.error = str(exc) if exc is not None else kind
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
        pending, self.pending = self.pending, collections.deque()
        self.backlog, self._large = [], False
        self.framer = ReplyFramer()
        # One upstream event is one breaker failure. On this connection only the first command (after
        # the setup ones) met it; the others (other clients' too, on a shared one) lose their connection
        # with it. And a command that was already out when the target last failed on another connection
        # (the per-db shared ones, the dedicated ones: one stall times them all out) met that same event.
        # "-collateral" tells the client: no verdict, still an error (or a retry).
        charged = kind in ("closed", "client-setup")
        target, now = self.target, self._loop.time()
        try:
            for p in pending:
                p.conn = self
                this = kind
                if not charged and p.raw:
                    charged = True
                    sent = p.at_head if p.at_head is not None else now
                    if sent < target.failed_at:
                        this = kind + "-collateral"
                    else:
                        target.failed_at = now
                    kind = kind + "-collateral"
                try:
                    p.on_failure(this)
                except Exception as exc:  # noqa: BLE001 — one client's bug must not strand the others
                    log.error("redis_failure_callback", error=type(exc).__name__, message=str(exc)[:200])
        finally:
            if self.on_closed is not None:
                self.on_closed(self)

    def close(self) -> None:
        """Closed by the proxy (client gone, protocol switch): every command still on it fails as
        "closed", which the caller does not count against the upstream."""
        self._fail("closed", None)
        if not self.connecting.done():
            self.connecting.cancel()

    def retire(self) -> None:
        """Answer what is already sent, then close (the client switched protocol or reset)."""
        self.retiring = True
        if not self.pending:
            self.close()

    def pause(self) -> None:
        """The client reads slowly: stop reading Redis. The command timer stops too — the wait is the
        client's, not the upstream's."""
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()
            self._arm(progress=True)  # the head's attempt starts again: the pause was the client's


class SharedRedis:
    """The shared connections to one target, one per (protocol, db) in use. State: it survives a reload
    that leaves the target unchanged, and closes (after the drain) when one drops it. `batch` corks the
    clients' replies around each read (proxy/redis/replies.py)."""

    def __init__(self, target: RedisTarget, connect_timeout: float, batch: Callable[[bool], None]) -> None:
        self.target, self.connect_timeout, self.batch = target, connect_timeout, batch
        self.conns: dict[tuple[int, int], UpstreamConnection] = {}
        self.checked_dbs: set[tuple[int, int]] = set()  # (protocol, db) a SELECT has been checked for
        self.closed = False

    def reconfigure(self, target: RedisTarget, _configured=None) -> None:
        """At the swap (StateStore.commit), not during a build that may still be abandoned: a rotated
        password file applies to connections opened from now on."""
        self.target = target

    def get(self, proto: int, db: int) -> UpstreamConnection:
        key = (proto, db)
        c = self.conns.get(key)
        if c is None or c.failed or c.retiring:
            c = UpstreamConnection(self.target, proto, db, None, self.connect_timeout, ignore, ignore, shared=True)
            c.on_batch = self.batch
            if self.closed:
                c.close()  # dropped by a reload: a late retry fails instead of reaching the old target
                return c
            c.on_closed = self._forget
            self.conns[key] = c
        return c

    def _forget(self, c: UpstreamConnection) -> None:
        for key, live in list(self.conns.items()):
            if live is c:
                del self.conns[key]

    @property
    def busy(self) -> bool:
        return any(c.pending or c.backlog for c in self.conns.values())

    async def close(self) -> None:
        self.closed = True
        for c in list(self.conns.values()):
            c.close()
        self.conns.clear()


def ignore(*_) -> None:
    """Nobody to give it to: a push on a shared connection, the reply to a command the proxy sent for a
    client already answered (CLIENT SETINFO), a setup command's failure (the connection fails anyway)."""
