"""What each Redis command is, for the proxy's purposes: a read (cacheable, retried), a write (never
retried; invalidates the cached reads of the keys it names), a blocking or stateful command (passed
through untouched), or one that changes a whole db (clears that db's cache). Unknown commands are
treated as writes that clear their db's cache: safe, if pessimistic."""

from __future__ import annotations

# key specs: "first" = args[1]; "all" = args[1:]; "pairs" = args[1::2]; "none"
READS: dict[bytes, str] = {c: "first" for c in (
    b"GET", b"HGET", b"HMGET", b"HGETALL", b"HKEYS", b"HVALS", b"HLEN", b"HEXISTS", b"HSTRLEN", b"TTL", b"PTTL",
    b"TYPE", b"STRLEN", b"GETRANGE", b"LRANGE", b"LLEN", b"LINDEX", b"LPOS", b"SMEMBERS", b"SISMEMBER",
    b"SMISMEMBER", b"SCARD", b"SRANDMEMBER", b"ZRANGE", b"ZRANGEBYSCORE", b"ZREVRANGE", b"ZREVRANGEBYSCORE",
    b"ZRANGEBYLEX", b"ZSCORE", b"ZMSCORE", b"ZCARD", b"ZCOUNT", b"ZLEXCOUNT", b"ZRANK", b"ZREVRANK",
    b"GETBIT", b"BITCOUNT", b"BITPOS", b"PFCOUNT", b"GEOPOS", b"GEODIST", b"GEOSEARCH", b"GEOHASH",
    b"XRANGE", b"XREVRANGE", b"XLEN", b"SUBSTR", b"EXPIRETIME", b"PEXPIRETIME", b"OBJECT", b"DUMP",
    b"JSON.GET", b"LCS",
)}
READS.update({b"HSCAN": "first", b"SSCAN": "first", b"ZSCAN": "first"})
READS.update({b"MGET": "all", b"EXISTS": "all", b"SINTER": "all", b"SUNION": "all", b"SDIFF": "all",
              b"TOUCH": "all"})
# Reads that name no key: cached per (db, command) and invalidated only by db-wide changes.
READS.update({c: "none" for c in (b"DBSIZE", b"KEYS", b"SCAN", b"RANDOMKEY")})

WRITES: dict[bytes, str] = {c: "first" for c in (
    b"SET", b"SETEX", b"PSETEX", b"SETNX", b"SETRANGE", b"APPEND", b"INCR", b"DECR", b"INCRBY", b"DECRBY",
    b"INCRBYFLOAT", b"GETSET", b"GETDEL", b"GETEX", b"EXPIRE", b"PEXPIRE", b"EXPIREAT", b"PEXPIREAT",
    b"PERSIST", b"HSET", b"HSETNX", b"HMSET", b"HDEL", b"HINCRBY", b"HINCRBYFLOAT", b"LPUSH", b"RPUSH",
    b"LPUSHX", b"RPUSHX", b"LPOP", b"RPOP", b"LSET", b"LREM", b"LTRIM", b"LINSERT", b"SADD", b"SREM",
    b"SPOP", b"ZADD", b"ZREM", b"ZINCRBY", b"ZPOPMIN", b"ZPOPMAX", b"ZREMRANGEBYSCORE", b"ZREMRANGEBYRANK",
    b"ZREMRANGEBYLEX", b"SETBIT", b"BITFIELD", b"PFADD", b"GEOADD", b"XADD", b"XDEL", b"XTRIM",
    b"JSON.SET", b"JSON.DEL", b"RESTORE", b"XACK", b"XCLAIM", b"XAUTOCLAIM", b"XGROUP", b"XSETID",
    b"HEXPIRE", b"HPEXPIRE", b"HPERSIST",
)}
WRITES.update({b"DEL": "all", b"UNLINK": "all", b"MSET": "pairs", b"MSETNX": "pairs", b"PFMERGE": "all",
               b"SMOVE": "first2", b"LMOVE": "first2", b"RPOPLPUSH": "first2", b"COPY": "first2",
               b"SINTERSTORE": "all", b"SUNIONSTORE": "all", b"SDIFFSTORE": "all", b"ZUNIONSTORE": "all",
               b"ZINTERSTORE": "all", b"ZDIFFSTORE": "all", b"BITOP": "all", b"SORT": "all"})

# Change a whole db (or all of them): the cache of that db goes.
DB_WIDE = frozenset({b"FLUSHDB", b"FLUSHALL", b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL",
                     b"FCALL_RO", b"RENAME", b"RENAMENX", b"MOVE", b"SWAPDB", b"RESTORE-ASKING", b"MIGRATE"})

# No per-command timeout beyond their own; never retried or cached.
BLOCKING = frozenset({b"BLPOP", b"BRPOP", b"BLMOVE", b"BRPOPLPUSH", b"BZPOPMIN", b"BZPOPMAX", b"BLMPOP",
                      b"BZMPOP", b"WAIT", b"WAITAOF", b"XREAD", b"XREADGROUP"})
# Connection state the proxy must not replay or cache around.
TRANSACTION = frozenset({b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"UNWATCH"})
# Switch the connection into a mode where replies are no longer one per command: tunnel from then on.
TUNNEL = frozenset({b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR"})
# Answered or tracked by the proxy itself.
LOCAL = frozenset({b"HELLO", b"AUTH", b"SELECT", b"QUIT", b"RESET"})

CLASSES = ("read", "write", "blocking", "transaction", "tunnel", "admin")


ADMIN = frozenset({b"PUBLISH", b"SPUBLISH", b"PUBSUB", b"UNSUBSCRIBE", b"PUNSUBSCRIBE", b"SUNSUBSCRIBE", b"PING",
                   b"ECHO", b"TIME", b"INFO", b"CLIENT", b"CONFIG", b"COMMAND", b"MEMORY", b"LATENCY", b"SLOWLOG",
                   b"ROLE", b"LASTSAVE", b"DEBUG", b"SCRIPT", b"FUNCTION", b"CLUSTER", b"READONLY", b"READWRITE",
                   b"ACL", b"OBJECT"})

# One lookup per command: built once, later groups win where a name is in two (OBJECT is a read).
_CLASS: dict[bytes, str] = {}
for _cls, _names in (("admin", ADMIN), ("write", WRITES.keys() | DB_WIDE), ("tunnel", TUNNEL),
                     ("transaction", TRANSACTION), ("blocking", BLOCKING), ("read", READS.keys())):
    _CLASS.update(dict.fromkeys(_names, _cls))


def classify(name: bytes) -> str:
    return _CLASS.get(name, "write")  # unknown: a write of unknown keys (clears the db's cache)


def keys_of(name: bytes, args: list[bytes]) -> list[bytes] | None:
    """Keys the command names, or None when they are unknown (the caller then clears the db)."""
    spec = READS.get(name) or WRITES.get(name)
    if spec is None:
        return None
    if spec == "first":
        return args[1:2]
    if spec == "first2":
        return args[1:3]
    if spec == "all":
        return args[1:]
    if spec == "pairs":
        return args[1::2]
    return []
