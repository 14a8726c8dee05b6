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


def _int(buf: bytes | bytearray, start: int, end: int) -> int:
    raw = bytes(buf[start:end])
    if not raw or len(raw) > 20 or not (raw.isdigit() or (raw[:1] == b"-" and raw[1:].isdigit())):
        raise ProtocolError(f"invalid length {raw[:20]!r}")
    return int(raw)


class RequestParser:
    """Client → proxy. `feed(data)` returns complete commands; partial input is kept."""

    def __init__(self, max_bulk: int = MAX_BULK, max_buffer: int | None = None) -> None:
        self.buf = bytearray()
        self.max_bulk = max_bulk
        self.max_buffer = max_buffer if max_buffer is not None else max_bulk + 64 * 1024

    def feed(self, data: bytes) -> list[list[bytes]]:
        buf = self.buf
        buf += data
        out: list[list[bytes]] = []
        pos = 0
        n = len(buf)
        while pos < n:
            if buf[pos] == 0x2A:  # '*'
                cmd, end = self._array(buf, pos, n)
            else:
                cmd, end = self._inline(buf, pos, n)
            if end < 0:
                break
            pos = end
            if cmd:
                out.append(cmd)
        if pos:
            del buf[:pos]
        if len(buf) > self.max_buffer:
            raise ProtocolError("request too large")
        return out

    def _array(self, buf, pos: int, n: int):
        eol = buf.find(b"\r\n", pos, min(n, pos + 32))
        if eol < 0:
            if n - pos >= 32:
                raise ProtocolError("invalid multibulk length")
            return None, -1
        count = _int(buf, pos + 1, eol)
        if count > MAX_ARGS:
            raise ProtocolError("invalid multibulk length")
        if count <= 0:
            return [], eol + 2
        p = eol + 2
        args = []
        for _ in range(count):
            if p >= n:
                return None, -1
            if buf[p] != 0x24:  # '$'
                raise ProtocolError(f"expected '$', got {chr(buf[p])!r}")
            eol = buf.find(b"\r\n", p, min(n, p + 32))
            if eol < 0:
                if n - p >= 32:
                    raise ProtocolError("invalid bulk length")
                return None, -1
            size = _int(buf, p + 1, eol)
            if size < 0 or size > self.max_bulk:
                raise ProtocolError("invalid bulk length")
            start = eol + 2
            if start + size + 2 > n:
                return None, -1
            if buf[start + size:start + size + 2] != b"\r\n":
                raise ProtocolError("bulk string not terminated by CRLF")
            args.append(bytes(buf[start:start + size]))
            p = start + size + 2
        return args, p

    def _inline(self, buf, pos: int, n: int):
        eol = buf.find(b"\n", pos, min(n, pos + MAX_INLINE))
        if eol < 0:
            if n - pos >= MAX_INLINE:
                raise ProtocolError("too big inline request")
            return None, -1
        line = bytes(buf[pos:eol]).rstrip(b"\r")
        return line.split(), eol + 1


def encode_command(args: list[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


# Reply types: simple ones end at the first CRLF; aggregates hold N children (maps and attributes 2N).
_LINE = frozenset(b"+-:_,#(")
_BLOB = frozenset(b"$!=")
_AGG = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2, ord("|"): 2}


class ReplyFramer:
    """Upstream → proxy. `feed(data)` returns whole replies as (raw bytes, kind) with kind one of
    "ok", "error" (`-` or `!`), "push" (RESP3 `>`, out of band). An attribute (`|`) is kept with the
    reply it precedes."""

    def __init__(self, max_bulk: int = MAX_BULK) -> None:
        self.buf = bytearray()
        self.max_bulk = max_bulk
        self._need = 0  # bytes the buffer must hold before a frame can be complete

    def feed(self, data: bytes) -> list[tuple[bytes, str]]:
        buf = self.buf
        buf += data
        if len(buf) < self._need:
            return []
        out = []
        pos = 0
        n = len(buf)
        while pos < n:
            end = self._frame(buf, pos, n, 0)
            if end < 0:
                break
            t = buf[pos]
            if t == 0x7C:  # '|' attribute: the kind is that of the reply it annotates
                t = buf[self._attribute_end(buf, pos, n)]
            kind = "error" if t in (0x2D, 0x21) else "push" if t == 0x3E else "ok"
            out.append((bytes(buf[pos:end]), kind))
            pos = end
        if pos:
            del buf[:pos]
            self._need = 0
        return out

    def _attribute_end(self, buf, pos: int, n: int, depth: int = 0) -> int:
        eol = buf.find(b"\r\n", pos)
        p = eol + 2
        for _ in range(max(_int(buf, pos + 1, eol), 0) * 2):
            p = self._frame(buf, p, n, depth + 1)
            if p < 0:
                return -1
        return p

    def _frame(self, buf, pos: int, n: int, depth: int) -> int:
        """End offset of the frame at pos, or -1 if incomplete."""
        if depth > MAX_DEPTH:
            raise ProtocolError("reply nested too deep")
        if pos >= n:
            return -1
        t = buf[pos]
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        if t in _LINE:
            return eol + 2
        if t in _BLOB:
            size = _int(buf, pos + 1, eol)
            if size < 0:
                return eol + 2  # $-1: null bulk (RESP2)
            if size > self.max_bulk:
                raise ProtocolError("reply bulk too large")
            end = eol + 2 + size + 2
            if end > n:
                self._need = end
                return -1
            return end
        mult = _AGG.get(t)
        if mult is None:
            raise ProtocolError(f"unknown reply type {chr(t)!r}")
        count = _int(buf, pos + 1, eol)
        p = eol + 2
        if t == 0x7C:  # attribute, then the reply it belongs to
            p = self._attribute_end(buf, pos, n, depth)
            return -1 if p < 0 else self._frame(buf, p, n, depth + 1)
        for _ in range(max(count, 0) * mult):
            p = self._frame(buf, p, n, depth + 1)
            if p < 0:
                return -1
        return p


def error(message: str) -> bytes:
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"


def hello_reply(proto: int, server_version: str = "7.2.0", conn_id: int = 0) -> bytes:
    """What HELLO answers, in the protocol just chosen (answered by the proxy itself)."""
    fields = [(b"server", b"redis"), (b"version", server_version.encode()), (b"proto", proto),
              (b"id", conn_id), (b"mode", b"standalone"), (b"role", b"master"), (b"modules", [])]
    out = [b"%" + str(len(fields)).encode() + b"\r\n" if proto == 3 else b"*" + str(len(fields) * 2).encode() + b"\r\n"]
    for k, v in fields:
        out.append(b"$%d\r\n%s\r\n" % (len(k), k))
        if isinstance(v, int):
            out.append(b":%d\r\n" % v)
        elif isinstance(v, list):
            out.append(b"*0\r\n")
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(v), v))
    return b"".join(out)
