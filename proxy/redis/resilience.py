"""The resilience decisions for one Redis command: the shared chain, as plain calls.

    fallback (stale read) → shed (max_in_flight) → total timeout → retry (budget) → breaker → classify
    → attempt timeout → upstream connection (proxy/redis/upstream.py)

The policy objects are the ones an HTTP route folds into its chain (proxy/policy), built from the same
specs and driven by the same injected clock. A command calls their synchronous halves (`admits`,
`start`, `budget`, `admit`/`record`, `acquire`, `source`/`served`) because it runs without a coroutine
of its own: the listener dispatches it from `data_received` and the upstream connection calls back with
its reply. A retry rule, a breaker rule or a timeout rule is therefore changed in proxy/policy, for HTTP
and Redis alike. The rules where RESP differs are stated here, and only here:

- Only reads are retried (`replayable`): a write that reached Redis before its connection broke may have
  run, and Redis has no idempotency key. A read is retried only while it is still the client's last
  command sent (a later one must not overtake it), and never inside MULTI/WATCH: the transaction lived on
  the connection that failed, so the client gets the error and is closed, to start over.
- Any reply is the upstream answering, an error reply included; connect failure, reset and timeout are
  its failures; a failure of a shared connection charges the breaker once (`Classify.failure`).
- The total timeout runs from when the proxy has read the command. Blocking commands, MULTI/EXEC and
  tunnels have none (a BLPOP may wait for minutes; a transaction's pace is the client's), and blocking
  commands have no attempt timeout either.
- Over `max_in_flight` the listener stops reading from the client; a command still waiting after
  `limits.pending_timeout` is answered from the stale-read cache, or `-UNAVAILABLE … (overloaded)` (never
  `-BUSY`: that means a script is running). Commands queued inside MULTI are not shed (the transaction
  would run without them), nor are blocking commands (a queue worker's BLPOP is meant to wait); both
  count as in flight.
"""

from __future__ import annotations

import functools

from proxy.exchange import Call, Reason, Verdict
from proxy.policy.breaker import Breaker
from proxy.policy.classify import Classify
from proxy.policy.fallback import Fallback
from proxy.policy.retry import Retry
from proxy.policy.shed import Shed
from proxy.policy.timeout import AttemptTimeout, TotalTimeout
from proxy.redis import codec, commands

NO_TOTAL = frozenset({"blocking", "transaction", "tunnel"})
_REASON_STATUS = {Reason.TIMEOUT: "timeout", Reason.OVERLOADED: "error", Reason.UPSTREAM_ERROR: "error",
                  Reason.CIRCUIT_BREAKER_OPEN: "error"}
_REASON_OUTCOME = {Reason.OVERLOADED: "shed"}


class Command(Call):
    """One command on its way: its place in the reply order, what it is, and the Call fields the
    policies read (target, deadline, attempts, replayable)."""

    __slots__ = ("slot", "name", "args", "raw", "cls", "keys", "token", "db", "proto", "started", "seq",
                 "shared", "budgeted", "held")

    def __init__(self, slot, name, args, raw, cls, keys, db, proto, shared=False) -> None:
        # Call's fields set here rather than by Call.__init__: a call less on every command
        self.target = None
        self.idempotent = self.replayable = cls == "read"
        self.deadline = self.timeout = None
        self.total = 0.0
        self.attempts = 0
        self.slot, self.name, self.args, self.raw, self.cls, self.keys = slot, name, args, raw, cls, keys
        self.db, self.proto, self.shared = db, proto, shared
        self.seq = 0
        self.token = 0
        self.started = 0.0
        self.budgeted = False  # holds a share of the retry budget until this attempt has an outcome
        self.held = 0  # bytes of a large command's arguments the client's memory counts until its answer


