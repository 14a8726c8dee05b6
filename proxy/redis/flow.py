"""Flow control for one Redis client connection (a part of the listener's protocol): when its commands
must wait, and when the client's socket is not read.

A command waits, with every command after it, in order: behind a read waiting for its retry, behind a
SELECT being checked, behind this client's share of a shared connection, while the client does not read
its replies, or for room under `limits.max_in_flight` (the upstream's commands in flight, all clients
together). While anything waits the client's socket is not read, so what waits in the proxy is at most
one read's worth. Waiting for room ends when commands of the upstream finish (oldest waiting client
first, one wake-up loop per upstream) or after `limits.pending_timeout`, when what waits is answered
from the stale-read cache or `overloaded` (proxy/redis/resilience.py).
"""

from __future__ import annotations

import asyncio
import collections

from proxy.obs import log

_DEMOTE_AFTER = 1.0  # a client not reading its replies this long gets a connection that can be paused
_RELIEVE_AFTER = 1.0  # clients waiting for memory this long: the ones holding most are closed for them
# client_output_limit is Redis's soft limit: over it for this long (the client is not reading fast enough),
# the client is closed; over twice it, at once. One large reply to a client that reads is not a reason.
_OUTPUT_GRACE = 10.0



def drop_raw(args) -> None:
    """A command that waits holds its arguments only: the client's bytes of it (codec.Args.raw) would
    be a second copy the client's memory accounting does not see; it is encoded again when it goes."""
    if getattr(args, "raw", None) is not None:
        args.raw = None

