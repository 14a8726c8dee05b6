"""The LLM path's view of one request (`ProxyRequest.llm`): parsed once by the openai listener, read by
the LLM policies (cache key, model failover, degraded answer) and by the listener again for the answer
(stream relay, first-byte time, token counts)."""

from __future__ import annotations

from typing import Any


class LLMCall:
    __slots__ = ("started", "cache_mode", "doc", "stream", "model", "key", "model_fallback", "first_chunk",
                 "prefill", "continuations", "current", "estimate")

    def __init__(self, started: float) -> None:
        self.started = started                  # monotonic, for the first-byte histogram
        self.cache_mode: str | None = None      # X-Proxy-Cache: no-store | only-if-cached
        self.doc: dict[str, Any] | None = None  # the JSON body of a POST
        self.stream = False
        self.model = "other"                    # the model's metric label
        self.key: bytes | None = None           # the cache key (the request's meaning)
        self.model_fallback: str | None = None  # the fallback model that answered
        self.first_chunk = b""                  # a stream's first bytes, read to end its attempt
        self.prefill = False                    # a continuation: its last message is the answer so far
        self.continuations = 0                  # parts spliced into a broken stream
        self.current: str | None = None         # the model this attempt asks (model failover sets it)
        self.estimate: int | None = None        # its tokens as llm.limits estimates them (once per body)

    @property
    def asked(self) -> Any:
        """The model this attempt asks for: the one failover moved to, else the request's own."""
        if self.current is not None:
            return self.current
        return self.doc.get("model") if self.doc is not None else None
