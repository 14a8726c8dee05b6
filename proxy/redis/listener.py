"""Redis egress listener (`protocol: redis`), e.g. 127.0.0.1:6380 → redis://redis:6379/0.

listener (this, one asyncio protocol per client connection) → track chosen when the connection opens →
per command the resilience chain (proxy/redis/resilience.py, the same policies as HTTP) → upstream
connection (proxy/redis/upstream.py) → reply in order (proxy/redis/replies.py). Session commands
(AUTH, HELLO, SELECT, CLIENT SETINFO, ...) are proxy/redis/session.py; when a command must wait, and when
the client is not read, proxy/redis/flow.py. This module reads commands and decides where each goes.

Plain reads and writes go over a connection shared by all clients (one write per loop turn for all of
them); a client that needs connection state of its own (MULTI/WATCH, blocking commands, pub/sub,
CLIENT ..., a name) moves for good to a dedicated connection, after the replies it is owed on the
shared one, so its commands stay in order. A command that must wait (behind a read waiting for its
retry, behind a SELECT being checked, for room under max_in_flight, or while the client does not read
its replies) waits with everything after it, and the client's socket is not read meanwhile.
"""

from __future__ import annotations

import asyncio
import collections

from proxy.exchange import Reason
from proxy.obs import log
from proxy.redis import codec, commands, guard
from proxy.redis.flow import FlowControl, drop_raw
from proxy.redis.replies import MAX_PENDING_SLOTS, ReplyOrder
from proxy.redis.resilience import Command
from proxy.redis.session import SessionCommands, error_reply
from proxy.redis.upstream import Pending, UpstreamConnection

_ALL_DBS = frozenset({b"FLUSHALL", b"SWAPDB", b"MOVE", b"COPY"})  # touch another db than the client's too
_SHARED_MAX = 32  # commands one client may have in flight on a shared connection (its replies are buffered)
_STATELESS = frozenset({b"PING", b"ECHO", b"TIME", b"INFO", b"COMMAND", b"LASTSAVE"})  # shareable too
_SWITCHING = frozenset({b"SELECT", b"HELLO", b"RESET"})  # change the db or protocol shared commands run with
_LINGER = 2.0  # seconds a refused client's connection stays half-closed, for the reason to reach it


class _CommandPending(Pending):
    """A forwarded command waiting for its reply: calls back into the client without a closure per
    command."""

    __slots__ = ("client", "cmd")

    def __init__(self, client, cmd, timeout, until) -> None:
        self.client, self.cmd, self.timeout, self.until, self.raw = client, cmd, timeout, until, cmd.raw
        self.conn = self.at_head = None

    def on_reply(self, raw: bytes, kind: str) -> None:
        self.client._replied(self.cmd, raw, kind)

    def on_failure(self, kind: str) -> None:
        self.client._failed(self.cmd, kind, self.conn)

    def late(self, raw: bytes, kind: str) -> None:
        """A write answered `deadline` has run (or failed) after all: a read that raced it must not
        stay cached, as when its reply comes in time (CommandChain.answered)."""
        cmd = self.cmd
        if cmd.cls == "write" and cmd.keys:
            self.client.chain.cache.invalidate(cmd.db, cmd.keys)


