"""A TCP relay in front of a real server that counts every connection it is offered, and can be cut
(every relayed connection reset, new ones accepted and dropped) or stalled (the server's answers held
back while the relay keeps the connections open): Redis down or silent, with the connection attempts
the proxy makes visible."""

from __future__ import annotations

import asyncio


class CountingRelay:
    def __init__(self, port: int) -> None:
        self.target_port, self.accepted, self.down = port, 0, False
        self.live: set = set()
        self.flowing = asyncio.Event()
        self.flowing.set()

    def cut(self) -> None:
        """Down from now on, and every relayed connection reset."""
        self.down = True
        for w in list(self.live):
            w.transport.abort()

    def stall(self) -> None:
        """Answers from the server are held (connections stay open): a server that went silent."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def start(self) -> CountingRelay:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        self.server.close()
        self.cut()

    async def _client(self, reader, writer):
        self.accepted += 1
        if self.down:
            writer.transport.abort()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.live.add(writer)

        async def pipe(r, w, gated: bool):
            try:
                while data := await r.read(65536):
                    if gated:
                        await self.flowing.wait()
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        try:
            await asyncio.gather(pipe(reader, uw, False), pipe(ur, writer, True))
        except asyncio.CancelledError:
            pass
        finally:
            self.live.discard(writer)
