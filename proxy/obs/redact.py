"""Redaction by structure, for every place a config value or an error can surface (logs, check-config,
/health, /admin/config, reload answers): a URL's user info is removed whatever the URL's scheme or
whether it parses, so a credential in a mistyped URL is not shown back. No dependency: imported by the
settings and by the log formatter alike."""

from __future__ import annotations

import re

# user info: after "scheme://" (any scheme, even a misspelt one) up to the last "@" before the host
_USERINFO = re.compile(r"(?<=://)[^/?#\s'\"<>]*@")


def userinfo(text: str) -> str:
    return _USERINFO.sub("<redacted>@", text) if "@" in text else text


def url(value: str) -> str:
    """A URL for display: user info and query values out (either may carry a credential)."""
    scheme, sep, rest = value.partition("://")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "<redacted>@" + netloc.rpartition("@")[2]
    path, q, query = path.partition("?")
    if q:
        query = "&".join(f"{p.partition('=')[0]}=<redacted>" if "=" in p else p for p in query.split("&"))
    return f"{scheme}{sep}{netloc}{slash}{path}{q}{query}"
