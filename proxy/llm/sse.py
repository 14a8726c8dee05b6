"""Server-sent events, sans-IO: split a byte stream into events, assemble `chat.completion.chunk` /
`text_completion` chunks into the equivalent non-streamed completion, and replay a completion as a
valid SSE stream. Nothing here touches a socket, so it is fuzzed and unit-tested on bytes."""

from __future__ import annotations

import json
import re
from typing import Any

SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")  # an event ends at a blank line, however it is written


def last_boundary(buf: bytes) -> int:
    """End of the last complete event in `buf` (0 if none): a relay forwards whole events only, so a cut
    stream never leaves half an event in front of the error event."""
    return max((i + len(s) for s in SEPARATORS if (i := buf.rfind(s)) != -1), default=0)


_SEPARATOR = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _boundary(buf: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """(start, length) of the first event separator in buf at or after `start`, (-1, 0) if none: one
    scan, stopping at the first (three `find`s would each run to the end of a large read)."""
    m = _SEPARATOR.search(buf, start)
    return (m.start(), m.end() - m.start()) if m is not None else (-1, 0)


class SSEParser:
    """Feed bytes, get complete events' `data` payloads (str). Bounded: an event larger than `max_event`
    is skipped, not held (the stream still passes through whole; `overflow` says the copy the listener
    assembles is missing it, so it is not cached) — and parsing goes on after it, so the end of the
    stream is still seen."""

    __slots__ = ("_buf", "max_event", "overflow", "_skipping")

    def __init__(self, max_event: int = 1 << 20) -> None:
        self._buf = b""
        self.max_event = max_event
        self.overflow = False
        self._skipping = False  # inside an event too large to hold: looking for its end

    def feed(self, data: bytes) -> list[str]:
        buf = self._buf + data
        if self._skipping:
            cut, sep = _boundary(buf)
            if cut == -1:
                self._buf = buf[-3:]  # a separator may straddle this read and the next
                return []
            buf, self._skipping = buf[cut + sep:], False
        events: list[str] = []
        while True:
            cut, sep = _boundary(buf)
            if cut == -1:
                break
            raw, buf = buf[:cut], buf[cut + sep:]
            if cut > self.max_event:
                self.overflow = True  # skipped as when it arrives in pieces: the same, however it is read
                continue
            lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            payload = [ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:")]
            if payload:
                events.append(b"\n".join(payload).decode("utf-8", "replace"))
        if len(buf) > self.max_event:
            self.overflow = self._skipping = True
            buf = buf[-3:]
        self._buf = buf
        return events


class Assembler:
    """Merges streamed chunks into the completion a non-streaming call would have returned."""

    def __init__(self) -> None:
        self.base: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.kind = "chat"
        self.broken = False

    def add(self, data: str) -> None:
        """Never raises: an odd chunk only makes the copy unusable for the cache; the stream itself
        passes through untouched."""
        try:
            self._add(data)
        except (TypeError, AttributeError, ValueError, KeyError, RecursionError):
            self.broken = True

    def add_chunk(self, chunk: Any) -> None:
        """A chunk parsed already (the relay reads each event once)."""
        try:
            self._chunk(chunk)
        except (TypeError, AttributeError, ValueError, KeyError, RecursionError):
            self.broken = True

    def _add(self, data: str) -> None:
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.broken = True
            return
        self._chunk(chunk)

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            self.broken = True
            return
        for k in ("id", "created", "model", "system_fingerprint", "provider"):
            if k in chunk and k not in self.base:
                self.base[k] = chunk[k]
        if chunk.get("object") == "text_completion":
            self.kind = "text"
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for ch in chunk.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0)
            if idx is None:
                idx = 0  # some providers send null for the only choice
            elif isinstance(idx, str) and idx.isdigit() and len(idx) < 4:
                idx = int(idx)  # ... or the number as text
            elif not isinstance(idx, int):
                self.broken = True  # not a choice this copy can hold (nor sort)
                continue
            c = self.choices.setdefault(idx, {"index": idx, "content": [], "role": None, "tool_calls": {},
                                              "finish_reason": None, "text": []})
            if ch.get("finish_reason"):
                c["finish_reason"] = ch["finish_reason"]
            if "text" in ch and isinstance(ch["text"], str):
                self.kind = "text"
                c["text"].append(ch["text"])
            delta = ch.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            if delta.get("role"):
                c["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                c["content"].append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                if not isinstance(tc, dict):
                    continue
                slot = c["tool_calls"].setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                                       "function": {"name": "", "arguments": []}})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                if tc.get("type"):
                    slot["type"] = tc["type"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] = fn["name"]
                if isinstance(fn.get("arguments"), str):
                    slot["function"]["arguments"].append(fn["arguments"])

    @property
    def finished(self) -> bool:
        """Every choice has its finish_reason, and nothing was odd: the answer is whole, with or without
        `[DONE]` (the sentinel is optional in practice; some providers never send it)."""
        return not self.broken and bool(self.choices) and all(c["finish_reason"] for c in self.choices.values())

    @property
    def complete(self) -> bool:
        return self.done and not self.broken and bool(self.choices) and all(
            c["finish_reason"] for c in self.choices.values())

    def completion(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.base.get("id", ""), "object": "chat.completion" if self.kind == "chat"
                               else "text_completion", "created": self.base.get("created", 0),
                               "model": self.base.get("model", "")}
        for k in ("system_fingerprint", "provider"):
            if k in self.base:
                out[k] = self.base[k]
        choices = []
        for idx in sorted(self.choices):
            c = self.choices[idx]
            if self.kind == "text":
                choices.append({"index": idx, "text": "".join(c["text"]), "finish_reason": c["finish_reason"]})
                continue
            msg: dict[str, Any] = {"role": c["role"] or "assistant", "content": "".join(c["content"]) or None}
            if c["tool_calls"]:
                msg["tool_calls"] = [
                    {"id": t["id"], "type": t["type"],
                     "function": {"name": t["function"]["name"], "arguments": "".join(t["function"]["arguments"])}}
                    for _, t in sorted(c["tool_calls"].items())]
            if msg["content"] is None and not c["tool_calls"]:
                msg["content"] = ""
            choices.append({"index": idx, "message": msg, "finish_reason": c["finish_reason"]})
        out["choices"] = choices
        if self.usage is not None:
            out["usage"] = self.usage
        return out


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def replay(completion: dict[str, Any], extra: dict[str, Any] | None = None, piece: int = 64) -> list[bytes]:
    """A completion as the SSE events a streaming call would have produced. `extra` fields (fallback
    markers) go into the first chunk."""
    text = completion.get("object") == "text_completion"
    base = {"id": completion.get("id", ""), "object": "text_completion" if text else "chat.completion.chunk",
            "created": completion.get("created", 0), "model": completion.get("model", "")}
    out: list[bytes] = []
    first = True

    def chunk(choices: list[dict[str, Any]], **more: Any) -> None:
        nonlocal first
        body = {**base, "choices": choices, **more}
        if first and extra:
            body.update(extra)
        first = False
        out.append(event(body))

    for ch in completion.get("choices") or ():
        idx = ch.get("index", 0)
        if text:
            s = ch.get("text") or ""
            for i in range(0, max(len(s), 1), piece):
                chunk([{"index": idx, "text": s[i:i + piece], "finish_reason": None}])
        else:
            msg = ch.get("message") or {}
            chunk([{"index": idx, "delta": {"role": msg.get("role", "assistant"), "content": ""}, "finish_reason": None}])
            s = msg.get("content") or ""
            for i in range(0, len(s), piece):
                chunk([{"index": idx, "delta": {"content": s[i:i + piece]}, "finish_reason": None}])
            for n, tc in enumerate(msg.get("tool_calls") or ()):
                chunk([{"index": idx, "delta": {"tool_calls": [{"index": n, "id": tc.get("id"), "type": tc.get("type", "function"),
                                                                 "function": tc.get("function") or {}}]},
                        "finish_reason": None}])
        last: dict[str, Any] = {"index": idx, "finish_reason": ch.get("finish_reason") or "stop"}
        if text:
            last["text"] = ""
        else:
            last["delta"] = {}
        chunk([last])
    if completion.get("usage"):
        chunk([], usage=completion["usage"])
    out.append(DONE)
    return out