class CommandChain:
    """Built once per config load for a Redis upstream (`up`), from its specs."""

    __slots__ = ("up", "name", "cache", "fallback", "shed", "total", "retry", "breaker", "classify", "attempt",
                 "pending_timeout", "_counts", "admits", "_answered")

    def __init__(self, up, cache, deadlines, clock) -> None:
        spec = up.spec
        self.up, self.name, self.cache = up, up.name, cache
        self.fallback = Fallback(spec.fallback, cache, clock, up.metrics)
        self.shed = Shed(up.counters, spec.limits.max_in_flight, up.metrics)
        self.total = TotalTimeout(spec.timeouts.total, clock)
        self.retry = Retry(spec.retry, up.counters.budget, clock, up.metrics) if spec.retry.attempts > 1 else None
        self.breaker = Breaker(clock)
        self.classify = Classify(frozenset())
        self.attempt = AttemptTimeout(spec.timeouts.attempt, clock, deadlines)
        self.pending_timeout = spec.limits.pending_timeout
        # Room for one more command in flight (max_in_flight)? The shed policy's rule, bound once.
        self.admits = functools.partial(self.shed.admits, 1)
        self._answered = self.classify.reply("")  # any reply is an answer: the verdict needs no reply
        m = up.metrics.m
        self._counts = {}
        for t in up.targets:
            for cls in commands.CLASSES:
                for status, outcome in (("ok", "upstream"), ("error", "upstream"), ("ok", "fallback"),
                                        ("error", "rejected"), ("timeout", "rejected"), ("error", "shed")):
                    self._counts[(t.name, cls, status, outcome)] = (
                        m.requests.labels(up.name, t.name, "default", status, outcome),
                        m.redis_commands.labels(up.name, cls, outcome))

    def count(self, track: str, cls: str, status: str, outcome: str) -> None:
        a, b = self._counts[(track, cls, status, outcome)]
        a.inc()
        b.inc()

    # -- before the command goes out -----------------------------------------------------------------
    def start(self, cmd: Command, read_at: float) -> None:
        if cmd.cls not in NO_TOTAL:
            self.total.start(cmd, read_at)

    def timeout(self, cmd: Command, now: float) -> float | None:
        """This attempt's timeout: None for a blocking command; <= 0 when the total is already spent."""
        if cmd.cls == "blocking":
            return None
        return self.attempt.budget(cmd, now)[0]

    def admit(self, cmd: Command) -> bool:
        """The breaker's admission for this attempt (False: open, no I/O at all)."""
        br = cmd.target.breaker
        token = 0 if br.clean else self.breaker.admit(cmd)  # clean: closed, nothing on record (one read)
        if token is None:
            return False
        cmd.token = token
        cmd.attempts += 1
        return True

    def tunnel_admits(self, target) -> bool:
        """SUBSCRIBE/MONITOR: not while the breaker is open; the tunnel itself is no attempt to count."""
        token = target.breaker.admit()
        if token is None:
            return False
        target.breaker.cancel(token)
        return True

    # -- the outcome ---------------------------------------------------------------------------------
    def answered(self, cmd: Command, raw: bytes, kind: str, elapsed: float) -> None:
        """A reply (an error reply included) came back for the command's attempt."""
        up = self.up
        if cmd.budgeted:
            self.released(cmd)
        if cmd.token or not cmd.target.breaker.clean:  # a success on a clean record changes nothing
            self.breaker.record(cmd, cmd.token, self._answered, elapsed)
        if self.cache.episode is not None:
            self.fallback.fresh()
        up.metrics.duration(cmd.target.name, elapsed)
        self.count(cmd.target.name, cmd.cls, "error" if kind == "error" else "ok", "upstream")
        if cmd.target.canary is not None:
            up.record_outcome(cmd.target, False, elapsed)
        if kind == "ok" and cmd.cls == "read":
            self.cache.store(cmd.db, cmd.proto, cmd.raw, cmd.keys, raw)
        elif cmd.cls == "write" and cmd.keys:
            self.cache.invalidate(cmd.db, cmd.keys)  # a read that raced the write must not survive it

    def failed(self, cmd: Command, kind: str, elapsed: float, may_retry: bool) -> float | None:
        """The attempt failed (`kind`: connect-failure | reset | timeout, maybe `-collateral`). Records
        the verdict; → the wait before a retry (its budget taken), or None: the failure stands.
        `may_retry` is the listener's order rule: the command is still the client's last, outside
        MULTI/WATCH, and the client is still there."""
        self.released(cmd)
        verdict = self.classify.failure(kind)
        self.breaker.record(cmd, cmd.token, verdict, elapsed)
        if verdict is Verdict.FAILURE and cmd.target.canary is not None:
            self.up.record_outcome(cmd.target, True, elapsed)
        if self.retry is None or not may_retry or verdict is Verdict.REJECTED:
            return None
        delay = self.retry.acquire(cmd, self.classify.condition(kind), None, None, cmd.attempts)
        cmd.budgeted = delay is not None
        return delay

    def abandoned(self, cmd: Command) -> None:
        """The attempt ended without an outcome (the proxy or the client closed its connection)."""
        self.released(cmd)
        self.breaker.record(cmd, cmd.token, None, 0.0)

    def released(self, cmd: Command) -> None:
        """The attempt has an outcome, or a retry will not go out after all: its budget back."""
        if cmd.budgeted:
            cmd.budgeted = False
            self.up.counters.budget.release()

    def reason(self, kind: str) -> Reason:
        """Why a failed command got no fresh answer (for the fallback and its error)."""
        return Reason.TIMEOUT if self.classify.timed_out(kind) else Reason.UPSTREAM_ERROR

    # -- when the upstream cannot answer --------------------------------------------------------------
    def stand_in(self, cmd: Command, track: str, reason: Reason) -> bytes:
        """A cached read (fresh or stale), or a clear error. Never queued, never dropped."""
        if reason is Reason.OVERLOADED:
            self.up.metrics.shed()  # shed, whether the cache then answers or not (as on HTTP)
        if cmd.cls == "read":
            hit = self.cache.get(cmd.db, cmd.proto, cmd.raw, cmd.keys)
            if hit is not None:
                reply, stored_at = hit
                self.fallback.served(self.fallback.source(stored_at), reason)
                self.count(track, cmd.cls, "ok", "fallback")
                return reply
        self.count(track, cmd.cls, _REASON_STATUS[reason], _REASON_OUTCOME.get(reason, "rejected"))
        return self.unavailable(reason)

    def unavailable(self, reason: Reason) -> bytes:
        return codec.error(f"UNAVAILABLE redis upstream '{self.name}' is unavailable ({reason.value})")
