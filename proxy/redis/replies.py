"""Reply ordering and batching for one Redis client connection (a part of the listener's protocol).

Replies go back in command order through a queue of slots, whatever order they are resolved in (an
upstream reply, a retried read, a cached read, an error). The replies one read of a shared upstream
connection brings, for many clients, are written at the end of that read, once per client (a pipeline
of 16 is one write, not 16): `SharedBatch`, one per process, kept by the StateStore. Out-of-band bytes
(pub/sub messages, RESP3 pushes) wait behind every reply owed before them, never dropped.
"""

from __future__ import annotations

import collections

from proxy.obs import log

MAX_PENDING_SLOTS = 10_000  # past this many unanswered commands the client's reads are paused
# Memory accounting (flow.py) runs once something may be held: a client already holding some, a write
# the socket may not take at once, a paused socket. Not on every small reply.
_ACCOUNT_FROM = 64 * 1024


class Slot:
    __slots__ = ("reply",)

    def __init__(self) -> None:
        self.reply: bytes | None = None


class SharedBatch:
    """Corks every client that gets a reply during one read of a shared connection, and flushes each
    once at its end."""

    def __init__(self) -> None:
        self.active = False
        self.clients: list = []

    def __call__(self, start: bool) -> None:
        if start:
            self.active = True
            return
        self.active = False
        clients, self.clients = self.clients, []
        for c in clients:
            c.corked = False
        for c in clients:
            try:
                c._flush()
            except Exception as exc:  # noqa: BLE001 — one client's broken transport must not cork the rest
                log.warning("redis_flush_failed", error=type(exc).__name__)


class ReplyOrder:
    """The output half of a client connection. Expects `transport`, `counters`, `closing`, `paused`,
    `write_paused`, `_parked` and `batch` on the protocol it is mixed into."""

    def _init_replies(self) -> None:
        self.slots: collections.deque[Slot] = collections.deque()
        self.corked = False
        self._after: list[bytes] = []      # out-of-band bytes waiting behind owed replies
        self.replies_held = 0              # bytes of resolved replies (and out-of-band) not yet written
        # (the last slot of a traced batch, its span), oldest first: ended when that slot is written
        self._spans: collections.deque = collections.deque()

    def _new_slot(self) -> Slot:
        """The place of the next reply owed, in command order."""
        slot = Slot()
        self.slots.append(slot)
        self.counters.in_flight += 1
        return slot

    def _reply_now(self, data: bytes) -> None:
        self._new_slot().reply = data
        self.replies_held += len(data)
        self._flush()

    def _resolve(self, slot: Slot, data: bytes) -> None:
        slot.reply = data
        self.replies_held += len(data)
        if self.replies_held > _ACCOUNT_FROM:
            self._account()  # replies waiting in order behind one still owed
        batch = self.batch
        if batch.active and not self.corked:
            self.corked = True  # one write per client for the replies of one shared read
            batch.clients.append(self)
        if self.slots and self.slots[0] is slot:
            self._flush()

    def _end_spans(self, gone: set[int]) -> None:
        """The traced batches whose last reply is out now (their slot left the queue in this flush: the
        queue is in order, so an older one left in an earlier flush and was ended then)."""
        spans = self._spans
        while spans and id(spans[0][0]) in gone:
            spans.popleft()[1].end()

    def _batch(self, start: bool) -> None:
        self.corked = start
        if not start:
            self._flush()

    def _flush(self) -> None:
        if self.corked:
            return  # the end of the batch flushes
        slots = self.slots
        out = []
        if self._spans:  # traced batches waiting (tracing on): note which slots leave, to end their spans
            gone = set()
            while slots and slots[0].reply is not None:
                s = slots.popleft()
                gone.add(id(s))
                out.append(s.reply)
            self._end_spans(gone)
        else:
            while slots and slots[0].reply is not None:
                out.append(slots.popleft().reply)
        freed = len(out)
        if not slots and self._after:
            out.extend(self._after)
            self._after = []
        if out:
            data = b"".join(out) if len(out) > 1 else out[0]
            self.replies_held -= len(data)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)
            if self.mem or self.write_paused or len(data) > _ACCOUNT_FROM:
                self._account()  # else nothing is held: a small write the socket took at once
        if freed:
            # after the write: a waiter woken now may be this client, whose next replies follow these
            self.counters.in_flight -= freed
            if self.counters.waiting:
                self._room_freed()
        if self.paused and len(slots) < MAX_PENDING_SLOTS // 2:
            self.paused = False
            if not self.write_paused and self._parked is None and not self.mem_paused:
                self.transport.resume_reading()
        if self.closing and not slots and self.transport is not None:
            self.transport.close()

    def _out_of_band(self, data: bytes) -> None:
        """Tunnel bytes (pub/sub messages, MONITOR) and RESP3 pushes: after every reply owed before them."""
        if self.transport is None or self.gone:
            return
        corked, self.corked = self.corked, False
        self._flush()  # resolved replies first
        self.corked = corked
        if self.slots:
            self._after.append(data)  # still owed replies: it waits behind them
            self.replies_held += len(data)
        else:
            self.transport.write(data)
        if self.mem or self.write_paused or self.replies_held > _ACCOUNT_FROM or len(data) > _ACCOUNT_FROM:
            self._account()  # as in _flush: not for every small pub/sub message

    def _close_after_flush(self) -> None:
        """QUIT: answer what is owed, then close."""
        self.closing = True
        if not self.slots and self.transport is not None:
            self.transport.close()