class ClientMemory:
    """Bytes the listener of one upstream holds for its clients, all together: unfinished commands and
    replies not yet taken by the client (resolved, waiting in order, or in the socket's buffer). State:
    survives a reload (connections opened before it still count here). Over 3/4 of `max_client_memory`
    clients are not read (those in the middle of a command are, so they finish it and it drains); over
    all of it the clients holding the most are closed, as Redis's maxmemory-clients evicts them. Clients
    that hold memory and never read could keep the rest waiting for good: after _RELIEVE_AFTER of waiting
    the ones holding most are closed until the total is back under 3/4, and reading resumes. So N clients
    cannot add up past the sidecar's memory limit, and a client that reads is never starved by them."""

    __slots__ = ("total", "clients", "paused", "limit", "soft", "timer")

    def __init__(self, limit: int) -> None:
        self.total = 0
        self.clients: set = set()
        self.paused: list = []
        self.timer = None
        self._set_limit(limit)

    def _set_limit(self, limit: int) -> None:
        self.limit, self.soft = limit, limit * 3 // 4  # soft kept: the listener compares it on every read

    def reconfigure(self, spec, configured=None) -> None:
        self._set_limit(spec.max_client_memory)
        if self.total > self.limit:
            self.evict()

    def evict(self, down_to: int | None = None) -> None:
        bound = self.limit if down_to is None else down_to
        while self.total > bound and self.clients:
            c = max(self.clients, key=lambda c: c.mem)
            if not c.mem:
                break
            c._evict("max_client_memory", c.mem)

    def wait(self, client, clock) -> None:
        self.paused.append(client)
        if self.timer is None:
            self.timer = clock.call_later(_RELIEVE_AFTER, self.relieve)

    def relieve(self) -> None:
        self.timer = None
        if self.paused and self.total > self.soft:
            self.evict(self.soft)
        self.resume()

    def resume(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        paused, self.paused = self.paused, []
        for c in paused:
            c._mem_resume()


class FlowControl:
    """Expects the listener's state (`_parked`, `transport`, `counters`, `chain`, `clock`, `paused`,
    `write_paused`, `shared_out`, `retrying`, `dedicated`, ...) on the protocol it is mixed into."""

    # -- holding commands back -----------------------------------------------------------------------
    def _hold(self) -> None:
        """From now on commands wait in `_parked` (and the client's input with them)."""
        if self._parked is None:
            self._parked = collections.deque()
            if self.transport is not None:
                self.transport.pause_reading()

    def _park(self, args: list[bytes], read_at: float) -> None:
        self._hold()
        drop_raw(args)
        self._parked.append((args, read_at))

    def _shared_done(self) -> None:
        self.shared_out -= 1
        if self.gone:  # its slot is gone with the client; the command was counted until now
            self.counters.in_flight -= 1
            if self.counters.waiting:
                self._room_freed()
        elif self._parked is not None:
            self._release_parked()

    def _release_parked(self) -> None:
        """Dispatch held-back commands in order until one has to wait again."""
        if self._parked is None or self.closing or self._releasing or self._validating:
            return
        parked, self._parked = self._parked, None
        self._releasing = True  # a command failing at once re-enters _shared_done: no recursion
        try:
            self._corked(self._dispatch_held, parked)
        finally:
            self._releasing = False
        if (self._parked is None and self.transport is not None and not self.paused and not self.write_paused
                and not self.mem_paused):
            self.transport.resume_reading()
        elif (self._parked is not None and not self.shared_out and not self.write_paused and not self.retrying
              and not self._validating and self._room_since is None):
            self._release_parked()  # everything it waited for was answered while it was being parked

    def _dispatch_held(self, parked: collections.deque) -> None:
        while parked and not self.closing:
            args, read_at = parked.popleft()
            self.dispatch(args, read_at)
            if self._parked is not None:  # it (or a SELECT being checked) waits again: the rest behind
                self._parked.extend(parked)
                return
            if self.tunnel:  # SUBSCRIBE/MONITOR: what follows it (and a command still arriving) is raw
                self._forward_rest([a for a, _ in parked])
                parked.clear()

    # -- room under max_in_flight --------------------------------------------------------------------
    def _wait_for_room(self, args: list[bytes], read_at: float) -> None:
        """Over max_in_flight: hold this command (and stop reading) until a command of this upstream
        finishes, for at most pending_timeout in all."""
        self._park(args, read_at)
        now = self.clock.monotonic()
        if self._room_since is None:
            self._room_since = now
        if self._room_timer is None:
            self.counters.waiting.append(self)
            left = max(0.0, self._room_since + self.chain.pending_timeout - now)
            self._room_timer = self.clock.call_later(left, self._room_timeout)

    def _leave_room(self) -> None:
        """No longer waiting for room (admitted another way, or gone)."""
        self._room_since = None
        if self._room_timer is not None:
            self._room_timer.cancel()
            self._room_timer = None
            try:
                self.counters.waiting.remove(self)
            except ValueError:
                pass  # already woken

    def _room_freed(self) -> None:
        """Commands of this upstream finished: wake waiting clients, oldest first, while there is room.
        One loop per upstream at a time: a client woken here may finish commands at once (breaker open,
        total spent) and free room again, which the running loop then uses, instead of waking clients
        from ever deeper frames."""
        counters = self.counters
        if counters.waking:
            return
        counters.waking = True
        waiting, chain = counters.waiting, self.chain
        skipped = []
        try:
            while waiting and chain.admits():
                c = waiting.popleft()
                timer, c._room_timer = c._room_timer, None
                c._release_parked()  # its first command takes the room, or it waits again (a new timer)
                if c._room_timer is None and c._room_since is not None and not c.gone:
                    # it could not run just now (not reading its replies, a SELECT being checked): it
                    # keeps its place and its deadline, and the next waiter gets the room
                    c._room_timer = timer
                    skipped.append(c)
                elif timer is not None and c._room_timer is not timer:
                    timer.cancel()
        finally:
            waiting.extendleft(reversed(skipped))
            counters.waking = False

    def _room_timeout(self) -> None:
        """pending_timeout passed without room: what is held is answered (stale read, or overloaded)."""
        self._room_timer = None
        try:
            self.counters.waiting.remove(self)
        except ValueError:
            pass
        self._room_since = None
        self._shedding = True
        try:
            self._release_parked()
        finally:
            self._shedding = False

    # -- memory: per client (`redis.client_output_limit`), per upstream (`redis.max_client_memory`) ------
    def _output_bytes(self) -> int:
        """Replies not yet taken by the client: resolved but waiting in order, and in its socket's buffer."""
        t = self.transport
        return self.replies_held + (t.get_write_buffer_size() if t is not None else 0)

    def _account(self, read: bool = False) -> None:
        """Bring this client's share of ClientMemory up to date (after a read, a write, a drain)."""
        if self.gone:
            return
        transport = self.transport
        out = self._output_bytes()
        now = self.parser.buffered + self.sent_bytes + out
        delta = now - self.mem
        pool = self.memory
        if out > self.output_limit:
            if out > 2 * self.output_limit:
                self._evict("client_output_limit", out)
                return
            if self._over_timer is None:
                self._over_timer = self.clock.call_later(_OUTPUT_GRACE, self._output_check)
        elif self._over_timer is not None:
            self._over_timer.cancel()
            self._over_timer = None
        if delta:
            self.mem = now
            pool.total += delta
            if delta > 0:
                if pool.total > pool.limit:
                    pool.evict()
                    if self.gone:
                        return
            elif pool.paused and pool.total <= pool.soft:
                pool.resume()
        if read and pool.total > pool.soft and not self.parser.buffered and not self.mem_paused:
            # between commands: take no new one until the clients' memory drains
            self.mem_paused = True
            pool.wait(self, self.clock)
            if transport is not None:
                transport.pause_reading()

    def _output_check(self) -> None:
        """Over client_output_limit _OUTPUT_GRACE ago: still over it, the client is closed."""
        self._over_timer = None
        if self.gone:
            return
        out = self._output_bytes()
        if out > self.output_limit:
            self._evict("client_output_limit", out)
        else:
            self._account()

    def _mem_resume(self) -> None:
        self.mem_paused = False
        if (self.transport is not None and not self.gone and not self.paused and not self.write_paused
                and self._parked is None and not self.transport.is_closing()):
            self.transport.resume_reading()

    def _evict(self, limit: str, held: int) -> None:
        """Over a memory limit: closed at once, what it is owed dropped — the client, never the process."""
        log.warning("redis_client_evicted", upstream=self.name, limit=limit, bytes=held)
        self.up.metrics.evicted(limit)
        if self.transport is not None:
            self.transport.abort()  # its buffered replies go now, not after they are sent
        self._abandon()

    def _forget_memory(self) -> None:
        pool = self.memory
        pool.total -= self.mem
        self.mem = 0
        pool.clients.discard(self)

    # -- back-pressure: a slow client must not make the proxy buffer everything Redis sends ------------
    def pause_writing(self) -> None:
        self.write_paused = True
        self._account()  # its socket's buffer is past the high-water mark
        for c in (self.conn, *self._retired):
            if c is not None:
                c.pause()
        # A shared connection cannot stop for one slow reader: stop taking this client's commands
        # instead, and move it to a connection of its own (which can be paused) once what it is owed
        # on the shared one is answered — its replies in the proxy stay bounded by what a pause holds.
        if not self.dedicated and self._demote_timer is None:
            self._demote_timer = asyncio.get_running_loop().call_later(_DEMOTE_AFTER, self._demote)
        if self.transport is not None and not self.paused:
            self.transport.pause_reading()

    def _demote(self) -> None:
        self._demote_timer = None
        if self.write_paused and not self.gone:
            self.demote = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._demote_timer is not None:
            self._demote_timer.cancel()
            self._demote_timer = None
        for c in (self.conn, *self._retired):
            if c is not None:
                c.resume()
        self._account()  # its socket's buffer has drained
        if self._parked is not None:
            self._release_parked()
        elif (self.transport is not None and not self.paused and not self.mem_paused
              and not self.transport.is_closing()):
            self.transport.resume_reading()
