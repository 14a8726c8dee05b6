"""Session commands of a Redis client connection (a part of the listener's protocol): QUIT, AUTH, HELLO,
SELECT and RESET are answered here, so a client connects (and reads its cached values) even while Redis
is down; CLIENT SETINFO and MAINT_NOTIFICATIONS are taken here so they do not cost the client its place
on a shared connection; WAIT after multiplexed writes is refused. What a new upstream connection must
replay for the client (protocol, db, name) is kept on the client and sent by proxy/redis/upstream.py.
"""

from __future__ import annotations

import hmac

from proxy.redis import codec
from proxy.redis.upstream import Pending, ignore

_WRONGPASS = codec.error("WRONGPASS invalid username-password pair or user is disabled.")
_THROTTLED = codec.error("ERR too many failed AUTH attempts on this listener: try again later")


def error_reply(err: str) -> bytes:
    """Redis's own error text (`ERR …`, `WRONGPASS …`) as it came, anything else as an ERR."""
    code = err.split(" ", 1)[0]
    return codec.error(err if code.isupper() and code.isalpha() else f"ERR {err}")


class SessionCommands:
    """Expects the listener's client state (`db`, `proto`, `client_name`, `authenticated`, `conn`, `up`,
    `target`, `dedicated`, ...) on the protocol it is mixed into."""

    def _session(self, name: bytes, args: list[bytes]) -> bool:
        """CLIENT SETINFO / MAINT_NOTIFICATIONS and WAIT, answered here: True when it was."""
        if name == b"CLIENT" and len(args) > 1:
            sub = args[1].upper()
            if sub == b"SETINFO" and len(args) == 4:
                # redis-py and other clients send their library name and version on connect: metadata
                # of the app's connection, which upstream is a shared one. Taken here, so it does not
                # cost the client its place on the shared connection.
                attr = args[2].upper()
                if attr in (b"LIB-NAME", b"LIB-VER"):
                    self.lib_info[attr.lower()] = args[3]  # sent on the client's own connection, if it gets one
                    conn = self.conn
                    if conn is not None and not conn.failed and not conn.retiring:
                        # it has one already (SETNAME came first): set it there too; its reply is the proxy's
                        conn.send(codec.encode_command(args), Pending(b"", ignore, ignore, None))
                    self._reply_now(codec.OK)
                else:
                    self._reply_now(codec.error("ERR Unrecognized option " + repr(args[2].decode(errors="replace"))))
                return True
            if sub == b"REPLY" and len(args) == 3:
                # OFF/SKIP: Redis stops answering, and the proxy, which answers every command in order
                # and times each reply, would wait for replies that never come. Refused up front.
                mode = args[2].upper()
                if mode == b"ON":
                    self._reply_now(codec.OK)
                else:
                    self._reply_now(codec.error(f"ERR CLIENT REPLY {mode.decode(errors='replace')} is not supported "
                                                "by this proxy: every command is answered"))
                return True
            if sub == b"MAINT_NOTIFICATIONS":
                # redis-py 6+ asks for maintenance push notifications on RESP3 connections ("auto": an
                # error is fine). They would arrive on a shared connection, where no client can be
                # told: refused, as a Redis server without the feature refuses it.
                self._reply_now(codec.error("ERR unknown subcommand 'MAINT_NOTIFICATIONS': not relayed by this proxy"))
                return True
        if (name == b"WAIT" or name == b"WAITAOF") and self.wrote_shared:
            # WAIT counts the replicas that have this connection's writes; this client's writes went
            # over a connection shared with others, so any answer would be a guess. Refused, loudly.
            self._reply_now(codec.error(
                "ERR WAIT/WAITAOF after writes multiplexed by the proxy cannot be honoured: "
                "send them from a connection that started with MULTI, a blocking command or CLIENT SETNAME"))
            return True
        return False

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
                  and (self.proto, db) not in self.target.pool.shared.checked_dbs):
                self._select_shared(db)
            else:
                self.db = db  # validated when the next connection opens (a bad db fails only this client)
                self._reply_now(codec.OK)
        elif name == b"RESET":
            self._drop_upstream()
            self.db, self.proto, self.client_name, self.in_multi, self.watching = None, 2, None, False, False
            self.tracking = False  # RESET turns tracking off
            self.authenticated = self.up.wire.client_password is None
            self._reply_now(b"+RESET\r\n")

    def _select_shared(self, db: int) -> None:
        """SELECT for a client on shared connections: check the db on the shared connection for it (its
        setup runs SELECT), holding back what follows, so a db that does not exist is an error now — as
        Redis answers — and the client stays where it was. With Redis unreachable it is accepted as
        before (checked when a connection opens), so clients still connect and read the cache."""
        shared = self.target.pool.shared

        def answered(raw: bytes, kind: str) -> bytes:
            if kind == "error":
                return raw
            shared.checked_dbs.add((self.proto, db))  # the next SELECT of it is answered at once
            self.db = db
            return codec.OK

        def failed(kind: str, conn) -> bytes:
            if kind == "client-setup" and conn is not None and conn.setup_failed_on == b"SELECT":
                return error_reply(conn.error or "ERR DB index is out of range")
            self.db = db  # unreachable or reset: the check is for later
            return codec.OK

        self._ask_shared(db, answered, failed)

    def _ask_shared(self, db: int, answered, failed) -> None:
        """Hold what follows and PING the shared connection of (protocol, db), whose setup does the real
        work (SELECT, HELLO): the reply owed here is `answered(raw, kind)` or `failed(kind, conn)`. A short
        wait: a check must not hold the client for a whole attempt timeout."""
        slot = self._new_slot()
        self._validating = True
        self._hold()

        def done(reply: bytes) -> None:
            self._validating = False
            self._resolve(slot, reply)
            self._release_parked()

        pending = Pending(b"", lambda raw, kind: done(answered(raw, kind)),
                          lambda kind: done(failed(kind, pending.conn)),
                          min(self.up.spec.timeouts.attempt, self.up.spec.timeouts.connect))
        self.target.pool.shared.get(self.proto, db).send(codec.encode_command([b"PING"]), pending)

    def _auth(self, creds: list[bytes]) -> None:
        want = self.up.wire.client_password
        if want is None:
            self.authenticated = True  # no client_auth: any AUTH is accepted (README)
            self._reply_now(codec.OK)
            return
        self._checked(len(creds) in (1, 2) and hmac.compare_digest(creds[-1], want), self._auth_ok)

    def _auth_ok(self) -> None:
        self.authenticated = True
        self._reply_now(codec.OK)

    def _checked(self, ok: bool, then) -> None:
        """A client_auth password check, throttled for the whole upstream (guard.AuthThrottle): `then()`
        answers a right one, WRONGPASS a wrong one, either after the upstream's current wait, during
        which this client's later commands wait too. Too many failures close the connection."""
        throttle = self.up.wire.auth
        now = self.clock.monotonic()
        wait = throttle.wait(now)
        if wait is None:
            self.up.metrics.auth_failed("throttled")
            self._reply_now(_THROTTLED)
            self._close_after_flush()
            return
        if not ok:
            throttle.failed(now)
            self.auth_failures += 1
            self.up.metrics.auth_failed("wrongpass")
        if wait <= 0:
            self._auth_answer(ok, then)
            return
        self._validating = True  # what the client sends meanwhile waits behind the answer
        self._hold()
        self.clock.call_later(wait, self._auth_later, ok, then)

    def _auth_later(self, ok: bool, then) -> None:
        self._validating = False
        if self.gone or self.closing:
            return
        self._auth_answer(ok, then)
        self._release_parked()

    def _auth_answer(self, ok: bool, then) -> None:
        if ok:
            then()
            return
        self._reply_now(_WRONGPASS)
        if self.auth_failures >= self.up.wire.auth.PER_CONNECTION:
            self._close_after_flush()  # a guesser starts over on a new connection, and the wait with it

    def _hello(self, args: list[bytes]) -> None:
        proto = self.proto
        rest = args
        if rest:
            if not rest[0].isdigit() or int(rest[0]) not in (2, 3):
                self._reply_now(codec.error("NOPROTO unsupported protocol version"))
                return
            proto, rest = int(rest[0]), rest[1:]
        i, password, name = 0, None, None
        while i < len(rest):
            opt = rest[i].upper()
            if opt == b"AUTH" and i + 2 < len(rest):
                password = rest[i + 2]
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(rest):
                name = rest[i + 1]
                i += 2
            else:
                self._reply_now(codec.error(f"ERR Syntax error in HELLO option '{opt.decode(errors='replace')}'"))
                return
        want = self.up.wire.client_password
        if password is not None and want is not None:
            self._checked(hmac.compare_digest(password, want), lambda: self._hello_done(proto, name, True))
        else:
            self._hello_done(proto, name, password is not None)

    def _hello_done(self, proto: int, name: bytes | None, authed: bool) -> None:
        if authed:
            self.authenticated = True
        if not self.authenticated:
            self._reply_now(codec.error("NOAUTH HELLO must be called with the client already authenticated"))
            return
        if name is not None:
            self.client_name = name
        if proto != self.proto:
            self._drop_upstream()  # the upstream connection speaks the old protocol
            self.proto = proto
        if self.up_target.server is None and self.target.breaker.state == "closed":
            self._learn_server()
            return
        self._reply_now(codec.hello_reply(proto, id(self) & 0xFFFF, self.up_target.server))

    def _learn_server(self) -> None:
        """HELLO before any connection to the upstream told the proxy what it is: open the shared one (its
        setup asks) and answer once it has, what follows waiting behind; with Redis unreachable, the
        defaults (so clients still connect and read the cache)."""

        def hello(*_) -> bytes:
            return codec.hello_reply(self.proto, id(self) & 0xFFFF, self.up_target.server)

        self._ask_shared(self.db if self.db is not None else self.up_target.db, hello, hello)

