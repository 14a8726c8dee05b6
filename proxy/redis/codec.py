"""RESP2/RESP3, sans-IO: bytes in, frames out; values in, bytes out. No sockets, so it is fuzzed directly.

`RequestParser` turns client bytes into commands (lists of bytes; RESP arrays of bulk strings, or inline
commands as redis-cli sends them). `ReplyFramer` cuts upstream bytes into whole replies, kept as the raw
bytes they arrived as (replies are forwarded untouched), marking errors and RESP3 pushes. Both enforce
limits and raise ProtocolError on anything malformed; the caller answers with an error and closes.
"""

from __future__ import annotations


class ProtocolError(Exception):
    pass


MAX_BULK = 512 * 1024 * 1024      # Redis' own proto-max-bulk-len
MAX_ARGS = 1024 * 1024
MAX_INLINE = 64 * 1024
MAX_DEPTH = 64
_ARG_OVERHEAD = 40  # what Python holds per argument besides its bytes (object header, list slot)
_PIECE = 64 * 1024  # a larger argument is copied out once and sent as it is, not copied into the command's bytes


def _int(buf: bytes | bytearray, start: int, end: int) -> int:
    raw = bytes(buf[start:end])
    if not raw or len(raw) > 20 or not (raw.isdigit() or (raw[:1] == b"-" and raw[1:].isdigit())):
        raise ProtocolError(f"invalid length {raw[:20]!r}")
    return int(raw)


def _length_end(buf, pos: int, n: int, what: str) -> int:
    """End of a `*N`/`$N` length line, -1 while it is still arriving; a line that cannot be a length
    (32 bytes without CRLF) is a protocol error, not something to wait for."""
    eol = buf.find(b"\r\n", pos, min(n, pos + 32))
    if eol < 0 and n - pos >= 32:
        raise ProtocolError(f"invalid {what} length")
    return eol


class Args(list):
    """One command's arguments. `raw`: the bytes the client sent for it, when they are exactly what
    `encode_command(args)` would make (a multibulk with canonical lengths, read in one feed, no argument
    over 64 KiB) — forwarded as they are instead of encoded again; None otherwise (inline commands,
    lengths with leading zeros, commands that arrived over several reads)."""

    __slots__ = ("raw",)


