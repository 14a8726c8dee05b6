"""What a Redis client may do through the listener (a part of the listener, before the resilience chain):
the command policy, the masking of secrets in CONFIG GET, and the throttling of failed client AUTH.

The app and anything else in the pod reach the egress listener; they must not get the upstream's
password or its admin powers from it. As twemproxy and Envoy's redis_proxy restrict what they forward,
the listener answers these itself with `-NOPERM` (redis-py raises NoPermissionError), by default:

    CONFIG SET|REWRITE|RESETSTAT, SHUTDOWN, DEBUG, MIGRATE (to a host of the client's choosing), MODULE,
    REPLICAOF, SLAVEOF, FAILOVER, SYNC, PSYNC, ACL (but ACL WHOAMI and ACL CAT), CLIENT KILL, SAVE,
    BGSAVE, BGREWRITEAOF

`redis.deny_commands` adds to that and `redis.allow_commands` lets a command or subcommand through. The
upstream's rules beat the defaults: its rule for a whole command ('ACL', 'CONFIG') replaces the defaults'
rules for that command's subcommands; among rules of one side, a subcommand's ('ACL WHOAMI') beats its
command's ('ACL'). CONFIG GET is relayed with the values of secret parameters replaced. FLUSHDB,
FLUSHALL and MONITOR stay allowed. A script (EVAL, FCALL) runs on the server, out of the proxy's sight:
Redis itself refuses most admin commands inside scripts (they are `noscript`), but not MIGRATE; deny
EVAL/EVALSHA/FCALL where that matters.
"""

from __future__ import annotations

from proxy.redis import codec

DEFAULT_DENY = ("CONFIG SET", "CONFIG REWRITE", "CONFIG RESETSTAT", "SHUTDOWN", "DEBUG", "MIGRATE", "MODULE",
                "REPLICAOF", "SLAVEOF", "FAILOVER", "SYNC", "PSYNC", "ACL", "CLIENT KILL", "SAVE", "BGSAVE",
                "BGREWRITEAOF")
DEFAULT_ALLOW = ("ACL WHOAMI", "ACL CAT")

# CONFIG GET parameters whose values are credentials (Redis 7/8 names)
SECRET_CONFIG = frozenset({b"requirepass", b"masterauth", b"tls-key-file-pass", b"tls-client-key-file-pass"})
MASK = b"<redacted>"

# On a pub/sub or MONITOR connection the proxy relays bytes, not commands: only these may follow, as a
# RESP2 Redis allows (RESP3 would run anything there, replies unseen by the proxy).
TUNNEL_COMMANDS = frozenset({b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"UNSUBSCRIBE", b"PUNSUBSCRIBE",
                             b"SUNSUBSCRIBE", b"PING", b"QUIT"})


class CommandGuard:
    """Built once per config load from `redis:`; `refusal()` is one set lookup for a command no rule
    names (every GET and SET)."""

    __slots__ = ("upstream", "names", "_whole", "_sub")

    def __init__(self, upstream: str, spec) -> None:
        self.upstream = upstream
        self._whole: dict[bytes, bool] = {}  # command → denied
        self._sub: dict[tuple[bytes, bytes], bool] = {}
        mine: set[tuple[bytes, bytes]] = set()  # the upstream's own subcommand rules
        for rules, denied, own in ((DEFAULT_DENY, True, False), (DEFAULT_ALLOW, False, False),
                                   (spec.deny_commands, True, True), (spec.allow_commands, False, True)):
            for rule in rules:
                name, _, sub = rule.encode().partition(b" ")
                if sub:
                    self._sub[(name, sub)] = denied
                    if own:
                        mine.add((name, sub))
                else:
                    self._whole[name] = denied
                    if own:  # the upstream's rule for a whole command replaces the defaults' subcommand rules
                        for key in [k for k in self._sub if k[0] == name and k not in mine]:
                            del self._sub[key]
        self.names = frozenset(self._whole) | frozenset(n for n, _ in self._sub)

    def refusal(self, name: bytes, args: list[bytes]) -> str | None:
        """The rule ('CONFIG SET', 'DEBUG') that refuses this command, else None."""
        if name not in self.names:
            return None
        sub = args[1].upper() if len(args) > 1 else b""
        rule = (name, sub)
        denied = self._sub.get(rule)
        if denied is None:
            denied, rule = self._whole.get(name, False), (name, b"")
        if not denied:
            return None
        return b" ".join(p for p in rule if p).decode()

    def noperm(self, rule: str) -> bytes:
        return codec.error(f"NOPERM '{rule}' is not relayed by this proxy "
                           f"(upstreams.{self.upstream}.redis.allow_commands lets it through)")


def is_config_get(name: bytes, args: list[bytes]) -> bool:
    return name == b"CONFIG" and len(args) > 1 and args[1].upper() == b"GET"


def masked_config(raw: bytes) -> bytes:
    """A CONFIG GET reply with secret values replaced. A reply of another shape (it never is one) is not
    passed on: failing closed is the point."""
    if raw[:1] == b"-":
        return raw
    out = codec.mask_pairs(raw, SECRET_CONFIG, MASK)
    return out if out is not None else codec.error("ERR the CONFIG GET reply could not be checked for secrets")


class AuthThrottle:
    """Failed client AUTH attempts of one upstream, all connections together (state: survives a reload),
    so a new connection does not start a guesser over. The first FREE failures cost nothing; after them
    an attempt is checked no sooner than INTERVAL after the one before (about ten guesses a second, for
    every connection together), and one that would wait over MAX_WAIT is refused unchecked. Failures are
    forgotten FORGET seconds after the last one. A connection is closed after PER_CONNECTION failures."""

    FREE = 5
    INTERVAL = 0.1
    MAX_WAIT = 2.0
    FORGET = 60.0
    PER_CONNECTION = 3

    __slots__ = ("failures", "last_failure", "next_at")

    def __init__(self) -> None:
        self.failures = 0
        self.last_failure = float("-inf")
        self.next_at = float("-inf")

    def wait(self, now: float) -> float | None:
        """Seconds before this attempt may be answered; None: refused without being checked."""
        if now - self.last_failure > self.FORGET:
            self.failures = 0
        if self.failures < self.FREE:
            return 0.0
        at = max(now, self.next_at)
        if at - now > self.MAX_WAIT:
            return None
        self.next_at = at + self.INTERVAL
        return at - now

    def failed(self, now: float) -> None:
        self.failures += 1
        self.last_failure = now
