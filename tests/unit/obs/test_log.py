"""Log lines never carry a secret: not when JSON would escape it, not inside a URL's user info."""

from __future__ import annotations

import json
import logging

from proxy.obs import log


def line(**fields) -> str:
    rec = logging.LogRecord("resilience-proxy", logging.ERROR, __file__, 1, "reload_failed", None, None)
    rec.fields = fields
    return log.JSONFormatter().format(rec)


def test_a_secret_that_json_would_escape_is_still_scrubbed():
    secret = 'pa\\ss"wörd-1'
    log.set_secrets(frozenset({secret}))
    try:
        out = line(errors=[f"header X-Key: {secret}"], nested={"k": secret})
    finally:
        log.set_secrets(frozenset())
    assert secret not in json.loads(out)["errors"][0] and "<redacted>" in json.loads(out)["errors"][0]
    assert json.dumps(secret)[1:-1] not in out and "pa\\\\ss" not in out
    assert json.loads(out)["nested"] == {"k": "<redacted>"}


def test_user_info_of_any_url_is_redacted():
    out = json.loads(line(url="htp://admin:hunter22@db:8080/x", other="redis://:pw9@r:6379"))
    assert out["url"] == "htp://<redacted>@db:8080/x" and out["other"] == "redis://<redacted>@r:6379"