class RequestParser:
    """Client → proxy. `feed(data)` returns complete commands (`Args`); partial input is kept, and
    parsing resumes where it stopped (a large command arriving in many reads is parsed once, not once per
    read). `max_command` bounds a whole command (its arguments together, as they will be held), not only
    one bulk; `held` is what the unfinished command holds, for the listener's memory accounting."""

    def __init__(self, max_command: int = MAX_BULK) -> None:
        self.buf = bytearray()
        self.max_command = max_command
        self.held = 0                          # bytes of the unfinished command's arguments so far
        self._args: Args | None = None         # the command being read
        self._left = 0                         # arguments still to read
        self._start = -1                       # where the command began in buf (-1: in an earlier feed)
        self._canonical = False                # its length lines are as encode_command writes them

    @property
    def buffered(self) -> int:
        return len(self.buf) + self.held

    def pending_bytes(self) -> bytes:
        """Everything fed but not yet returned, as bytes again (for a connection turning into a raw
        tunnel), and the parser emptied."""
        head = b""
        if self._args is not None:
            head = b"*%d\r\n" % (len(self._args) + self._left) + b"".join(
                b"$%d\r\n%s\r\n" % (len(a), a) for a in self._args)
        out = head + bytes(self.buf)
        self.buf.clear()
        self._args, self._left, self.held = None, 0, 0
        return out

    def feed(self, data: bytes) -> list[list[bytes]]:
        # The per-argument work is written inline (no helper call per length line): this loop runs for
        # every argument of every command a client sends.
        buf = self.buf
        buf += data
        out: list[list[bytes]] = []
        n = len(buf)
        pos = 0  # consumed bytes are dropped at the end of every feed: a resume starts at the front
        while pos < n:
            if self._args is None:
                if buf[pos] != 0x2A:  # not '*': an inline command
                    eol = buf.find(b"\n", pos, min(n, pos + MAX_INLINE))
                    if eol < 0:
                        if n - pos >= MAX_INLINE:
                            raise ProtocolError("too big inline request")
                        break
                    line = bytes(buf[pos:eol]).rstrip(b"\r").split()
                    pos = eol + 1
                    if line:
                        a = Args(line)
                        a.raw = None
                        out.append(a)
                    continue
                eol = _length_end(buf, pos, n, "multibulk")
                if eol < 0:
                    break
                count = _int(buf, pos + 1, eol)
                if count > MAX_ARGS:
                    raise ProtocolError("invalid multibulk length")
                self._start, self._canonical = pos, eol - pos == 2 or buf[pos + 1] != 0x30
                pos = eol + 2
                if count <= 0:
                    continue
                self._args, self._left = Args(), count
            # arguments of the current command
            args = self._args
            while self._left:
                if pos >= n:
                    break
                if buf[pos] != 0x24:  # '$'
                    raise ProtocolError(f"expected '$', got {chr(buf[pos])!r}")
                eol = buf.find(b"\r\n", pos, min(n, pos + 32))
                if eol < 0:
                    if n - pos >= 32:
                        raise ProtocolError("invalid bulk length")
                    break
                digits = buf[pos + 1:eol]
                if not digits.isdigit():  # a sign, a space, anything but digits: no valid bulk length
                    raise ProtocolError(f"invalid bulk length {bytes(digits[:20])!r}")
                size = int(digits)
                if self.held + size + _ARG_OVERHEAD > self.max_command:
                    raise ProtocolError(f"command larger than {self.max_command} bytes")
                start = eol + 2
                if start + size + 2 > n:
                    break
                if buf[start + size] != 0x0D or buf[start + size + 1] != 0x0A:
                    raise ProtocolError("bulk string not terminated by CRLF")
                if size > _PIECE:
                    with memoryview(buf) as view:  # one copy out of the buffer (a slice would make two)
                        args.append(view[start:start + size].tobytes())
                    self._canonical = False  # large: the pieces are sent as they are (encode_pieces)
                else:  # small: the slice is cheaper than a view
                    args.append(bytes(buf[start:start + size]))
                    if digits[0] == 0x30 and len(digits) > 1:
                        self._canonical = False  # a leading zero: Redis itself refuses it
                self.held += size + _ARG_OVERHEAD
                self._left -= 1
                pos = start + size + 2
            if self._left:
                break
            args.raw = bytes(buf[self._start:pos]) if self._start >= 0 and self._canonical else None
            out.append(args)
            self._args, self.held = None, 0
        # drop what is consumed: the unfinished command's bytes stay (its parsed arguments are kept)
        if pos:
            del buf[:pos]
        self._start = -1  # an unfinished command's start is gone with them
        return out


