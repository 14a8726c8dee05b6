"""What the HTTP listener forwards of a request's headers, the request ids it makes, and the heads of the
answers it sends."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.listen.http import _REQ_DROP, connection_listed, forwardable, new_request_id


def test_hop_by_hop_headers_and_those_connection_names_are_dropped():
    h = CIMultiDict([("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "5"),
                     ("TE", "trailers"), ("Accept", "a"), ("Accept", "b"), ("Host", "h")])
    out = forwardable(h, _REQ_DROP)
    assert list(out.items()) == [("Accept", "a"), ("Accept", "b")]
    assert connection_listed(CIMultiDict([("Connection", "close")])) == frozenset()


def test_a_given_request_id_is_kept_only_when_sane_and_made_ids_are_unique():
    assert new_request_id("abc-123") == "abc-123"
    for bad in ("x" * 129, "bad\nid", "ünï"):
        assert new_request_id(bad) != bad
    made = {new_request_id(None) for _ in range(1000)}
    assert len(made) == 1000 and all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in made)


def test_a_cached_answers_pre_serialised_head_is_used_only_while_its_map_is_unchanged():
    from proxy.clock import ManualClock
    from proxy.exchange import Reason
    from proxy.http1.server import HeadLines
    from proxy.listen.http import HttpListener
    from proxy.obs.metrics import UpstreamMetrics
    from proxy.policy.fallback import Fallback, FallbackCache
    from proxy.settings.spec import FallbackSpec

    clock = ManualClock()
    spec = FallbackSpec()
    cache = FallbackCache("head", spec, clock)
    cache.store("k", 200, CIMultiDict([("Content-Type", "text/plain"), ("X-A", "1"), ("X-A", "2")]), b"body")
    fb = Fallback(spec, cache, clock, UpstreamMetrics("head", ["stable"], (1.0,)))
    listener = HttpListener(None, "head")

    out = fb.serve("k", Reason.UPSTREAM_5XX)
    head = listener.answer_head(out, "rid-1", "X-Canary-Track", "stable")
    assert isinstance(head, HeadLines)
    assert head.lines == ["Content-Type: text/plain\r\n", "X-A: 1\r\n", "X-A: 2\r\n",
                          "Age: 0\r\nX-Fallback: cache\r\nX-Fallback-Reason: upstream_5xx\r\n",
                          "X-Request-Id: rid-1\r\n", "X-Canary-Track: stable\r\n"]
    again = listener.answer_head(fb.serve("k", Reason.TIMEOUT), "rid-2", None, "stable")
    assert again.lines[-2:] == ["Age: 0\r\nX-Fallback: cache\r\nX-Fallback-Reason: timeout\r\n", "X-Request-Id: rid-2\r\n"]
    assert cache.get("k").lines == head.lines[:3]
    served = fb.serve("k", Reason.UPSTREAM_5XX)
    before = list(served.head)
    listener.answer_head(served, "rid-a", None, "stable")
    listener.answer_head(served, "rid-b", None, "stable")
    assert served.head == before  # the listener appends to a copy, never to the answer's own lines

    changed = fb.serve("k", Reason.UPSTREAM_5XX)
    changed.headers["X-Added-Later"] = "yes"  # something between the cache and the listener added a header
    head = listener.answer_head(changed, "rid-3", None, "stable")
    assert not isinstance(head, HeadLines) and head["X-Added-Later"] == "yes" and head["X-Fallback"] == "cache"


def test_an_upstream_head_is_forwarded_from_its_raw_list_with_a_date_even_if_its_own_was_listed():
    from proxy.exchange import ProxyResponse
    from proxy.http1.client import ClientResponse
    from proxy.http1.server import HeadLines
    from proxy.listen.http import HttpListener

    raw = [("Date", "Tue, 01 Dec 2026 00:00:00 GMT"), ("Connection", "Date, X-Hop"), ("X-Hop", "1"),
           ("X-Canary-Track", "upstream"), ("X-B", "b"), ("Content-Length", "3")]
    cr = ClientResponse(200, "OK", CIMultiDict(raw), None, None, raw)
    head = HttpListener(None, "raw").answer_head(ProxyResponse(200, cr.headers, None, stream=cr), "rid", "X-Canary-Track", "stable")
    assert isinstance(head, HeadLines)
    assert head.lines == ["X-B: b\r\n", "X-Request-Id: rid\r\n", "X-Canary-Track: stable\r\n"]
    assert not head.has_date  # Response adds its own Date: the upstream's was hop-by-hop here
    raw2 = [("Date", "Tue, 01 Dec 2026 00:00:00 GMT"), ("X-B", "b")]
    cr2 = ClientResponse(200, "OK", CIMultiDict(raw2), None, None, raw2)
    head = HttpListener(None, "raw").answer_head(ProxyResponse(200, cr2.headers, None, stream=cr2), "rid", None, "stable")
    assert head.has_date and head.lines[0] == "Date: Tue, 01 Dec 2026 00:00:00 GMT\r\n"
