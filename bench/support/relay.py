"""A TCP relay on 127.0.0.1 that delays every byte by a fixed one-way latency.

    python bench/support/relay.py --port P --target T --one-way-ms 1

The benchmark runs everything on loopback, where a round trip costs nothing and a
TLS handshake saved by the sidecar's pool saves only CPU. A real upstream API is a
network away. Put this relay between a client and the TLS upstream and every
round trip (TCP handshake, TLS handshake, request) costs 2 x one-way; bytes keep
their order and are never coalesced across the delay. Prints "ready" when
listening. Only 127.0.0.1 is ever connected to.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque

READ = 64 * 1024


class _Delayed:
    """One direction: bytes written to ``out`` ``delay`` seconds after they were read, in order."""

    def __init__(self, out: asyncio.StreamWriter, delay: float) -> None:
        self.out = out
        self.delay = delay
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def push(self, data: bytes | None) -> None:  # None: end of stream
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if self.out.is_closing():
                continue
            if data is None:
                if self.out.can_write_eof():
                    self.out.write_eof()
                else:
                    self.out.close()
            else:
                self.out.write(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)


async def pipe(reader: asyncio.StreamReader, delayed: _Delayed) -> None:
    try:
        while data := await reader.read(READ):
            delayed.push(data)
    except ConnectionError:
        pass
    delayed.push(None)


async def main(port: int, target: int, one_way: float) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            c_writer.close()
            return
        await asyncio.sleep(2 * one_way)  # the TCP handshake's round trip to the far side
        await asyncio.gather(pipe(c_reader, _Delayed(u_writer, one_way)), pipe(u_reader, _Delayed(c_writer, one_way)))
        await asyncio.sleep(one_way + 0.01)  # let the last delayed bytes out
        for w in (c_writer, u_writer):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--one-way-ms", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.target, args.one_way_ms / 1000))
