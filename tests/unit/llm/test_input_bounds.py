"""Bounds on what the openai listener reads and caches (proxy/llm/policy.py), without sockets."""

from __future__ import annotations

import json

import pytest

from proxy.llm.policy import MAX_JSON_DEPTH, cache_key, json_depth_over, replayable


def nested(depth: int):
    doc: list | dict = []
    for i in range(depth - 1):
        doc = [doc] if i % 2 else {"k": doc}
    return doc


@pytest.mark.parametrize("depth,over", [(1, False), (MAX_JSON_DEPTH, False), (MAX_JSON_DEPTH + 1, True), (50_000, True)])
def test_depth_is_measured_without_recursion(depth, over):
    assert json_depth_over(nested(depth)) is over


def test_a_lone_surrogate_has_a_cache_key_of_its_own():
    a = cache_key("/chat/completions", json.loads('{"messages": "\\ud800"}'), ("messages",))
    b = cache_key("/chat/completions", json.loads('{"messages": "\\udfff"}'), ("messages",))
    assert a != b and len(a) == 32


@pytest.mark.parametrize("body,completion,ok", [
    (b'{"choices": [], "id": "x"}', True, True), (b'{"data": []}', False, True), (b'{"data": []}', True, False),
    (b'{"choices": [], "error": {}}', True, False), (b"<html>maintenance</html>", False, False),
    (b'data: {"choices": []}\n\ndata: [DONE]\n\n', True, False), (b"[1, 2]", False, False), (b"", False, False),
    (b"[" * 100_000 + b"]" * 100_000, False, False), (None, False, False)])
def test_only_replayable_answers_are_cached(body, completion, ok):
    assert replayable(body, completion) is ok


@pytest.mark.parametrize("body", [b'{"choices": ["x"]}', b'{"choices": [{"message": "hi"}]}',
                                  b'{"choices": [{"message": {"content": ["part"]}}]}',
                                  b'{"choices": [{"message": {"content": "a", "tool_calls": "x"}}]}',
                                  b'{"choices": [{"index": "0", "text": "a"}]}', b'{"choices": [{"text": 5}]}'])
def test_a_completion_replay_could_not_rebuild_is_not_cached(body):
    assert replayable(body, True) is False


def test_a_replayable_completion_replays():
    from proxy.llm import sse

    body = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "a", "tool_calls": [{"id": "t"}]}}]}'
    assert replayable(body, True) and b"".join(sse.replay(json.loads(body))).endswith(b"data: [DONE]\n\n")
