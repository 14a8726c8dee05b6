"""proxy/llm/splice.py on bytes: what the app gets of a stream, where it breaks, and how a continuation
is spliced in."""

from __future__ import annotations

import json

from proxy.llm.splice import Splice
from proxy.llm.sse import DONE, event


def chunk(content=None, role=None, finish=None, cid="c1", usage=None, **delta_more):
    delta = {**({"role": role} if role else {}), **({"content": content} if content is not None else {}), **delta_more}
    out = {"id": cid, "object": "chat.completion.chunk", "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        out["usage"] = usage
    return event(out)


def test_the_first_part_is_forwarded_byte_for_byte_and_a_comment_is_relayed():
    sp = Splice()
    raw = b": OPENROUTER PROCESSING\n\n" + chunk("Hel", role="assistant") + chunk("lo")
    assert sp.feed(raw[:7]) + sp.feed(raw[7:]) == raw
    assert sp.sent_text() == "Hello" and sp.fault is None and not sp.finished


def test_an_in_band_error_and_what_follows_it_are_held_back():
    sp = Splice()
    good = chunk("Hel", role="assistant")
    out = sp.feed(good + b'data: {"error": {"message": "Provider returned error", "code": 502}}\n\n' + chunk("x"))
    assert out == good
    assert sp.fault == "error_event" and sp.detail == "Provider returned error"
    assert sp.feed(chunk("more")) == b""


def test_a_malformed_event_breaks_the_part():
    sp = Splice()
    assert sp.feed(chunk("a", role="assistant") + b'data: {"choices": [{"delta": {"cont\n\n') == chunk("a", role="assistant")
    assert sp.fault == "malformed"


def test_a_done_before_every_choice_finished_is_not_the_end():
    sp = Splice()
    assert sp.feed(chunk("a", role="assistant") + DONE) == chunk("a", role="assistant")
    assert not sp.finished and not sp.done_sent


def test_a_continuation_is_rewritten_into_the_first_answer():
    sp = Splice()
    sp.feed(chunk("Hello", role="assistant") + chunk(" wor") + chunk("ld "))
    doc = sp.continuation_doc({"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 10})
    assert doc["messages"][-1] == {"role": "assistant", "content": "Hello world"}
    assert doc["max_tokens"] == 7
    sp.next_part()
    out = sp.feed(chunk(" ", role="assistant", cid="c2") + chunk(" again", cid="c2")
                  + chunk(finish="stop", cid="c2", usage={"prompt_tokens": 12, "completion_tokens": 2,
                                                           "total_tokens": 14}) + DONE)
    events = [json.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["id"] for e in events] == ["c1", "c1"]
    assert events[0]["choices"][0]["delta"] == {"content": "again"}, "the seam's whitespace once, no role"
    assert events[1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    assert out.endswith(DONE) and sp.finished and sp.done_sent
    assert sp.asm.completion()["choices"][0]["message"] == {"role": "assistant", "content": "Hello world again"}


def test_the_apps_own_prefill_is_continued_not_repeated():
    sp = Splice()
    sp.feed(chunk(" answer", role="assistant"))
    doc = sp.continuation_doc({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "My"}]})
    assert doc["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "My answer"}]


def test_nothing_sent_yet_asks_again_without_a_prefill():
    sp = Splice()
    sp.feed(chunk("", role="assistant"))
    doc = sp.continuation_doc({"messages": [{"role": "user", "content": "q"}]})
    assert doc["messages"] == [{"role": "user", "content": "q"}]


def test_tool_calls_several_choices_and_text_completions_are_not_continued():
    sp = Splice()
    sp.feed(chunk(role="assistant", tool_calls=[{"index": 0, "id": "t", "function": {"name": "f", "arguments": ""}}]))
    assert sp.continuation_doc({"messages": [{"role": "user", "content": "q"}]}) is None
    sp = Splice()
    sp.feed(event({"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]}))
    assert sp.continuation_doc({"messages": [{"role": "user", "content": "q"}]}) is None
    sp = Splice()
    sp.feed(event({"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "a"}]}))
    assert sp.continuation_doc({"prompt": "q"}) is None
    sp = Splice()
    sp.feed(chunk("a", role="assistant"))
    assert sp.continuation_doc({"messages": [{"role": "user", "content": "q"}], "n": 2}) is None


def test_an_event_too_large_to_read_passes_through_and_makes_the_answer_not_continuable():
    sp = Splice(max_event=100)
    big = chunk("x" * 500, role="assistant")
    out = b"".join(sp.feed(big[i:i + 64]) for i in range(0, len(big), 64)) + sp.end()
    assert out.startswith(big[:64]) and out.rstrip(b"\n") == big.rstrip(b"\n")
    assert sp.blind and sp.continuation_doc({"messages": [{"role": "user", "content": "q"}]}) is None


def test_a_last_event_without_its_blank_line_still_counts_at_the_end():
    sp = Splice()
    sp.feed(chunk("a", role="assistant"))
    tail = chunk(finish="stop").rstrip(b"\n")
    assert sp.feed(tail) == b""
    assert sp.end() == tail + b"\n\n" and sp.finished


def test_error_kind_reads_the_providers_wordings():
    from proxy.llm.policy import error_kind

    def err(message, code=400, **more):
        return json.dumps({"error": {"message": message, "code": code, **more}}).encode()

    context = [
        err("This model's maximum context length is 8192 tokens.", "context_length_exceeded"),
        err("prompt is too long: 210000 tokens > 200000 maximum"),                       # Anthropic
        err("This endpoint's maximum context length is 4096 tokens. However, you requested about 9000"),
        err("The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."),
        err("Provider returned error", metadata={"raw": "input length exceeds the context window"}),
        b"Request too large: too many tokens",
    ]
    assert [error_kind(400, b) for b in context] == ["context_length"] * len(context)
    assert error_kind(413, context[0]) == "context_length"
    prefill = [err("This model does not support assistant message prefill."),
               err("The final message must be a user message"),
               err("Expected last message to be a user message: conversation must end with a user message")]
    assert [error_kind(400, b) for b in prefill] == ["prefill"] * len(prefill)
    other = [err("Your request was rejected as a result of our safety system.", "content_policy_violation"),
             err("Invalid value for temperature"), b"", b"not json at all"]
    assert [error_kind(400, b) for b in other] == [None] * len(other)
    assert error_kind(500, context[0]) is None and error_kind(429, context[0]) is None
