"""proxy/llm/splice.py fuzzed on bytes a hostile provider could send: whatever the events' shapes, the
splice never raises, holds at most about one event, forwards the first part byte for byte up to a break,
and a continuation's output is whole SSE events."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.llm.splice import Splice

_FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), derandomize=not os.environ.get("FUZZ_RANDOM"),
                 deadline=None)

JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6),
              st.sampled_from(["stop", "assistant", "", " ", "\n"])),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "choices", "delta", "content", "role", "finish_reason", "index", "usage", "error",
                         "tool_calls", "text", "prompt_tokens", "completion_tokens", "message"]), c, max_size=4),
    max_leaves=20)


def _event(doc) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


RAW = st.one_of(JSONISH.map(_event), st.binary(max_size=60),
                st.sampled_from([b"data: [DONE]\n\n", b": OPENROUTER PROCESSING\n\n", b"data: {\n\n", b"\r\n\r\n",
                                 b"event: x\r\n", b"data: {\"choices\": 5}\n\n"]))


@_FUZZ
@given(parts=st.lists(st.lists(RAW, max_size=8), min_size=1, max_size=3), cut=st.integers(1, 40))
def test_hostile_events_never_break_the_splice(parts, cut):
    sp = Splice(max_event=256)
    for n, events in enumerate(parts):
        if n:
            sp.continuation_doc({"messages": [{"role": "user", "content": "q"}]})
            sp.next_part()
        data = b"".join(events)
        out = b""
        for i in range(0, len(data), cut):
            out += sp.feed(data[i:i + cut])
            assert len(sp._buf) <= 256 + cut
            if sp.fault:
                break
        else:
            out += sp.end()
        if n == 0:
            assert len(out) <= len(data) + 2, "the first part is forwarded, never repeated"
        if n and out:
            assert out.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) or sp.blind


@_FUZZ
@given(events=st.lists(RAW, max_size=10), cut=st.integers(1, 7))
def test_the_output_does_not_depend_on_how_the_bytes_were_read(events, cut):
    """A separator (\\n\\n, \\r\\n\\r\\n, \\r\\r) split across reads at any position is found as if read whole."""
    data = b"".join(events)

    def run(step: int) -> tuple[bytes, str | None]:
        sp = Splice(max_event=1 << 20)
        out = b""
        for i in range(0, len(data), step):
            out += sp.feed(data[i:i + step])
            if sp.fault:
                return out, sp.fault
        return out + sp.end(), sp.fault

    assert run(cut) == run(max(len(data), 1))


def test_a_prefill_refusal_is_remembered_an_hour_for_at_most_256_models():
    from proxy.llm.policy import PrefillMemory

    m = PrefillMemory()
    m.refuse("a", 0.0)
    assert m.knows("a", 3599.0) and not m.knows("a", 3600.0) and not m.knows("b", 0.0)
    for i in range(300):
        m.refuse(f"m{i}", 10.0)
    assert len(m.refused) == 256 and m.knows("m299", 11.0) and not m.knows("m0", 11.0)
