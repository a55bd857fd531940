"""Fire N simultaneous first requests for one uncached client at the sidecar; print JSON.

    python bench/support/burst.py --port P --n 500 --client cold-1 --path /polygon/v1/quote

Connections are opened (in batches, under the listen backlog) and warmed with a
request to an unknown upstream (a 404 that never touches the secret store) so the
measured latency is the request itself, not a storm of TCP handshakes. Then every
connection sends the real request at once; each latency runs from its write to the
last byte of its answer. Raw asyncio streams keep the client cheap.

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

BATCH = 64
TIMEOUT = 30.0


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


def request(path: str, client: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: {client}\r\n"
        "User-Agent: bench-burst\r\n\r\n"
    ).encode()


async def run(port: int, n: int, client: str, path: str) -> dict[str, object]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    warm = request("/__no_such_upstream__/warm", client)
    for start in range(0, n, BATCH):
        batch = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(min(BATCH, n - start)))
        )
        for _reader, writer in batch:
            writer.write(warm)
        await asyncio.gather(*(read_response(reader) for reader, _ in batch))
        conns.extend(batch)
    real = request(path, client)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[float, int]:
        started = time.perf_counter()
        writer.write(real)
        status = await read_response(reader)
        return time.perf_counter() - started, status

    async def burst() -> dict[str, object]:
        began = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one(r, w) for r, w in conns)), TIMEOUT)
        wall = time.perf_counter() - began
        latencies = sorted(r[0] * 1000 for r in results)
        statuses: dict[str, int] = {}
        for _, status in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1

        def pct(p: float) -> float:
            return latencies[max(0, min(len(latencies), math.ceil(p / 100 * len(latencies))) - 1)]  # nearest rank

        return {
            "statuses": statuses,
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "max_ms": latencies[-1],
            "min_ms": latencies[0],
            "wall_ms": wall * 1000,
        }

    cold = await burst()
    await asyncio.sleep(0.2)  # let the sidecar settle (idle pooled connections, flushed log)
    warm = await burst()
    for _reader, writer in conns:
        writer.close()
    return {"n": n, **cold, **{f"warm_{k}": v for k, v in warm.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--client", required=True)
    parser.add_argument("--path", default="/polygon/v1/quote")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.port, args.n, args.client, args.path))))
