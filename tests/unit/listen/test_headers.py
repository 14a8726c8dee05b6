"""What the HTTP listener forwards of a request's headers, and the request ids it makes."""

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
