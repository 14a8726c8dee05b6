"""SSE codec, sans-IO: framing under any chunking, assembly of streamed chunks, replay round-trips."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.llm import sse
from proxy.llm.policy import cache_key


def chunks_of(text: str, n: int, tool: bool = False) -> bytes:
    out = b""
    pieces = [text[i:i + n] for i in range(0, len(text), n)]
    for i, p in enumerate(pieces):
        delta = {"role": "assistant", "content": p} if i == 0 else {"content": p}
        out += sse.event({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                          "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    if tool:
        for part in ('{"ci', 'ty": "Paris"}'):
            out += sse.event({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                              "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                              "function": {"name": "weather", "arguments": part}}]},
                                           "finish_reason": None}]})
    out += sse.event({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                      "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if tool else "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    return out + sse.DONE


def assemble(stream: bytes, cuts: list[int]) -> sse.Assembler:
    parser, asm = sse.SSEParser(), sse.Assembler()
    prev = 0
    for c in sorted(set(cuts)) + [len(stream)]:
        for data in parser.feed(stream[prev:c]):
            asm.add(data)
        prev = c
    return asm


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=200), size=st.integers(1, 20), cuts=st.lists(st.integers(0, 4000), max_size=30),
       tool=st.booleans())
def test_assembly_is_independent_of_chunking(text, size, cuts, tool):
    stream = chunks_of(text, size, tool)
    asm = assemble(stream, [c % (len(stream) + 1) for c in cuts])
    assert asm.complete
    done = asm.completion()
    msg = done["choices"][0]["message"]
    assert msg["content"] == text
    assert done["usage"]["total_tokens"] == 7
    if tool:
        assert msg["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]
        assert done["choices"][0]["finish_reason"] == "tool_calls"
    # replaying the completion and assembling it again gives the same completion
    again = assemble(b"".join(sse.replay(done, {"fallback": True})), [])
    assert again.completion() == done


@settings(max_examples=300, deadline=timedelta(seconds=5))  # a hang fails; 5 s is 1,000× what a feed takes
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_parser_on_garbage_stays_bounded_and_never_calls_it_complete(data, step):
    """Any bytes, in any chunking: no exception, the parser never holds more than max_event, every event
    it returns came from a data: line of the input, and garbage is never taken for a complete answer
    (which would be cached and served as one)."""
    parser, asm = sse.SSEParser(max_event=512), sse.Assembler()
    events = []
    for i in range(0, len(data), step):
        for d in parser.feed(data[i:i + step]):
            events.append(d)
            asm.add(d)
        assert len(parser._buf) <= 512 + step
    if events:
        assert b"data:" in data
    assert asm.complete is False


def test_a_complete_stream_is_complete_and_one_that_is_cut_is_not():
    """The property above must be able to fail: a real stream is complete, its truncations are not."""
    stream = chunks_of("hello world", 3)
    assert assemble(stream, []).complete is True
    for cut in range(0, len(stream) - 1, 7):
        assert assemble(stream[:cut], []).complete is False, cut


def test_crlf_events_and_multiline_data():
    parser = sse.SSEParser()
    assert parser.feed(b"data: a\r\ndata: b\r\n\r\n: comment\n\nevent: x\ndata: c\n\n") == ["a\nb", "c"]


def test_truncated_or_error_streams_are_not_complete():
    stream = chunks_of("hello", 2)
    assert not assemble(stream[: len(stream) - 20], []).complete
    asm = assemble(stream[:40] + sse.event({"error": {"message": "x"}}) + sse.DONE, [])
    assert not asm.complete


def test_cache_key_canonical_and_field_selected():
    fields = ("model", "messages", "temperature")
    a = cache_key("/api/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                               "temperature": 0.2, "stream": True, "user": "u1"}, fields)
    b = cache_key("/api/v1/chat/completions", {"temperature": 0.2, "user": "u2",
                                               "messages": [{"content": "hi", "role": "user"}], "model": "m"}, fields)
    c = cache_key("/api/v1/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                          "temperature": 0.2}, fields)
    d = cache_key("/api/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                               "temperature": 0.3}, fields)
    assert a == b and a != c and a != d and len(a) == 32


def test_replay_text_completion():
    done = {"id": "t", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": "abc" * 50, "finish_reason": "length"}]}
    events = sse.replay(done)
    assert events[-1] == sse.DONE
    again = assemble(b"".join(events), [])
    assert again.completion()["choices"][0]["text"] == "abc" * 50
    assert json.loads(events[0][6:])["object"] == "text_completion"


@pytest.mark.parametrize("step", [1, 3, 7, 100, 10_000])
def test_an_event_over_max_event_is_skipped_and_parsing_goes_on_to_the_end(step):
    """One event larger than the bound (a big tool-call argument, say) must not stop the bookkeeping:
    the events after it, [DONE] included, are still seen, in any chunking; only the copy is marked."""
    stream = chunks_of("hello world", 3)
    big = sse.event({"choices": [{"index": 0, "delta": {"content": "x" * 5000}}]})
    first = stream.index(b"\n\n") + 2  # after the first event
    data = stream[:first].replace(b"\n\n", b"\r\n\r\n") + big + stream[first:]  # separators of both kinds
    parser, asm = sse.SSEParser(max_event=1024), sse.Assembler()
    for i in range(0, len(data), step):
        for d in parser.feed(data[i:i + step]):
            asm.add(d)
        assert len(parser._buf) <= 1024 + step
    assert parser.overflow and asm.done


def test_the_relays_last_boundary_knows_every_separator_the_parser_does():
    for sep in sse.SEPARATORS:
        buf = b"data: a" + sep + b"data: b"
        assert sse.last_boundary(buf) == len(b"data: a") + len(sep)
        assert sse.SSEParser().feed(buf + sep) == ["a", "b"]
    assert sse.last_boundary(b"data: half") == 0
