"""RESP codec, sans-IO: round trips under any chunking, limits, and fuzzing (hypothesis, bounded)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.redis import commands
from proxy.redis.codec import ProtocolError, ReplyFramer, RequestParser, encode_command, hello_reply

args_st = st.lists(st.binary(max_size=50), min_size=1, max_size=8)


inline_st = st.lists(st.binary(min_size=1, max_size=10).filter(lambda b: not set(b) & set(b" \t\r\n\x0b\x0c*")),
                     min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(args_st.map(lambda a: ("resp", a)), inline_st.map(lambda a: ("inline", a))),
                min_size=1, max_size=20), st.lists(st.integers(0, 5000), max_size=20))
def test_requests_round_trip_under_any_chunking(items, cuts):
    cmds = [a for _, a in items]
    data = b"".join(encode_command(a) if k == "resp" else b" ".join(a) + b"\r\n" for k, a in items)
    parser, got, prev = RequestParser(), [], 0
    for c in sorted({x % (len(data) + 1) for x in cuts}) + [len(data)]:
        got += parser.feed(data[prev:c])
        prev = c
    assert got == cmds


def _reply(draw, depth=0):
    kind = draw(st.sampled_from("+-:$_,#*%~>" if depth < 3 else "+-:$_,#"))
    if kind in "+-":
        return kind.encode() + draw(st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))) + b"\r\n"
    if kind == ":":
        return b":%d\r\n" % draw(st.integers(-10**12, 10**12))
    if kind == "$":
        v = draw(st.binary(max_size=40))
        return b"$%d\r\n%s\r\n" % (len(v), v)
    if kind == "_":
        return b"_\r\n"
    if kind == ",":
        return b",1.5\r\n"
    if kind == "#":
        return b"#t\r\n"
    n = draw(st.integers(0, 4))
    mult = 2 if kind == "%" else 1
    return kind.encode() + b"%d\r\n" % n + b"".join(_reply(draw, depth + 1) for _ in range(n * mult))


@st.composite
def replies(draw):
    out = []
    for _ in range(draw(st.integers(1, 10))):
        r = _reply(draw)
        if draw(st.booleans()) and r[:1] not in (b">",):
            r = b"|1\r\n+ttl\r\n:3\r\n" + r  # an attribute travels with the reply it annotates
        out.append(r)
    return out


@settings(max_examples=300, deadline=None)
@given(replies(), st.lists(st.integers(0, 5000), max_size=20))
def test_replies_framed_exactly_under_any_chunking(frames, cuts):
    data = b"".join(frames)
    framer, got, prev = ReplyFramer(), [], 0
    for c in sorted({x % (len(data) + 1) for x in cuts}) + [len(data)]:
        got += framer.feed(data[prev:c])
        prev = c
    assert [raw for raw, _ in got] == frames

    def kind(f):
        f = f.split(b":3\r\n", 1)[1] if f.startswith(b"|") else f
        return "error" if f[:1] == b"-" else "push" if f[:1] == b">" else "ok"

    assert [k for _, k in got] == [kind(f) for f in frames]


@settings(max_examples=500, deadline=timedelta(seconds=5))  # a hang fails; 5 s is 1,000× a feed
@given(st.binary(max_size=300), st.integers(1, 50))
def test_garbage_is_refused_or_framed_never_crashes_or_hangs(data, step):
    """Any bytes, in any chunking: either a ProtocolError (the only exception allowed: anything else
    propagates and fails here), or what comes out is exactly what went in — replies framed byte for
    byte from the front of the input, commands as non-empty lists of bytes."""
    framer, frames = ReplyFramer(), []
    try:
        for i in range(0, len(data), step):
            frames += framer.feed(data[i:i + step])
    except ProtocolError:
        pass
    else:
        raw = b"".join(f for f, _ in frames)
        assert data.startswith(raw) and all(kind in ("ok", "error", "push") for _, kind in frames)
    parser, cmds = RequestParser(), []
    try:
        for i in range(0, len(data), step):
            cmds += parser.feed(data[i:i + step])
    except ProtocolError:
        pass
    else:
        assert all(c and all(isinstance(a, bytes) for a in c) for c in cmds)


@pytest.mark.parametrize("bad", [
    b"*1\r\n$10000000000\r\n",          # a declared 10 GB bulk
    b"*1\r\n$-5\r\nabc\r\n",            # negative length
    b"*1\r\n$abc\r\n",                  # not a number
    b"*2\r\n$3\r\nGETxx",               # bulk not terminated by CRLF
    b"*99999999999\r\n",                # absurd multibulk
    b"*1\r\n:12\r\n",                   # not a bulk string in a request
])
def test_malformed_requests_raise(bad):
    with pytest.raises(ProtocolError):
        RequestParser().feed(bad + b"\r\n" * 3)


def test_inline_commands_and_limits():
    assert RequestParser().feed(b"PING\r\nSET a  b\n") == [[b"PING"], [b"SET", b"a", b"b"]]
    with pytest.raises(ProtocolError):
        RequestParser().feed(b"A" * 70000)
    p = RequestParser(max_command=100)
    with pytest.raises(ProtocolError, match="command larger than 100 bytes"):
        p.feed(b"*1\r\n$61\r\n")


def test_the_bound_is_on_the_whole_command_not_one_bulk():
    """Three bulks each under the bound, together over it: refused as the third is announced, before
    its bytes are held (a 3 x 60 MiB command under a 64 MiB bound)."""
    p = RequestParser(max_command=200)
    assert p.feed(b"*3\r\n$50\r\n" + b"a" * 50 + b"\r\n$50\r\n" + b"b" * 50 + b"\r\n") == []
    assert p.held == 2 * (50 + 40) and p.buffered == p.held
    with pytest.raises(ProtocolError, match="command larger than 200 bytes"):
        p.feed(b"$50\r\n")
    q = RequestParser(max_command=200)
    assert q.feed(b"*2\r\n$50\r\n" + b"a" * 50 + b"\r\n$50\r\n" + b"b" * 50 + b"\r\n") == [[b"a" * 50, b"b" * 50]]
    assert q.held == 0 and q.buffered == 0


def test_attribute_and_hello():
    raw = b"|1\r\n+ttl\r\n:3\r\n-ERR no\r\n"
    assert ReplyFramer().feed(raw) == [(raw, "error")]
    assert hello_reply(3).startswith(b"%7\r\n") and hello_reply(2).startswith(b"*14\r\n")


def test_command_table():
    assert commands.classify(b"GET") == "read" and commands.classify(b"SET") == "write"
    assert commands.classify(b"BLPOP") == "blocking" and commands.classify(b"SUBSCRIBE") == "tunnel"
    assert commands.classify(b"NOSUCHCOMMAND") == "write"
    assert commands.keys_of(b"MSET", [b"MSET", b"a", b"1", b"b", b"2"]) == [b"a", b"b"]
    assert commands.keys_of(b"DEL", [b"DEL", b"a", b"b"]) == [b"a", b"b"]
    assert commands.keys_of(b"FOO", [b"FOO", b"a"]) is None


def test_hello_fields_are_the_upstreams_and_reencoded_in_the_clients_protocol():
    from proxy.redis.codec import Map, decode, hello_fields

    upstream = (b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.4.1\r\n$5\r\nproto\r\n:3\r\n"
                b"$2\r\nid\r\n:42\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$7\r\nreplica\r\n"
                b"$7\r\nmodules\r\n*1\r\n%2\r\n$4\r\nname\r\n$6\r\nsearch\r\n$3\r\nver\r\n:21005\r\n")
    server = hello_fields(upstream, 3)
    assert dict(server)[b"version"] == b"7.4.1" and dict(server)[b"role"] == b"replica"
    for proto in (2, 3):
        got = decode(hello_reply(proto, 7, server))
        fields = dict(got) if isinstance(got, Map) else dict(zip(got[::2], got[1::2], strict=True))
        assert fields[b"version"] == b"7.4.1" and fields[b"proto"] == proto and fields[b"id"] == 7
        module = fields[b"modules"][0]
        assert dict(module) == {b"name": b"search", b"ver": 21005} if proto == 3 else module == [
            b"name", b"search", b"ver", 21005]
    assert hello_fields(b"-ERR unknown command 'HELLO'\r\n", 2) is None and hello_fields(b"+OK\r\n", 2) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(args_st.map(lambda a: ("resp", a)), inline_st.map(lambda a: ("inline", a)),
                          args_st.map(lambda a: ("zeros", a))), min_size=1, max_size=20),
       st.lists(st.integers(0, 5000), max_size=20))
def test_a_commands_raw_bytes_are_only_ever_what_encoding_would_make(items, cuts):
    """What the listener forwards in place of encoding the command again: under any chunking it is
    either None or exactly encode_command(args) — never a client's non-canonical framing (leading zeros,
    which Redis refuses, on a connection other clients share)."""
    def enc(kind, a):
        if kind == "resp":
            return encode_command(a)
        if kind == "zeros":
            return b"*%d\r\n" % len(a) + b"".join(b"$0%d\r\n%s\r\n" % (len(x), x) for x in a)
        return b" ".join(a) + b"\r\n"

    data = b"".join(enc(k, a) for k, a in items)
    parser, got, prev = RequestParser(), [], 0
    for c in sorted({x % (len(data) + 1) for x in cuts}) + [len(data)]:
        got += parser.feed(data[prev:c])
        prev = c
    assert got == [a for _, a in items]
    for (kind, a), cmd in zip(items, got, strict=True):
        assert cmd.raw is None or cmd.raw == encode_command(a)
        if kind != "resp":
            assert cmd.raw is None, kind
    whole = RequestParser().feed(data)  # in one read, every canonical command keeps its bytes
    assert [c.raw for c in whole] == [encode_command(a) if k == "resp" else None for k, a in items]


def test_raw_bytes_are_not_kept_for_large_arguments_or_non_canonical_counts():
    big = b"v" * (64 * 1024 + 1)
    (cmd,) = RequestParser().feed(encode_command([b"SET", b"k", big]))
    assert cmd == [b"SET", b"k", big] and cmd.raw is None  # sent as pieces, not copied twice
    (cmd,) = RequestParser().feed(b"*02\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    assert cmd == [b"GET", b"k"] and cmd.raw is None
    (cmd,) = RequestParser().feed(b"*1\r\n$00\r\n\r\n")
    assert cmd == [b""] and cmd.raw is None
    (cmd,) = RequestParser().feed(b"*1\r\n$0\r\n\r\n")
    assert cmd.raw == b"*1\r\n$0\r\n\r\n"
