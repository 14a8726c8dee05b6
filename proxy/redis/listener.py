"""Redis egress listener (`protocol: redis`), e.g. 127.0.0.1:6380 → redis://redis:6379/0.

listener (this, one asyncio protocol per client connection) → track chosen when the connection opens →
per command: breaker → upstream connection → reply in order. Plain reads and writes go over a connection
shared by all clients (one write per loop turn for all of them, see upstream.py); a client that needs
connection state of its own (MULTI/WATCH, blocking commands, pub/sub, CLIENT ..., a name) moves for good
to a dedicated connection, after the replies it is owed on the shared one, so its commands stay in order.
Replies go back in command order through a queue of slots, whatever order they are resolved in
(an upstream reply, a retried read, a cached read, an error). Reads are retried on connect failure,
reset or timeout within the retry budget, and answered from the stale-read cache when the upstream
fails or the breaker is open; everything else fails fast with `-UNAVAILABLE ...`. Nothing is queued
behind an open breaker or silently dropped. HELLO, AUTH, SELECT, QUIT and RESET are answered here, so a
client connects (and reads its cached values) even while Redis is down.
"""

from __future__ import annotations

import asyncio
import collections
import hmac

from proxy.obs import log
from proxy.policy.base import Verdict
from proxy.policy.retry import backoff
from proxy.redis import codec, commands
from proxy.redis.upstream import Pending, SharedRedis, UpstreamConnection

_MAX_PENDING_SLOTS = 10_000  # past this many unanswered commands the client's reads are paused
class _SharedBatch:
    """The replies one read of a shared connection brings, for many clients: each client gets its
    share in one write at the end of the read (a pipeline of 16 is one write, not 16)."""

    def __init__(self) -> None:
        self.active = False
        self.clients: list[RedisClientProtocol] = []

    def __call__(self, start: bool) -> None:
        if start:
            self.active = True
            return
        self.active = False
        clients, self.clients = self.clients, []
        for c in clients:
            c.corked = False
        for c in clients:
            try:
                c._flush()
            except Exception as exc:  # noqa: BLE001 — one client's broken transport must not cork the rest
                log.warning("redis_flush_failed", error=type(exc).__name__)


_SHARED_BATCH = _SharedBatch()
SharedRedis.on_batch = _SHARED_BATCH


def _error_reply(err: str) -> bytes:
    """Redis's own error text (`ERR …`, `WRONGPASS …`) as it came, anything else as an ERR."""
    code = err.split(" ", 1)[0]
    return codec.error(err if code.isupper() and code.isalpha() else f"ERR {err}")


_DEMOTE_AFTER = 1.0  # a client not reading its replies this long gets a connection that can be paused
_ALL_DBS = frozenset({b"FLUSHALL", b"SWAPDB", b"MOVE", b"COPY"})  # touch another db than the client's too
_SHARED_MAX = 32  # commands one client may have in flight on a shared connection (its replies are buffered)
_STATELESS = frozenset({b"PING", b"ECHO", b"TIME", b"INFO", b"COMMAND", b"LASTSAVE"})  # shareable too
_SWITCHING = frozenset({b"SELECT", b"HELLO", b"RESET"})  # change the db or protocol shared commands run with
_WRONGPASS = codec.error("WRONGPASS invalid username-password pair or user is disabled.")


class Slot:
    __slots__ = ("reply",)

    def __init__(self) -> None:
        self.reply: bytes | None = None


class Command:
    __slots__ = ("slot", "name", "args", "raw", "cls", "keys", "attempt", "token", "target", "db", "proto",
                 "started", "seq", "shared")

    def __init__(self, slot, name, args, raw, cls, keys, db, proto, shared=False) -> None:
        self.slot, self.name, self.args, self.raw, self.cls, self.keys = slot, name, args, raw, cls, keys
        self.db, self.proto, self.shared = db, proto, shared
        self.attempt = 0
        self.seq = 0
        self.token = 0
        self.target = None
        self.started = 0.0


class _CommandPending(Pending):
    """A forwarded command waiting for its reply: calls back into the client without a closure per
    command."""

    __slots__ = ("client", "cmd")

    def __init__(self, client, cmd, timeout) -> None:
        self.client, self.cmd, self.timeout, self.raw = client, cmd, timeout, cmd.raw
        self.conn = None

    def on_reply(self, raw: bytes, kind: str) -> None:
        self.client._replied(self.cmd, raw, kind)

    def on_failure(self, kind: str) -> None:
        self.client._failed(self.cmd, kind, self.conn)


