"""The proxy's JSON log lines, captured as the process would print them (its own formatter, its own
logger), for tests that assert what an operator reads."""

from __future__ import annotations

import io
import json
import logging

from proxy.obs.log import JSONFormatter

LOGGER = "resilience-proxy"


class JsonLog:
    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JSONFormatter())

    def install(self) -> JsonLog:
        logging.getLogger(LOGGER).addHandler(self.handler)
        return self

    def remove(self) -> None:
        logging.getLogger(LOGGER).removeHandler(self.handler)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict]:
        """Every line, each parsed as JSON (a line that is not JSON fails the test)."""
        return [json.loads(line) for line in self.text.splitlines() if line]

    def events(self, event: str, **fields) -> list[dict]:
        return [ln for ln in self.lines() if ln["event"] == event and all(ln.get(k) == v for k, v in fields.items())]