def encode_command(args: list[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def encode_pieces(args: list[bytes]) -> bytes | list[bytes]:
    """`encode_command`, except that a command with a large argument comes back as a list of pieces
    that refer to its arguments, written one after another: a 60 MiB value is held once, not twice."""
    parts = [b"*%d\r\n" % len(args)]
    big = False
    for a in args:
        n = len(a)
        if n > _PIECE:
            parts += (b"$%d\r\n" % n, a, b"\r\n")
            big = True
        else:
            parts.append(b"$%d\r\n%s\r\n" % (n, a))
    return parts if big else b"".join(parts)


# Reply types: simple ones end at the first CRLF; aggregates hold N children (maps 2N).
_LINE = frozenset(b"+-:_,#(")
_BLOB = frozenset(b"$!=")
_AGG = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2}


class ReplyFramer:
    """Upstream → proxy. `feed(data)` returns whole replies as (raw bytes, kind) with kind one of
    "ok", "error" (`-` or `!`), "push" (RESP3 `>`, out of band). An attribute (`|`) is kept with the
    reply it precedes. Scanning resumes where it stopped, so a large aggregate arriving in many reads
    costs one pass."""

    def __init__(self, max_bulk: int = MAX_BULK) -> None:
        self.buf = bytearray()
        self.max_bulk = max_bulk
        self._pos = 0          # scan position
        self._stack: list[int] = []  # elements still owed by each open aggregate
        self._extra = 0        # top-level elements still owed after attributes
        self._kind: str | None = None

    def feed(self, data: bytes) -> list[tuple[bytes, str]]:
        buf = self.buf
        buf += data
        out = []
        while self._advance():
            out.append((bytes(buf[:self._pos]), self._kind or "ok"))
            del buf[:self._pos]
            self._pos, self._kind = 0, None
        return out

    def _advance(self) -> bool:
        """Scan on; True when a whole top-level reply ends at self._pos."""
        buf, n, stack = self.buf, len(self.buf), self._stack
        while True:
            pos = self._pos
            if pos >= n:
                return False
            t = buf[pos]
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > 64 * 1024:
                    raise ProtocolError("reply header too long")
                return False
            if not stack and self._kind is None and t != 0x7C:
                self._kind = "error" if t in (0x2D, 0x21) else "push" if t == 0x3E else "ok"
            if t in _LINE:
                end = eol + 2
            elif t in _BLOB:
                size = _int(buf, pos + 1, eol)
                if size < 0:
                    end = eol + 2  # $-1: null bulk (RESP2)
                else:
                    if size > self.max_bulk:
                        raise ProtocolError("reply bulk too large")
                    end = eol + 2 + size + 2
                    if end > n:
                        return False
            elif t in _AGG or t == 0x7C:
                count = _int(buf, pos + 1, eol)
                self._pos = eol + 2
                if t == 0x7C:  # an attribute: 2N elements, then the reply it annotates (not an element)
                    if stack:
                        stack[-1] += 1
                    else:
                        self._extra += 1
                    count *= 2
                else:
                    count = max(count, 0) * _AGG[t]
                if count > 0:
                    if len(stack) >= MAX_DEPTH:
                        raise ProtocolError("reply nested too deep")
                    stack.append(count)
                    continue
                end = self._pos
            else:
                raise ProtocolError(f"unknown reply type {chr(t)!r}")
            self._pos = end
            # one element done: close every aggregate it completes
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            else:
                if self._extra:
                    self._extra -= 1
                    continue
                return True


def mask_pairs(raw: bytes, names: frozenset[bytes], mask: bytes) -> bytes | None:
    """A flat aggregate of name/value bulk strings (a RESP2 array of 2N, a RESP3 map of N; what CONFIG GET
    answers) with the value of each name in `names` replaced by `mask`; None when `raw` is not one."""
    if raw[:1] not in (b"*", b"%") or not raw.endswith(b"\r\n"):
        return None
    eol = raw.find(b"\r\n")
    head = raw[1:eol]
    if not head.isdigit():
        return None
    n = int(head) * (2 if raw[:1] == b"%" else 1)
    if n % 2:
        return None
    items, pos = [], eol + 2
    for _ in range(n):
        if raw[pos:pos + 1] != b"$":
            return None
        eol = raw.find(b"\r\n", pos)
        size = raw[pos + 1:eol]
        if eol < 0 or not size.isdigit():
            return None
        start = eol + 2
        end = start + int(size)
        if raw[end:end + 2] != b"\r\n":
            return None
        items.append(raw[start:end])
        pos = end + 2
    if pos != len(raw):
        return None
    out = [raw[:raw.find(b"\r\n") + 2]]
    for i in range(0, n, 2):
        value = mask if items[i].lower() in names else items[i + 1]
        out.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(items[i]), items[i], len(value), value))
    return b"".join(out)


def error(message: str) -> bytes:
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


OK = b"+OK\r\n"


class Map(list):
    """A RESP3 map (or a RESP2 array of pairs) as decoded: its (key, value) pairs, in order."""


def decode(raw: bytes, max_depth: int = 8):
    """One whole reply (as ReplyFramer cut it) as values: bytes for strings, int, None, list, Map; an error
    raises ProtocolError. For the few replies the proxy reads itself (HELLO), bounded in depth."""
    value, end = _decode(raw, 0, max_depth)
    if end != len(raw):
        raise ProtocolError("trailing bytes after a reply")
    return value