class RedisClientProtocol(asyncio.Protocol):
    def __init__(self, app, name: str) -> None:
        self.app, self.name = app, name
        self.transport: asyncio.Transport | None = None
        self.slots: collections.deque[Slot] = collections.deque()
        self.db: int | None = None
        self.proto = 2
        self.client_name: bytes | None = None
        self.authenticated = False
        self.in_multi = False
        self.tunnel = False
        self.conn: UpstreamConnection | None = None
        self.closing = False               # gone, or QUIT: no new commands
        self.gone = False                  # the client's connection is closed: nothing can be answered
        self.retrying = 0                  # reads waiting for their retry: what follows waits behind them
        self.wrote_shared = False          # a write went over a shared connection (see WAIT)
        self.demote = False                # stopped reading for a while: its next commands go dedicated
        self._demote_timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.write_paused = False
        self.watching = False
        self.corked = False
        self._after: list[bytes] = []      # out-of-band bytes waiting behind owed replies
        self._retired: set = set()         # old upstream connections finishing their replies
        self.seq = 0                       # commands forwarded so far: a read is retried only if it was the last
        self.dedicated = False             # has moved to a connection of its own, for good
        self.shared_out = 0                # commands sent on a shared connection, not yet answered
        self._parked: collections.deque[list[bytes]] | None = None  # commands held back, in order
        self._releasing = False
        self._validating = False  # a SELECT checked on a shared connection: everything after it waits

    # -- connection ----------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        up = self.app.runtime.upstreams.get(self.name)
        self.up = up
        self.target = up.pick()  # a connection keeps its track between commands (see _refresh)
        self.up_target = up.redis_targets.get(self.target.name)
        self.parser = codec.RequestParser(max_bulk=up.limits.max_request_body or codec.MAX_BULK)
        self.authenticated = up.client_password is None
        self.counters = up.counters
        up.connections += 1

    def connection_lost(self, exc) -> None:
        self.closing = self.gone = True
        self.up.connections -= 1
        self.counters.in_flight -= len(self.slots)
        self.slots.clear()
        for old in list(self._retired):
            old.close()  # e.g. a BLPOP on a retired connection must not pop for nobody
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- input ---------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.conn is not None and not self.conn.failed:
                self.conn.send(data, None)
            return
        try:
            cmds = self.parser.feed(data)
        except codec.ProtocolError as exc:
            # The stream cannot be resynchronised: say why and close (replies still owed are abandoned).
            log.warning("redis_protocol_error", upstream=self.name, error=str(exc))
            self.transport.write(codec.error(f"ERR Protocol error: {exc}"))
            self.transport.close()
            self.closing = True
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            return
        self._corked(self._dispatch_all, cmds, len(cmds) > 1)
        if len(self.slots) > _MAX_PENDING_SLOTS and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _corked(self, fn, arg, cork: bool = True) -> None:
        """Run fn(arg) with the dedicated connection corked: the commands it sends go out in one write
        (also on a connection opened meanwhile)."""
        conn = self.conn
        if conn is not None and cork:
            conn.cork()
        try:
            fn(arg)
        finally:
            if conn is not None:
                conn.uncork()
            if self.conn is not None and self.conn is not conn:
                self.conn.uncork()

    def _dispatch_all(self, cmds: list[list[bytes]]) -> None:
        for i, args in enumerate(cmds):
            if self.closing:
                break
            if self.tunnel:
                self._forward_rest(cmds[i:])
                return
            self.dispatch(args)
        if self.tunnel:
            self._forward_rest([])

    def _forward_rest(self, cmds: list[list[bytes]]) -> None:
        """Commands that came in the same read after SUBSCRIBE/MONITOR, and a command still arriving."""
        rest = b"".join(codec.encode_command(a) for a in cmds) + self.parser.pending_bytes()
        if self.conn is not None and rest:
            self.conn.send(rest, None)

    def _refresh(self) -> None:
        """Between commands: follow a reload, a blue/green switch or a canary abort (a long-lived pooled
        client connection must not stay pinned to the config or track it started with)."""
        up = self.app.runtime.upstreams.get(self.name)
        if up is None:
            return
        if up is not self.up or up.weights.get(self.target.name, 0) == 0:
            self.up = up
            target = up.pick()
            if target.name != self.target.name or up.redis_targets.get(target.name) is not self.up_target:
                self.target = target
                self._drop_upstream()
            self.up_target = up.redis_targets.get(self.target.name)

    def dispatch(self, args: list[bytes]) -> None:
        if self._parked is not None:
            self._parked.append(args)  # behind a command that waits for the shared connection's replies
            return
        name = args[0].upper()
        if self.retrying or (not self.dedicated and (self.write_paused or self.shared_out and (
                name in _SWITCHING or (name not in commands.LOCAL and not self._shareable(name))
                or self.shared_out >= _SHARED_MAX or self.demote))):
            # A read waits for its retry (what follows must not overtake it); or this command changes
            # what the shared commands before it run against, or needs a connection of its own, or
            # this client already has its share in flight (or is not reading its replies): it, and
            # everything after it, waits. A shared connection cannot pause for one client; this is
            # that client's back-pressure.
            self._park(args)
            return
        if self.authenticated and not self.in_multi and name == b"CLIENT" and len(args) > 1:
            sub = args[1].upper()
            if sub == b"SETINFO" and len(args) == 4:
                # redis-py and other clients send their library name and version on connect: metadata
                # of the app's connection, which upstream is a shared one. Taken here, so it does not
                # cost the client its place on the shared connection.
                if args[2].upper() in (b"LIB-NAME", b"LIB-VER"):
                    self._reply_now(codec.OK)
                else:
                    self._reply_now(codec.error("ERR Unrecognized option " + repr(args[2].decode(errors="replace"))))
                return
            if sub == b"MAINT_NOTIFICATIONS":
                # redis-py 6+ asks for maintenance push notifications on RESP3 connections ("auto": an
                # error is fine). They would arrive on a shared connection, where no client can be
                # told: refused, as a Redis server without the feature refuses it.
                self._reply_now(codec.error("ERR unknown subcommand 'MAINT_NOTIFICATIONS': not relayed by this proxy"))
                return
        if name in (b"WAIT", b"WAITAOF") and self.wrote_shared and self.authenticated and not self.in_multi:
            # WAIT counts the replicas that have this connection's writes; this client's writes went
            # over a connection shared with others, so any answer would be a guess. Refused, loudly.
            self._reply_now(codec.error(
                "ERR WAIT/WAITAOF after writes multiplexed by the proxy cannot be honoured: "
                "send them from a connection that started with MULTI, a blocking command or CLIENT SETNAME"))
            return
        if not self.slots and not self.in_multi and not self.watching:
            self._refresh()
        up = self.up
        if not self.authenticated and name not in (b"AUTH", b"HELLO", b"QUIT"):
            self._reply_now(codec.error("NOAUTH Authentication required."))
            return
        if name in commands.LOCAL:
            if name in _SWITCHING:
                self.seq += 1  # a read sent before it must not be retried after it (other db or protocol)
            self._local(name, args)
            return
        cls = commands.classify(name)
        if cls == "tunnel":
            self._enter_tunnel(args)
            return
        keys = commands.keys_of(name, args) if cls in ("read", "write") else None
        db = self.db if self.db is not None else self.up_target.db
        if cls == "write" and up.cache is not None:  # inside MULTI too: the write will happen at EXEC
            if name in _ALL_DBS:
                up.cache.clear_db(None)
            elif keys is None or name in commands.DB_WIDE:
                up.cache.clear_db(db)
            else:
                up.cache.invalidate(db, keys)
        if name == b"MULTI":
            self.in_multi = True
        elif name in (b"EXEC", b"DISCARD"):
            self.in_multi = False
            self.watching = False
        elif name == b"WATCH":
            self.watching = True
        elif name == b"UNWATCH":
            self.watching = False
        elif self.in_multi:
            cls = "transaction"
        shared = (not self.dedicated and not self.demote and self._shareable(name) and not self.in_multi
                  and not self.watching)
        if not shared:
            self.dedicated = True
        elif cls == "write":
            self.wrote_shared = True
        cmd = Command(self._new_slot(), name, args, codec.encode_command(args), cls, keys or [], db, self.proto, shared)
        self.forward(cmd)

    def _shareable(self, name: bytes) -> bool:
        """A plain read or write of a client with no connection state the upstream must hold for it."""
        return (name in commands.READS or name in commands.WRITES or name in _STATELESS) and self.client_name is None

    def _hold(self) -> None:
        """From now on commands wait in `_parked` (and the client's input with them)."""
        if self._parked is None:
            self._parked = collections.deque()
            if self.transport is not None:
                self.transport.pause_reading()

    def _park(self, args: list[bytes]) -> None:
        self._hold()
        self._parked.append(args)

    def _shared_done(self) -> None:
        self.shared_out -= 1
        if self._parked is not None:
            self._release_parked()

    def _release_parked(self) -> None:
        """Dispatch held-back commands in order until one has to wait again."""
        if self._parked is None or self.closing or self._releasing or self._validating:
            return
        parked, self._parked = self._parked, None
        self._releasing = True  # a command failing at once re-enters _shared_done: no recursion
        try:
            self._corked(self._dispatch_held, parked)
        finally:
            self._releasing = False
        if self._parked is None and self.transport is not None and not self.paused and not self.write_paused:
            self.transport.resume_reading()
        elif (self._parked is not None and not self.shared_out and not self.write_paused and not self.retrying
              and not self._validating):
            self._release_parked()  # everything it waited for was answered while it was being parked

    def _dispatch_held(self, parked: collections.deque) -> None:
        while parked and not self.closing:
            args = parked.popleft()
            self.dispatch(args)
            if self._parked is not None:  # it (or a SELECT being checked) waits again: the rest behind
                self._parked.extend(parked)
                return
            if self.tunnel:  # SUBSCRIBE/MONITOR: what follows it (and a command still arriving) is raw
                self._forward_rest(list(parked))
                parked.clear()

    # -- forwarding ----------------------------------------------------------------------------------
    def forward(self, cmd: Command) -> None:
        up = self.up
        target = self.target
        if self.gone:
            return
        token = target.breaker.admit()
        if token is None:
            self._unavailable(cmd, "circuit_breaker_open")
            if cmd.shared and cmd.attempt:
                self._shared_done()  # a retry that will not go out: no longer owed
            return
        cmd.token, cmd.target = token, target
        if cmd.shared:
            shared = up.redis_shared[target.name]
            if shared.closed:  # dropped by a reload while this client was busy: the live one, if any
                cur = self.app.runtime.upstreams.get(self.name)
                shared = (cur.redis_shared.get(target.name) if cur is not None else None) or shared
            conn = shared.get(cmd.proto, cmd.db)
            if not cmd.attempt:
                self.shared_out += 1  # a retry was still counted
        else:
            conn = self.conn
            if conn is None or conn.failed or conn.retiring:
                conn = self.conn = self._new_upstream()
        timeout = None if cmd.cls == "blocking" else up.spec.timeouts.attempt
        cmd.started = self.app.clock.monotonic()
        self.seq += 1
        cmd.seq = self.seq
        conn.send(cmd.raw, _CommandPending(self, cmd, timeout))

    def _replied(self, cmd: Command, raw: bytes, kind: str) -> None:
        self._replied_inner(cmd, raw, kind)
        if cmd.shared:
            self._shared_done()

    def _replied_inner(self, cmd: Command, raw: bytes, kind: str) -> None:
        up = self.up
        elapsed = self.app.clock.monotonic() - cmd.started
        cmd.target.breaker.record(cmd.token, Verdict.SUCCESS, elapsed)  # a Redis error reply is an answer
        up.metrics.duration(cmd.target.name, elapsed)
        status = "error" if kind == "error" else "ok"
        up.count(cmd.target.name, cmd.cls, status, "upstream")
        if cmd.target.canary is not None:
            up.record_outcome(cmd.target, False, elapsed)
        if kind == "ok" and cmd.cls == "read" and up.cache is not None:
            up.cache.store(cmd.db, cmd.proto, cmd.raw, cmd.keys, raw)
        elif cmd.cls == "write" and up.cache is not None and cmd.keys:
            up.cache.invalidate(cmd.db, cmd.keys)  # a read that raced the write must not survive it
        elif (kind == "ok" and cmd.cls == "admin" and cmd.name == b"CLIENT" and len(cmd.args) == 3
              and cmd.args[1].upper() == b"SETNAME"):
            self.client_name = cmd.args[2] or None  # a new connection (after a reset) is named the same
        self._resolve(cmd.slot, raw)

    def _failed(self, cmd: Command, kind: str, conn=None) -> None:
        retried = self._failed_inner(cmd, kind, conn)
        if cmd.shared and not retried:
            self._shared_done()  # a retried command stays owed until its retry is answered

    def _failed_inner(self, cmd: Command, kind: str, conn=None) -> bool:
        """→ True when the command will be retried."""
        up = self.up
        elapsed = self.app.clock.monotonic() - cmd.started
        if kind in ("closed", "client-setup"):
            cmd.target.breaker.cancel(cmd.token)  # the proxy or the client ended it: not the upstream's fault
            if kind == "client-setup" and not self.gone:
                err = (conn.error if conn is not None else None) or "setup failed"
                self._resolve(cmd.slot, _error_reply(err))
            elif not self.gone:
                self._resolve(cmd.slot, codec.error("ERR the upstream connection was reset by the proxy"))
            return False
        if kind.endswith("-collateral"):
            # lost with a shared connection another command broke: not a verdict on the upstream
            kind = kind.removesuffix("-collateral")
            cmd.target.breaker.cancel(cmd.token)
        else:
            cmd.target.breaker.record(cmd.token, Verdict.FAILURE, elapsed)
            if cmd.target.canary is not None:
                up.record_outcome(cmd.target, True, elapsed)
        if self.gone:
            return False
        reason, status = ("timeout", "timeout") if kind == "timeout" else ("upstream_error", "error")
        if self.in_multi or self.watching:
            # A transaction or WATCH lives on that connection: it is gone, and replaying it elsewhere
            # would run commands outside it. Fail this command, then close so the client starts over.
            self._unavailable(cmd, reason, status)
            self._close_after_flush()
            return False
        if (cmd.cls == "read" and cmd.attempt + 1 < up.spec.retry.attempts and not cmd.target.breaker.is_open
                and cmd.seq == self.seq and not self.closing):  # a later command already went out: no retry
            budget = up.counters.budget
            if budget.try_acquire():
                cmd.attempt += 1
                up.metrics.retry(kind)
                delay = backoff(up.spec.retry, cmd.attempt)
                self.retrying += 1

                def again(c=cmd) -> None:
                    budget.release()
                    self.retrying -= 1
                    self.forward(c)
                    if not self.retrying and self._parked is not None:
                        self._release_parked()

                asyncio.get_running_loop().call_later(delay, again)
                return True
            up.metrics.budget_exhausted.inc()
        self._unavailable(cmd, reason, status)
        return False

    def _unavailable_reply(self, reason: str) -> bytes:
        return codec.error(f"UNAVAILABLE redis upstream '{self.name}' is unavailable ({reason})")

    def _unavailable(self, cmd: Command, reason: str, status: str = "error") -> None:
        """The upstream cannot answer: a cached read, or a clear error. Never queued, never dropped."""
        up = self.up
        track = self.target.name
        if cmd.cls == "read" and up.cache is not None:
            hit = up.cache.get(cmd.db, cmd.proto, cmd.raw, cmd.keys)
            if hit is not None:
                reply, source = hit
                up.metrics.fallback(source, reason)
                up.count(track, cmd.cls, "ok", "fallback")
                self._resolve(cmd.slot, reply)
                return
        up.count(track, cmd.cls, status, "rejected")
        self._resolve(cmd.slot, self._unavailable_reply(reason))

    # -- local commands ------------------------------------------------------------------------------
    def _local(self, name: bytes, args: list[bytes]) -> None:
        if name == b"QUIT":
            self._reply_now(codec.OK)
            self._close_after_flush()
        elif name == b"AUTH":
            self._auth(args[1:])
        elif name == b"HELLO":
            self._hello(args[1:])
        elif name == b"SELECT":
            if len(args) != 2 or not args[1].isdigit():
                self._reply_now(codec.error("ERR value is not an integer or out of range"))
                return
            db = int(args[1])
            if self.conn is not None and not self.conn.failed and not self.conn.retiring:
                # let Redis validate it on the live connection; a new connection replays it
                slot = self._new_slot()
                before = self.db
                self.db = db  # commands pipelined behind it belong to the new db (cache keys, retries)

                def selected(raw, kind, s=slot, before=before) -> None:
                    if kind != "ok":
                        self.db = before  # Redis refused it and stayed where it was
                    self._resolve(s, raw)

                def lost(kind, s=slot, before=before) -> None:
                    self.db = before  # not confirmed: the client is where it was
                    self._resolve(s, codec.error("ERR the upstream connection failed during SELECT"))

                self.conn.send(codec.encode_command(args), Pending(b"", selected, lost, self.up.spec.timeouts.attempt))
            elif (not self.dedicated and self.target.breaker.state == "closed"
                  and (self.proto, db) not in self.up.redis_shared[self.target.name].checked_dbs):
                self._select_shared(db)
            else:
                self.db = db  # validated when the next connection opens (a bad db fails only this client)
                self._reply_now(codec.OK)
        elif name == b"RESET":
            self._drop_upstream()
            self.db, self.proto, self.client_name, self.in_multi, self.watching = None, 2, None, False, False
            self.authenticated = self.up.client_password is None
            self._reply_now(b"+RESET\r\n")

    def _select_shared(self, db: int) -> None:
        """SELECT for a client on shared connections: check the db on the shared connection for it (its
        setup runs SELECT), holding back what follows, so a db that does not exist is an error now — as
        Redis answers — and the client stays where it was. With Redis unreachable it is accepted as
        before (checked when a connection opens), so clients still connect and read the cache."""
        slot = self._new_slot()
        self._validating = True
        self._hold()

        def done(reply: bytes, switch: bool) -> None:
            if switch:
                self.db = db
            self._validating = False
            self._resolve(slot, reply)
            self._release_parked()

        shared = self.up.redis_shared[self.target.name]

        def answered(raw: bytes, kind: str) -> None:
            if kind != "error":
                shared.checked_dbs.add((self.proto, db))  # the next SELECT of it is answered at once
            done(codec.OK if kind != "error" else raw, kind != "error")

        def failed(kind: str, p=None) -> None:
            conn = pending.conn
            if kind == "client-setup" and conn is not None and conn.setup_failed_on == b"SELECT":
                done(_error_reply(conn.error or "ERR DB index is out of range"), False)
            else:
                done(codec.OK, True)  # unreachable or reset: the check is for later

        # a short wait: a SELECT must not hold the client's setup for a whole attempt timeout
        pending = Pending(b"", answered, failed, min(self.up.spec.timeouts.attempt, self.up.spec.timeouts.connect))
        shared.get(self.proto, db).send(codec.encode_command([b"PING"]), pending)

    def _auth(self, creds: list[bytes]) -> None:
        want = self.up.client_password
        if want is None or (len(creds) in (1, 2) and hmac.compare_digest(creds[-1], want)):
            self.authenticated = True
            self._reply_now(codec.OK)
        else:
            self._reply_now(_WRONGPASS)

    def _hello(self, args: list[bytes]) -> None:
        proto = self.proto
        rest = args
        if rest:
            if not rest[0].isdigit() or int(rest[0]) not in (2, 3):
                self._reply_now(codec.error("NOPROTO unsupported protocol version"))
                return
            proto, rest = int(rest[0]), rest[1:]
        i = 0
        while i < len(rest):
            opt = rest[i].upper()
            if opt == b"AUTH" and i + 2 < len(rest):
                if self.up.client_password is not None and not hmac.compare_digest(rest[i + 2], self.up.client_password):
                    self._reply_now(_WRONGPASS)
                    return
                self.authenticated = True
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(rest):
                self.client_name = rest[i + 1]
                i += 2
            else:
                self._reply_now(codec.error(f"ERR Syntax error in HELLO option '{opt.decode(errors='replace')}'"))
                return
        if not self.authenticated:
            self._reply_now(codec.error("NOAUTH HELLO must be called with the client already authenticated"))
            return
        if proto != self.proto:
            self._drop_upstream()  # the upstream connection speaks the old protocol
            self.proto = proto
        self._reply_now(codec.hello_reply(proto, conn_id=id(self) & 0xFFFF))

    def _new_upstream(self) -> UpstreamConnection:
        up = self.up
        conn = UpstreamConnection(self.up_target, self.proto, self.db, self.client_name,
                                  up.spec.timeouts.connect, self._out_of_band, self._out_of_band)
        conn.on_batch = self._batch
        if self.transport is not None and self.write_paused:
            conn.paused_at_start = True
        return conn

    def _drop_upstream(self) -> None:
        """The upstream connection speaks an old state (protocol, db): answer what is sent, then close."""
        if self.conn is not None:
            old = self.conn
            old.retire()
            if not old.failed:
                self._retired.add(old)
                old.on_closed = self._retired.discard
            self.conn = None

    # -- back-pressure: a slow client must not make the proxy buffer everything Redis sends ------------
    def pause_writing(self) -> None:
        self.write_paused = True
        for c in (self.conn, *self._retired):
            if c is not None:
                c.pause()
        # A shared connection cannot stop for one slow reader: stop taking this client's commands
        # instead, and move it to a connection of its own (which can be paused) once what it is owed
        # on the shared one is answered — its replies in the proxy stay bounded by what a pause holds.
        if not self.dedicated and self._demote_timer is None:
            self._demote_timer = asyncio.get_running_loop().call_later(_DEMOTE_AFTER, self._demote)
        if self.transport is not None and not self.paused:
            self.transport.pause_reading()

    def _demote(self) -> None:
        self._demote_timer = None
        if self.write_paused and not self.gone:
            self.demote = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._demote_timer is not None:
            self._demote_timer.cancel()
            self._demote_timer = None
        for c in (self.conn, *self._retired):
            if c is not None:
                c.resume()
        if self._parked is not None:
            self._release_parked()
        elif self.transport is not None and not self.paused and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- pub/sub, MONITOR -----------------------------------------------------------------------------
    def _enter_tunnel(self, args: list[bytes]) -> None:
        """From here on replies are not one per command: bytes flow raw both ways on this connection."""
        up = self.up
        token = self.target.breaker.admit()
        if token is None:
            self._reply_now(self._unavailable_reply("circuit_breaker_open"))
            return
        self.target.breaker.cancel(token)
        if self.conn is None or self.conn.failed or self.conn.retiring:
            self.conn = self._new_upstream()
        self.tunnel = True
        self.conn.tunnel = True
        self.conn.on_tunnel_closed = self._tunnel_closed
        up.count(self.target.name, "tunnel", "ok", "upstream")
        self.conn.send(codec.encode_command(args), None)

    def _tunnel_closed(self) -> None:
        """The upstream side of a pub/sub or MONITOR tunnel ended: the subscriber must know."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _out_of_band(self, data: bytes) -> None:
        """Tunnel bytes (pub/sub messages, MONITOR) and RESP3 pushes: after every reply owed before them,
        never dropped."""
        if self.transport is None:
            return
        corked, self.corked = self.corked, False
        self._flush()  # resolved replies first
        self.corked = corked
        if self.slots:
            self._after.append(data)  # still owed replies: it waits behind them
        else:
            self.transport.write(data)

    # -- output in command order ---------------------------------------------------------------------
    def _new_slot(self) -> Slot:
        """The place of the next reply owed, in command order."""
        slot = Slot()
        self.slots.append(slot)
        self.counters.in_flight += 1
        return slot

    def _reply_now(self, data: bytes) -> None:
        self._new_slot().reply = data
        self._flush()

    def _resolve(self, slot: Slot, data: bytes) -> None:
        slot.reply = data
        if _SHARED_BATCH.active and not self.corked:
            self.corked = True  # one write per client for the replies of one shared read
            _SHARED_BATCH.clients.append(self)
        if self.slots and self.slots[0] is slot:
            self._flush()

    def _batch(self, start: bool) -> None:
        self.corked = start
        if not start:
            self._flush()

    def _flush(self) -> None:
        if self.corked:
            return  # the end of the batch flushes
        slots = self.slots
        out = []
        while slots and slots[0].reply is not None:
            out.append(slots.popleft().reply)
        self.counters.in_flight -= len(out)
        if not slots and self._after:
            out.extend(self._after)
            self._after = []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self.paused and len(slots) < _MAX_PENDING_SLOTS // 2:
            self.paused = False
            if not self.write_paused and self._parked is None:
                self.transport.resume_reading()
        if self.closing and not slots and self.transport is not None:
            self.transport.close()

    def _close_after_flush(self) -> None:
        """QUIT: answer what is owed, then close."""
        self.closing = True
        if not self.slots and self.transport is not None:
            self.transport.close()