class RedisClientProtocol(SessionCommands, FlowControl, ReplyOrder, asyncio.Protocol):
    def __init__(self, app, name: str) -> None:
        self.app, self.name = app, name
        self.clock = app.clock
        self.transport: asyncio.Transport | None = None
        self._init_replies()
        self.db: int | None = None
        self.proto = 2
        self.client_name: bytes | None = None
        self.lib_info: dict[bytes, bytes] = {}  # CLIENT SETINFO lib-name / lib-ver, for its own connection
        self.tracking = False              # CLIENT TRACKING is on, on its dedicated connection
        self.authenticated = False
        self.in_multi = False
        self.multi_refused = False         # a command inside MULTI was refused here: EXEC must abort
        self.auth_failures = 0
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
        self._retired: set = set()         # old upstream connections finishing their replies
        self.seq = 0                       # commands forwarded so far: a read is retried only if it was the last
        self.dedicated = False             # has moved to a connection of its own, for good
        self.shared_out = 0                # commands sent on a shared connection, not yet answered
        # commands held back, in order, each with when it was read (its total timeout runs from then)
        self._parked: collections.deque[tuple[list[bytes], float]] | None = None
        self._releasing = False
        self._validating = False  # a SELECT checked on a shared connection: everything after it waits
        self.read_at = 0.0
        # max_in_flight: waiting for room since (None: not waiting), the pending_timeout timer, and
        # whether the held commands are being answered `overloaded` instead of waiting again
        self._room_since: float | None = None
        self._room_timer: asyncio.Handle | None = None
        self._shedding = False
        self.mem = 0                       # this client's share of ClientMemory
        self.sent_bytes = 0                # large commands sent, held until answered (their arguments)
        self._over_timer = None            # over client_output_limit since (the grace's timer)
        self.mem_paused = False
        self._abandoned = False

    # -- connection ----------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        up = self.app.runtime.upstreams.get(self.name)
        self.up, self.chain, self.guard = up, up.wire.chain, up.wire.guard
        self.target = up.pick()  # a connection keeps its track between commands (see _refresh)
        self.up_target = self.target.pool.info
        self.batch = self.target.pool.shared.batch
        self.parser = codec.RequestParser(up.limits.max_request_body or codec.MAX_BULK)
        self.authenticated = up.wire.client_password is None
        self.counters = up.counters
        self.memory, self.output_limit = up.wire.memory, up.wire.output_limit
        self.memory.clients.add(self)
        up.connections += 1

    def connection_lost(self, exc) -> None:
        self.up.connections -= 1
        self._abandon()
        if self._spans:
            from proxy.obs.tracing import end_unanswered

            end_unanswered(self._spans)

    def _abandon(self) -> None:
        """Nothing more can be answered to this client (it hung up, it was evicted, its input was refused):
        give back what it holds, once. After it `gone` holds, and every late reply only uncounts."""
        if self._abandoned:
            return
        self._abandoned = True
        self._forget_memory()
        if self.mem_paused:
            self.mem_paused = False
            if self in self.memory.paused:
                self.memory.paused.remove(self)
        self.closing = self.gone = True
        self._leave_room()
        # Commands still out on a shared connection stay in flight until Redis answers them (then
        # _shared_done uncounts each): a client that pipelines and hangs up must not free room the
        # upstream has not freed. The rest (not sent, or on a connection closed below) go now.
        self.counters.in_flight -= len(self.slots) - self.shared_out
        self.slots.clear()
        for old in list(self._retired):
            old.close()  # e.g. a BLPOP on a retired connection must not pop for nobody
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.counters.waiting:
            self._room_freed()

    # -- input ---------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # after QUIT or a refusal: what the client still sends is not read as commands
        try:
            cmds = self.parser.feed(data)
        except codec.ProtocolError as exc:
            # The stream cannot be resynchronised: say why and close (replies still owed are abandoned).
            log.warning("redis_protocol_error", upstream=self.name, error=str(exc))
            self._refuse_and_close(codec.error(f"ERR Protocol error: {exc}"))
            return
        if self.tunnel:
            self._forward_rest(cmds)
            return
        self.read_at = self.clock.monotonic()
        tracing = self.up.tracing
        if tracing is not None and cmds and tracing.coin():
            self._traced_batch(tracing, cmds)
        else:
            self._corked(self._dispatch_all, cmds, len(cmds) > 1)
        if self.mem or self.parser.buf or self.memory.total > self.memory.soft:
            self._account(read=True)
        if len(self.slots) > MAX_PENDING_SLOTS and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _traced_batch(self, tracing, cmds: list[list[bytes]]) -> None:
        """A span for one read of commands (sampled by tracing.sample_ratio by the caller: roots): the command
        names only, never an argument; ended when the batch's last reply is written (ReplyOrder._flush)."""
        from proxy.obs.tracing import redis_batch

        span = redis_batch(tracing, self.name, self.target.name, cmds)
        self._corked(self._dispatch_all, cmds, len(cmds) > 1)
        if self.slots:
            self._spans.append((self.slots[-1], span))
        else:
            span.end()  # answered at once (local commands, refusals)

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
        read_at = self.read_at
        for i, args in enumerate(cmds):
            if self.closing:
                break
            if self.tunnel:
                self._forward_rest(cmds[i:])
                return
            self.dispatch(args, read_at)
        if self.tunnel:
            self._forward_rest([])

    def _forward_rest(self, cmds: list[list[bytes]]) -> None:
        """Commands on a pub/sub or MONITOR connection (from the same read as SUBSCRIBE on): relayed
        whole, after the same check as any command, as the replies are not looked at. Anything but
        (un)subscribing, PING and QUIT ends the connection (guard.TUNNEL_COMMANDS)."""
        out, refused = [], None
        for args in cmds:
            name = args[0].upper()
            if name not in guard.TUNNEL_COMMANDS:
                refused = name
                break
            out.append(codec.encode_command(args))
        if out and self.conn is not None and not self.conn.failed:
            self.conn.send(b"".join(out), None)  # what came before a refused one still goes
        if refused is not None:
            self._guard_refused("pub/sub")
            self._refuse_and_close(codec.error(
                f"ERR '{refused.decode(errors='replace')}' is not relayed on a pub/sub or MONITOR connection: "
                "only (P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE, PING and QUIT"))

    def _refuse_and_close(self, reply: bytes) -> None:
        """The client's input cannot be served any further: say why and close. The write side is shut
        first and the socket closed a moment later: closed at once with the client's bytes unread, the
        kernel would reset the connection and the client might never see why."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(reply)
            if t.can_write_eof():
                t.write_eof()
                self._loop.call_later(_LINGER, t.abort)
            else:
                t.close()
        self._abandon()  # what it was still owed can no longer be written after the write side is shut

    def _guard_refused(self, rule: str) -> None:
        self.up.metrics.refused(rule)
        log.warning("redis_command_refused", upstream=self.name, rule=rule)

    def _refresh(self) -> None:
        """Between commands: follow a reload, a blue/green switch or a canary abort (a long-lived pooled
        client connection must not stay pinned to the config or track it started with)."""
        up = self.app.runtime.upstreams.get(self.name)
        if up is None:
            return
        if up is not self.up or up.weights.get(self.target.name, 0) == 0:
            self.up, self.chain, self.guard = up, up.wire.chain, up.wire.guard
            target = up.pick()
            if target.name != self.target.name or target.pool.info is not self.up_target:
                self.target = target
                self._drop_upstream()
            self.up_target = self.target.pool.info

    def dispatch(self, args: list[bytes], read_at: float) -> None:
        if self._parked is not None:
            drop_raw(args)
            self._parked.append((args, read_at))  # behind a command that waits: in order
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
            self._park(args, read_at)
            return
        if ((name == b"CLIENT" or name == b"WAIT" or name == b"WAITAOF") and self.authenticated and not self.in_multi
                and self._session(name, args)):
            return
        if (self.in_multi and name == b"CLIENT" and len(args) > 1
                and args[1].upper() in (b"REPLY", b"MAINT_NOTIFICATIONS")):
            # inside MULTI it would switch replies off at EXEC, with the proxy waiting on them
            self._refused(f"CLIENT {args[1].upper().decode()} in MULTI", codec.error(
                f"ERR CLIENT {args[1].upper().decode()} is not supported by this proxy inside MULTI"))
            return
        if not self.slots and not self.in_multi and not self.watching:
            self._refresh()
        if not self.authenticated and name not in (b"AUTH", b"HELLO", b"QUIT"):
            self._reply_now(codec.error("NOAUTH Authentication required."))
            return
        if name in self.guard.names:
            rule = self.guard.refusal(name, args)
            if rule is not None:
                self._refused(rule, self.guard.noperm(rule))
                return
            if self.in_multi and guard.is_config_get(name, args):
                # inside MULTI its reply would come back inside EXEC's, unmasked
                self._refused("CONFIG GET in MULTI", codec.error(
                    "NOPERM CONFIG GET inside MULTI is not relayed by this proxy (send it outside MULTI)"))
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
        if not self.in_multi and cls != "blocking" and not self.chain.admits():
            if not self._shedding:
                self._wait_for_room(args, read_at)
                return
            # waited pending_timeout for room: answered now (a cached read, or `overloaded`)
            cmd = Command(self._new_slot(), name, args, codec.encode_command(args), cls, keys or [], db, self.proto)
            self._unavailable(cmd, Reason.OVERLOADED)
            return
        if self._room_since is not None:
            self._leave_room()  # admitted (room freed without a wake-up reaching this client)
        if cls == "write":  # inside MULTI too: the write will happen at EXEC
            cache = self.chain.cache
            if name in _ALL_DBS:
                cache.clear_db(None)
            elif keys is None or name in commands.DB_WIDE:
                cache.clear_db(db)
            else:
                cache.invalidate(db, keys)
        if name == b"MULTI":
            self.in_multi = True
            self.multi_refused = False
        elif name in (b"EXEC", b"DISCARD"):
            if name == b"EXEC" and self.multi_refused:
                args = [b"DISCARD"]  # a queued command was refused: the transaction aborts, as in Redis
            self.in_multi = self.multi_refused = False
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
        raw = getattr(args, "raw", None)  # the client's own bytes, when they are what encoding would make
        if raw is None:
            raw = codec.encode_pieces(args)
        if type(raw) is list and cls == "read":
            raw = b"".join(raw)  # a read's bytes are its cache key
        cmd = Command(self._new_slot(), name, args, raw, cls, keys or [], db, self.proto, shared)
        if type(raw) is list:
            # a large command's arguments stay held until it is answered (a retry, the upstream's write
            # buffer): they count against the client's memory until then, not only while being parsed
            cmd.held = sum(len(a) for a in args)
            self.sent_bytes += cmd.held
            self._account()
        self.chain.start(cmd, read_at)
        self.forward(cmd)

    def _shareable(self, name: bytes) -> bool:
        """A plain read or write of a client with no connection state the upstream must hold for it."""
        return (name in commands.READS or name in commands.WRITES or name in _STATELESS) and self.client_name is None

    # -- forwarding ----------------------------------------------------------------------------------
    def forward(self, cmd: Command) -> None:
        chain = self.chain
        retry = cmd.attempts > 0
        if self.gone:
            chain.released(cmd)
            self._release_held(cmd)
            if cmd.shared and retry:
                self._shared_done()
            return
        target = cmd.target = self.target
        now = self.clock.monotonic()
        left = chain.timeout(cmd, now)
        if left is not None and left <= 0:  # the total ran out while the command waited
            chain.released(cmd)
            self._release_held(cmd)
            self._unavailable(cmd, Reason.TIMEOUT)
            if cmd.shared and retry:
                self._shared_done()  # a retry that will not go out: no longer owed
            return
        if not chain.admit(cmd):
            chain.released(cmd)
            self._release_held(cmd)
            self._unavailable(cmd, Reason.CIRCUIT_BREAKER_OPEN)
            if cmd.shared and retry:
                self._shared_done()
            return
        if cmd.shared:
            shared = target.pool.shared
            if shared.closed:  # dropped by a reload while this client was busy: the live one, if any
                cur = self.app.runtime.upstreams.get(self.name)
                live = cur.by_name.get(target.name) if cur is not None else None
                shared = live.pool.shared if live is not None else shared
            conn = shared.get(cmd.proto, cmd.db)
            if not retry:
                self.shared_out += 1  # a retry was still counted
        else:
            conn = self.conn
            if conn is None or conn.failed or conn.retiring:
                conn = self.conn = self._new_upstream()
        cmd.started = now
        self.seq += 1
        cmd.seq = self.seq
        until = None
        if cmd.deadline is not None:  # the connection times the head of its queue on the loop's clock
            until = self._loop.time() + (cmd.deadline - now)
        # The connection gets the whole attempt timeout (a timeout there means a slow upstream and
        # closes the connection) and, apart, the total's deadline (answered alone: see _expired).
        conn.send(cmd.raw, _CommandPending(self, cmd, chain.attempt.seconds if left is not None else None, until))

    def _release_held(self, cmd: Command) -> None:
        if cmd.held:
            self.sent_bytes -= cmd.held
            cmd.held = 0
            self._account()

    def _replied(self, cmd: Command, raw: bytes, kind: str) -> None:
        self.chain.answered(cmd, raw, kind, self.clock.monotonic() - cmd.started)
        if cmd.held:
            self._release_held(cmd)
        cls = cmd.cls
        if cls == "admin":  # replies the proxy reads (not on a read's or a write's path)
            if kind == "ok" and cmd.name == b"CLIENT" and len(cmd.args) >= 3:
                sub = cmd.args[1].upper()
                if sub == b"SETNAME" and len(cmd.args) == 3:
                    self.client_name = cmd.args[2] or None  # a new connection (after a reset) is named the same
                elif sub == b"TRACKING":
                    self.tracking = cmd.args[2].upper() == b"ON"
            elif guard.is_config_get(cmd.name, cmd.args):
                raw = guard.masked_config(raw)
        elif cls == "transaction" and cmd.name == b"EXEC" and cmd.args[0] == b"DISCARD" and kind == "ok":
            raw = codec.error("EXECABORT Transaction discarded because of previous errors.")
        self._resolve(cmd.slot, raw)
        if cmd.shared:
            self._shared_done()

    def _refused(self, rule: str, reply: bytes) -> None:
        if self.in_multi:
            self.multi_refused = True
        self._guard_refused(rule)
        self._reply_now(reply)

    def _failed(self, cmd: Command, kind: str, conn=None) -> None:
        retried = self._failed_inner(cmd, kind, conn)
        if not retried and cmd.held:
            self._release_held(cmd)
        if cmd.shared and not retried:
            self._shared_done()  # a retried command stays owed until its retry is answered

    def _failed_inner(self, cmd: Command, kind: str, conn=None) -> bool:
        """→ True when the command will be retried."""
        chain = self.chain
        if kind in ("closed", "client-setup"):
            chain.abandoned(cmd)  # the proxy or the client ended it: not the upstream's fault
            if kind == "client-setup" and not self.gone:
                err = (conn.error if conn is not None else None) or "setup failed"
                self._resolve(cmd.slot, error_reply(err))
            elif not self.gone:
                self._resolve(cmd.slot, codec.error("ERR the upstream connection was reset by the proxy"))
            return False
        in_txn = self.in_multi or self.watching
        may_retry = not (self.gone or self.closing or in_txn) and cmd.seq == self.seq  # a later command went out: no
        delay = chain.failed(cmd, kind, self.clock.monotonic() - cmd.started, may_retry)
        if self.gone:
            return False
        reason = chain.reason(kind)
        if in_txn:
            # A transaction or WATCH lives on that connection: it is gone, and replaying it elsewhere
            # would run commands outside it. Fail this command, then close so the client starts over.
            self._unavailable(cmd, reason)
            self._close_after_flush()
            return False
        if delay is None:
            self._unavailable(cmd, reason)
            return False
        self.retrying += 1
        self.clock.call_later(delay, self._retry, cmd)
        return True

    def _retry(self, cmd: Command) -> None:
        self.retrying -= 1
        self.forward(cmd)
        if not self.retrying and self._parked is not None:
            self._release_parked()

    def _unavailable(self, cmd: Command, reason: Reason) -> None:
        """The upstream cannot answer: a cached read, or a clear error. Never queued, never dropped."""
        self._resolve(cmd.slot, self.chain.stand_in(cmd, self.target.name, reason))

    # -- upstream connections ------------------------------------------------------------------------
    def _new_upstream(self) -> UpstreamConnection:
        conn = UpstreamConnection(self.up_target, self.proto, self.db, self.client_name,
                                  self.up.spec.timeouts.connect, self._out_of_band, self._out_of_band,
                                  lib_info=tuple(self.lib_info.items()))
        conn.on_batch = self._batch
        conn.on_closed = self._upstream_closed
        if self.transport is not None and self.write_paused:
            conn.paused_at_start = True
        return conn

    def _upstream_closed(self, conn: UpstreamConnection) -> None:
        """Its own connection went. With CLIENT TRACKING on, the invalidations Redis kept for it went with
        it: a new connection would leave the client's local cache silently stale, so the client is
        closed instead (it reconnects, turns tracking on again and starts with an empty cache)."""
        if conn is self.conn and self.tracking and not self.gone:
            log.warning("redis_tracking_lost", upstream=self.name, error=conn.error)
            self.tracking = False
            self._close_after_flush()

    def _drop_upstream(self) -> None:
        """The upstream connection speaks an old state (protocol, db): answer what is sent, then close."""
        if self.conn is not None and self.tracking and not self.gone:
            # its invalidations go with it (a reload, a track switch, a protocol switch): as when it is lost
            log.warning("redis_tracking_lost", upstream=self.name, error="the connection was switched")
            self.tracking = False
            self._close_after_flush()
        if self.conn is not None:
            old = self.conn
            old.retire()
            if not old.failed:
                self._retired.add(old)
                old.on_closed = self._retired.discard
            self.conn = None

    # -- pub/sub, MONITOR -----------------------------------------------------------------------------
    def _enter_tunnel(self, args: list[bytes]) -> None:
        """From here on replies are not one per command: bytes flow raw both ways on this connection."""
        if not self.chain.tunnel_admits(self.target):
            self._reply_now(self.chain.unavailable(Reason.CIRCUIT_BREAKER_OPEN))
            return
        if self.conn is None or self.conn.failed or self.conn.retiring:
            self.conn = self._new_upstream()
        self.tunnel = True
        self.conn.tunnel = True
        self.conn.on_tunnel_closed = self._tunnel_closed
        self.chain.count(self.target.name, "tunnel", "ok", "upstream")
        self.conn.send(codec.encode_command(args), None)

    def _tunnel_closed(self) -> None:
        """The upstream side of a pub/sub or MONITOR tunnel ended: the subscriber must know."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