def _decode(raw: bytes, pos: int, depth: int):
    eol = raw.find(b"\r\n", pos)
    if eol < 0 or depth < 0:
        raise ProtocolError("reply cut short or nested too deep")
    t, line = raw[pos:pos + 1], raw[pos + 1:eol]
    if t in (b"+", b"(", b","):
        return line, eol + 2
    if t in (b"-", b"!"):
        raise ProtocolError(line.decode(errors="replace"))
    if t == b":":
        return _int(line, 0, len(line)), eol + 2
    if t == b"_":
        return None, eol + 2
    if t == b"#":
        return line == b"t", eol + 2
    if t in (b"$", b"="):
        n = _int(line, 0, len(line))
        if n < 0:
            return None, eol + 2
        start = eol + 2
        if raw[start + n:start + n + 2] != b"\r\n":
            raise ProtocolError("bulk string cut short")
        return raw[start:start + n], start + n + 2
    if t in (b"*", b"~", b">", b"%"):
        n = _int(line, 0, len(line))
        pos = eol + 2
        if n < 0:
            return None, pos
        items = []
        for _ in range(n * 2 if t == b"%" else n):
            v, pos = _decode(raw, pos, depth - 1)
            items.append(v)
        if t == b"%":
            return Map(zip(items[::2], items[1::2], strict=True)), pos
        return items, pos
    raise ProtocolError(f"unknown reply type {t!r}")


def encode_value(v, proto: int) -> bytes:
    """Values back to RESP in the client's protocol (a Map is a RESP2 array of pairs)."""
    if isinstance(v, Map):
        head = b"%%%d\r\n" % len(v) if proto == 3 else b"*%d\r\n" % (2 * len(v))
        return head + b"".join(encode_value(k, proto) + encode_value(x, proto) for k, x in v)
    if isinstance(v, bool):
        return (b"#t\r\n" if v else b"#f\r\n") if proto == 3 else b":%d\r\n" % v
    if isinstance(v, int):
        return b":%d\r\n" % v
    if v is None:
        return b"_\r\n" if proto == 3 else b"$-1\r\n"
    if isinstance(v, list):
        return b"*%d\r\n" % len(v) + b"".join(encode_value(x, proto) for x in v)
    return b"$%d\r\n%s\r\n" % (len(v), v)


# What HELLO answers when the upstream has not told its own (unreachable since the proxy started)
_HELLO_DEFAULT = Map([(b"server", b"redis"), (b"version", b"7.2.0"), (b"mode", b"standalone"), (b"role", b"master"),
                      (b"modules", [])])


def hello_fields(raw: bytes, proto: int) -> Map | None:
    """What the upstream's own HELLO reply says about the server (server, version, mode, role, modules):
    what the proxy's HELLO answers with. None when the reply is not a HELLO reply."""
    try:
        v = decode(raw)
    except ProtocolError:
        return None
    if proto == 2 and isinstance(v, list) and not isinstance(v, Map) and len(v) % 2 == 0:
        v = Map(zip(v[::2], v[1::2], strict=True))
    if not isinstance(v, Map):
        return None
    keep = (b"server", b"version", b"mode", b"role", b"modules")
    out = Map((k, x) for k, x in v if k in keep)
    return out if any(k == b"version" for k, _ in out) else None


def hello_reply(proto: int, conn_id: int = 0, server: Map | None = None) -> bytes:
    """What HELLO answers, in the protocol just chosen (answered by the proxy itself): the upstream's
    server, version, mode, role and modules, with this connection's protocol and id."""
    fields = dict(server or _HELLO_DEFAULT)
    out = Map([(b"server", fields.get(b"server", b"redis")), (b"version", fields.get(b"version", b"7.2.0")),
               (b"proto", proto), (b"id", conn_id), (b"mode", fields.get(b"mode", b"standalone")),
               (b"role", fields.get(b"role", b"master")), (b"modules", fields.get(b"modules", []))])
    return encode_value(out, proto)
