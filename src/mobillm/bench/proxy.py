"""A TCP forwarder on loopback that can cut every connection through it, on demand.

The fault harness puts it between a device and the server: ``cut()`` aborts the TCP
connections as a lost Wi-Fi link would, mid-message, without either process knowing why.
"""

from __future__ import annotations

import asyncio
import threading


class CutProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``; ``cut()`` drops all connections."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.cuts = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> int:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = fut.result(10)
        return self.port

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_w}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers -= {writer, up_w}

    def cut(self) -> int:
        """Abort every open connection; returns how many there were."""

        async def abort() -> int:
            n = len(self._writers)
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()
            return n

        n = asyncio.run_coroutine_threadsafe(abort(), self._loop).result(10)
        self.cuts += 1
        return n

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
