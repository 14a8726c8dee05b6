"""A streamed completion as the app receives it, and the continuation spliced into it — sans-IO.

Used by the openai listener's relay (proxy/listen/openai.py), after the chain: each upstream stream's
bytes go in, the bytes for the app come out. The first part's events are forwarded as they came (no
re-encoding on the normal path); what the app has got is tracked on the way (completion id, text,
role chunk, finish_reason), and an event that breaks the answer — an in-band `{"error": ...}` (OpenRouter
reports a provider failing mid-stream so, under HTTP 200) or one that is not JSON — is held back and
ends the part, as a cut connection or an idle timeout does (the relay's side).

A broken answer is continued by asking again with the text already sent as an assistant prefill
(`continuation_doc`); the continuation's events are rewritten into the first part's stream: the same
completion id, no second role chunk, the seam's whitespace once (a prefill is sent without trailing
whitespace, which several providers refuse, so a model may send it again), and the usage of the whole
answer — the original prompt plus every completion token the app received. The provider counts the
earlier parts' text as prompt in the continuation's usage; the split uses the app's count of content
chunks for the earlier parts (about one token each), the total is the provider's own.

Not continued: more than one choice, tool-call deltas, text completions, an event too large to read.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.llm.sse import DONE, SEPARATORS, Assembler, _boundary, event

_SKIP_BLANK = b"\r\n"


class Splice:
    __slots__ = ("max_event", "asm", "_buf", "_skipping", "blind", "fault", "detail", "part", "id", "earlier",
                 "seam", "continuable", "done_sent")

    def __init__(self, max_event: int = 1 << 20) -> None:
        self.max_event = max_event
        self.asm = Assembler()        # the completion as the app received it
        self._buf = bytearray()
        self._skipping = False        # inside an event too large to hold: forwarded as it comes
        self.blind = False            # such an event passed: what the app has is not known exactly
        self.fault: str | None = None  # this part broke: error_event | malformed
        self.detail = ""              # the provider's own message of an in-band error
        self.part = 0                 # 0: the first answer; n: the n-th continuation
        self.id: str | None = None    # the app's completion id
        self.earlier = 0              # deltas of the parts before this one (counted as prompt by it)
        self.seam = False             # strip the whitespace a continuation repeats at the seam
        self.continuable = True
        self.done_sent = False

    # -- reading -------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """The answer is whole: every choice has its finish_reason (with or without `[DONE]`)."""
        return self.asm.finished

    def feed(self, data: bytes) -> bytes:
        """This part's next bytes → what to send the app now. Stops at a breaking event (`fault` set):
        it and anything after it are not sent. Each byte is searched once (plus a separator's width),
        however small the reads: a provider sending an event a few bytes at a time costs linear time."""
        if self.fault is not None:
            return b""
        buf = self._buf
        scan = max(0, len(buf) - 3)  # a separator may have begun in the last bytes of the previous read
        buf += data
        out: list[bytes] = []
        pos = 0
        if self._skipping:
            cut, sep = _boundary(buf, scan)
            if cut == -1:
                if len(buf) > 3:
                    out.append(bytes(buf[:-3]))
                    del buf[:-3]
                return b"".join(out)
            out.append(bytes(buf[:cut + sep]))
            pos = scan = cut + sep
            self._skipping = False
        while True:
            cut, sep = _boundary(buf, scan)
            if cut == -1:
                break
            raw = bytes(buf[pos:cut + sep])
            size = cut - pos
            pos = scan = cut + sep
            piece = self._event(raw, size)
            if self.fault is not None:
                self._buf = bytearray()
                return b"".join(out)
            if piece:
                out.append(piece)
        del buf[:pos]
        if len(buf) > self.max_event:
            # an event larger than anything it could be checked with: forwarded as it comes, unread
            self.blind = self._skipping = True  # the copy misses it: not cached, not continued
            self.continuable = False
            out.append(bytes(buf[:-3]))
            del buf[:-3]
        return b"".join(out)

    def end(self) -> bytes:
        """This part's body ended cleanly: a last event without its blank line still counts."""
        tail, self._buf = bytes(self._buf), bytearray()
        if self._skipping or not tail.strip(_SKIP_BLANK):
            self._skipping = False
            if self.part or not tail:
                return b""
            return tail if tail.endswith(SEPARATORS) else tail + b"\n\n"
        return self._event(tail + b"\n\n", len(tail)) if self.fault is None else b""

    def _event(self, raw: bytes, size: int) -> bytes:
        """One whole event (with its separator) → the bytes the app gets for it."""
        line = raw[:size]
        if line.startswith(b"data: ") and b"\n" not in line and b"\r" not in line:
            data = line[6:].decode("utf-8", "replace")  # the usual event: one data line
        else:
            lines = line.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            payload = [ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:")]
            if not payload:
                return raw  # a comment (`: OPENROUTER PROCESSING`) or a bare field: relayed
            data = b"\n".join(payload).decode("utf-8", "replace")
        if data.strip() == "[DONE]":
            self.asm.done = True
            if self.done_sent or not self.finished:
                return b""  # a sentinel after an unfinished answer is not the end of it
            self.done_sent = True
            return raw if self.part == 0 else DONE
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            self.fault = "malformed"
            return b""
        if isinstance(chunk, dict) and "error" in chunk:
            self.fault = "error_event"
            err = chunk["error"]
            self.detail = str(err.get("message", "") if isinstance(err, dict) else err)[:300]
            return b""
        if not isinstance(chunk, dict):
            return raw if self.part == 0 else b""
        self._track(chunk)
        if self.part == 0:
            self.asm.add_chunk(chunk)
            return raw
        chunk = self._rewrite(chunk)
        if chunk is None:
            return b""
        self.asm.add_chunk(chunk)
        return event(chunk)

    def _track(self, chunk: dict[str, Any]) -> None:
        if self.id is None and isinstance(chunk.get("id"), str):
            self.id = chunk["id"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        if len(choices) > 1:
            self.continuable = False
        for ch in choices:
            if not isinstance(ch, dict) or ch.get("index", 0) not in (0, None, "0"):
                self.continuable = False
                continue
            delta = ch.get("delta")
            if not isinstance(delta, dict):
                if "text" in ch:
                    self.continuable = False  # a text completion: not continued
                continue
            if delta.get("tool_calls") or delta.get("function_call"):
                self.continuable = False

    def _rewrite(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """A continuation's chunk as part of the app's answer; None: nothing left of it to send."""
        if self.id is not None:
            chunk["id"] = self.id
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            chunk["usage"] = self.whole_usage(usage)
        keep = bool(chunk.get("usage"))
        choices = chunk.get("choices")
        for ch in choices if isinstance(choices, list) else ():
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            if isinstance(delta, dict):
                delta.pop("role", None)
                content = delta.get("content")
                if isinstance(content, str):
                    if self.seam:
                        content = content.lstrip()
                        if content:
                            self.seam = False
                        delta["content"] = content
                    if content:
                        keep = True
                if any(k != "content" for k in delta) and delta:
                    keep = True
            if ch.get("finish_reason"):
                keep = True
        if not keep and choices:
            return None
        return chunk

    def whole_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The continuation's usage → the whole answer's: its prompt holds the earlier parts' text."""
        out = dict(usage)
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int) and isinstance(c, int):
            moved = min(self.earlier, p)
            out["prompt_tokens"], out["completion_tokens"] = p - moved, c + moved
            out["total_tokens"] = p + c
        return out

    # -- the next part -------------------------------------------------------------------------------
    def sent_text(self) -> str:
        return "".join(self.asm.choices[0]["content"]) if 0 in self.asm.choices else ""

    def continuation_doc(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """The request that continues this answer, or None when it cannot be continued."""
        if not self.continuable or self.blind or self.asm.broken and self.fault is None:
            return None
        messages = doc.get("messages")
        if not isinstance(messages, list) or doc.get("n") not in (None, 1):
            return None
        sent = self.sent_text()
        prefill = sent.rstrip()
        msgs = list(messages)
        last = msgs[-1] if msgs else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            if not isinstance(last.get("content"), str):
                return None
            # the app's own prefill: the answer goes on from it
            msgs[-1] = {**last, "content": (last["content"] + sent).rstrip()}
        elif prefill:
            msgs.append({"role": "assistant", "content": prefill})
        out = {**doc, "messages": msgs}
        spent = self._deltas()
        for k in ("max_tokens", "max_completion_tokens"):
            v = doc.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = max(1, v - spent)
        return out

    def _deltas(self) -> int:
        c = self.asm.choices.get(0)
        return sum(1 for x in c["content"] if x) if c else 0

    def next_part(self) -> None:
        """A continuation's stream follows: its events are spliced in."""
        self.earlier = self._deltas()
        sent = self.sent_text()
        self.seam = bool(sent) and sent != sent.rstrip()
        self.part += 1
        self.fault, self.detail, self._buf, self._skipping = None, "", bytearray(), False
        self.asm.done = False
