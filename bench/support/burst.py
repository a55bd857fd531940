"""Fire N simultaneous first requests for one uncached client at the sidecar; print JSON.

    python bench/support/burst.py --port P --n 500 --client cold-1 --path /polygon/v1/quote

Connections are opened (in batches, under the listen backlog) and warmed with a
request to an unknown upstream (a 404 that never touches the secret store) so the
measured latency is the request itself, not a storm of TCP handshakes. Then every
connection sends the real request at once; each latency runs from its write to the
moment the last byte of its answer is read.

The client is kept cheap so that it measures the server rather than itself: a bare
protocol per connection (no stream reader), uvloop when installed, and the 500 writes
in one tight loop. Its own floor is what the same burst measures against nginx directly
(``--port`` of the upstream): bench/run.py reports it next to the sidecar's numbers.

The same burst is then sent once more on the same connections, now with the key
cached ("warm_*" numbers): the difference between the two is what the cold path
costs, apart from what answering 500 requests at once costs on one core anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

BATCH = 64
TIMEOUT = 30.0
CONTENT_LENGTH = b"\r\ncontent-length:"  # in a lower-cased head


class Conn(asyncio.Protocol):
    """One keep-alive connection that sends a request and times its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.started = 0.0
        self.done: asyncio.Future[tuple[float, int]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[tuple[float, int]]:
        self.done = asyncio.get_running_loop().create_future()
        if self.transport is None or self.transport.is_closing():
            self.done.set_exception(ConnectionError("the server closed this connection"))
            return self.done
        self.buf.clear()
        self.started = time.perf_counter()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        length = 0
        at = head.find(CONTENT_LENGTH)
        if at >= 0:
            length = int(head[at + len(CONTENT_LENGTH):].split(b"\r\n", 1)[0])
        elif b"\r\ntransfer-encoding:" in head and self.done is not None and not self.done.done():
            # Only Content-Length framing is read here; a chunked answer would be misread.
            self.done.set_exception(ValueError("chunked answers are not supported by this client"))
            return
        if len(self.buf) < end + 4 + length:
            return
        elapsed = time.perf_counter() - self.started
        status = int(head.split(b" ", 2)[1])
        if self.done is not None and not self.done.done():
            self.done.set_result((elapsed, status))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"closed mid-answer: {exc}"))


def request(path: str, client: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: {client}\r\n"
        "User-Agent: bench-burst\r\n\r\n"
    ).encode()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank."""
    n = len(sorted_values)
    return sorted_values[max(0, min(n, math.ceil(p / 100 * n)) - 1)]


async def run(port: int, n: int, client: str, path: str) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    warm = request("/__no_such_upstream__/warm", client)
    for start in range(0, n, BATCH):
        batch = await asyncio.gather(
            *(loop.create_connection(Conn, "127.0.0.1", port) for _ in range(min(BATCH, n - start)))
        )
        fresh = [protocol for _transport, protocol in batch]
        await asyncio.wait_for(asyncio.gather(*(c.send(warm) for c in fresh)), TIMEOUT)
        conns.extend(fresh)
    real = request(path, client)

    async def burst() -> dict[str, object]:
        began = time.perf_counter()
        waits = [c.send(real) for c in conns]  # every write before any answer is read
        results = await asyncio.wait_for(asyncio.gather(*waits), TIMEOUT)
        wall = time.perf_counter() - began
        latencies = sorted(r[0] * 1000 for r in results)
        statuses: dict[str, int] = {}
        for _, status in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        return {
            "statuses": statuses,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": latencies[-1],
            "min_ms": latencies[0],
            "wall_ms": wall * 1000,
        }

    cold = await burst()
    await asyncio.sleep(0.2)  # let the server settle (idle pooled connections, flushed log)
    again = await burst()
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return {"n": n, **cold, **{f"warm_{k}": v for k, v in again.items()}}


def runner() -> Callable[[Coroutine[Any, Any, dict[str, object]]], dict[str, object]]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--client", required=True)
    parser.add_argument("--path", default="/polygon/v1/quote")
    args = parser.parse_args()
    print(json.dumps(runner()(run(args.port, args.n, args.client, args.path))))
