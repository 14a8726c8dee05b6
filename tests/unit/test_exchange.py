"""The after-body phase of a response: what joins it runs once, with the verdict and (when asked for)
the body; a response released before its body was done is abandoned, not counted."""

from __future__ import annotations

from proxy.exchange import ProxyResponse, Verdict


def test_hooks_run_once_in_order_and_the_largest_keep_wins():
    r = ProxyResponse(200, stream=object())
    seen = []
    r.after_body(lambda v, b: seen.append(("breaker", v, b)))
    r.after_body(lambda v, b: seen.append(("cache", v, b)), keep=1024)
    r.after_body(lambda v, b: seen.append(("tokens", v, b)), keep=10)
    assert r.keep == 1024
    r.body_done(Verdict.SUCCESS, b"body")
    r.body_done(Verdict.FAILURE)  # a second end changes nothing
    r.release()
    assert seen == [("breaker", Verdict.SUCCESS, b"body"), ("cache", Verdict.SUCCESS, b"body"),
                    ("tokens", Verdict.SUCCESS, b"body")]


def test_released_before_the_body_was_done_is_abandoned():
    released, seen = [], []
    r = ProxyResponse(200, stream=object(), release=lambda: released.append(True))
    r.after_body(lambda v, b: seen.append(v))
    r.release()
    r.release()
    assert seen == [None] and released == [True]
    assert ProxyResponse(200).keep == -1  # nobody asked for the body: the listener keeps none
