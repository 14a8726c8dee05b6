"""JSON-line logs on stdout: timestamp, level, event, and the fields of the event (upstream, request_id, ...).

Every line goes through `scrub`, so a resolved secret (an API key read from a Secret file) never reaches
the log even if an upstream echoes it back in an error message.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from proxy.obs import redact

_LOGGER = logging.getLogger("resilience-proxy")
_SECRETS: frozenset[str] = frozenset()
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def set_secrets(secrets: frozenset[str]) -> None:
    global _SECRETS
    _SECRETS = frozenset(s for s in secrets if len(s) >= 4)


def scrub(text: str) -> str:
    for s in _SECRETS:
        if s in text:
            text = text.replace(s, "<redacted>")
    return redact.userinfo(text)


def _scrub_fields(value):
    """Scrubbed before JSON encoding: encoded, a secret with a backslash, a quote or a non-ASCII
    character no longer matches itself."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_fields(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_fields(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub(str(value))


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the event's fields; secrets scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(_scrub_fields(line), separators=(",", ":"))


def configure(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JSONFormatter())
    _LOGGER.handlers[:] = [handler]
    _LOGGER.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    _LOGGER.setLevel(LEVELS[level])


def _emit(level: int, event: str, fields: dict) -> None:
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, event, extra={"fields": fields})


def debug(event: str, **fields) -> None:
    _emit(logging.DEBUG, event, fields)


def info(event: str, **fields) -> None:
    _emit(logging.INFO, event, fields)


def warning(event: str, **fields) -> None:
    _emit(logging.WARNING, event, fields)


def error(event: str, **fields) -> None:
    _emit(logging.ERROR, event, fields)
