"""A hostile HTTP/1.1 upstream on 127.0.0.1: raw asyncio, writes exactly the bytes each path asks for.

The first path segment picks the misbehaviour (see ``BEHAVIOURS``); ``/ok/...``
answers a well-formed 200 whose body is the request target, so a test can check
that the answer it got belongs to the request it sent (no desync of a pooled
connection). Every wait is bounded so a stuck sidecar cannot keep it alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tests.support.raw_http import LOCAL, LoopThread, StreamServerMixin

#: Longest a misbehaviour holds a connection (silent, trickle): tests give up well before.
HOLD_SECONDS = 15.0
READ_TIMEOUT = 30.0
#: A pooled connection serves at most this many requests here.
MAX_REQUESTS_PER_CONNECTION = 1000


@dataclass
class Seen:
    target: str
    headers: list[tuple[str, str]]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@dataclass
class EvilUpstream(StreamServerMixin):
    thread_name = "evil-upstream"
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    _thread: LoopThread | None = None
    _server: asyncio.Server | None = None


    def targets(self) -> list[str]:
        return [s.target for s in self.seen]

    # ------------------------------------------------------------------ connection loop

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1] if " " in lines[0] else "/"
                headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                if length:
                    await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
                self.seen.append(Seen(target, headers))
                name = target.lstrip("/").split("/", 1)[0].split("?", 1)[0]
                behaviour = BEHAVIOURS.get(name, _ok)
                keep = await behaviour(self, target, reader, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError, OSError):
            pass
        finally:
            self.closed += 1
            with contextlib.suppress(Exception):
                writer.close()


Behaviour = Callable[[EvilUpstream, str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def _ok(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    # The path only: the query carries the injected key, and an echo of it is not what these tests are about.
    w.write(ok(target.partition("?")[0].encode()))
    return True


def _fixed(raw: bytes, keep: bool) -> Behaviour:
    async def send(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(raw)
        return keep

    return send


async def _hold(r: asyncio.StreamReader) -> None:
    """Wait until the sidecar gives up (closes) or HOLD_SECONDS pass."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await asyncio.wait_for(r.read(), HOLD_SECONDS)


async def _silent(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    await _hold(r)
    return False


async def _trickle_head(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """Slowloris towards the sidecar: one header byte every 0.3 s, never finishing the head."""
    w.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(int(HOLD_SECONDS / 0.3)):
        if w.is_closing():
            break
        w.write(b"a")
        try:
            await w.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.3)
    return False


async def _reset(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    sock = w.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()
    return False


async def _reset_mid_body(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await w.drain()
    await asyncio.sleep(0.05)
    return await _reset(up, target, r, w)


async def _half_close(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nhalf")
    await w.drain()
    w.write_eof()
    await _hold(r)
    return False


async def _unsolicited_101(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW-TUNNEL-BYTES")
    await w.drain()
    await _hold(r)
    return False


async def _echo_key(up: EvilUpstream, target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """Reflect the target (which carries the injected key) into response headers, names included."""
    query = target.partition("?")[2]
    t = target.encode("latin-1")
    value = query.partition("apiKey=")[2].partition("&")[0].encode("latin-1")
    extra = (
        b"X-Echo: " + t + b"\r\n"
        b"X-Param-" + value + b": 1\r\n"  # parameters echoed as header names
        b"X-Sidecar-Error: unknown_upstream\r\n"  # posing as a refusal by the sidecar
        b"Location: http://" + LOCAL.encode() + b":1/next?" + query.encode("latin-1") + b"\r\n"
        b"Set-Cookie: last=" + query.encode("latin-1") + b"; Path=/\r\n"
        b"Link: <" + t + b">; rel=next\r\n"
    )
    w.write(ok(b"reflected", extra))
    return True


BEHAVIOURS: dict[str, Behaviour] = {
    "ok": _ok,
    # header values with control characters a lenient parser might pass on
    "lf-in-header": _fixed(b"HTTP/1.1 200 OK\r\nX-Evil: a\nInjected: yes\r\nContent-Length: 2\r\n\r\nok", True),
    "cr-in-header": _fixed(b"HTTP/1.1 200 OK\r\nX-Evil: a\rInjected: yes\r\nContent-Length: 2\r\n\r\nok", True),
    "nul-in-header": _fixed(b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b\r\nContent-Length: 2\r\n\r\nok", True),
    "obs-fold": _fixed(b"HTTP/1.1 200 OK\r\nX-Evil: a\r\n folded: yes\r\nContent-Length: 2\r\n\r\nok", True),
    "space-before-colon": _fixed(b"HTTP/1.1 200 OK\r\nContent-Length : 40\r\nContent-Length: 2\r\n\r\nok", True),
    # framing lies
    "truncated-chunked": _fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", False),
    "bad-chunk-size": _fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", False),
    "chunk-overflow": _fixed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", False
    ),
    "short-body": _fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10, False),
    "long-body": _fixed(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
        True,
    ),
    "cl-and-te": _fixed(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
        True,
    ),
    "dup-cl": _fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhello" + b"y" * 25, True),
    "bad-cl": _fixed(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", True),
    # a header named hop-only on a second Connection line (RFC 9110 7.6.1)
    "connection-lines": _fixed(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: X-Upstream-Hop\r\nX-Upstream-Hop: 1\r\n"
        b"Content-Length: 2\r\n\r\nok",
        True,
    ),
    "body-after-204": _fixed(
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled", True
    ),
    # legal for a 304 (the length of the 200 it stands for), never for a 204; neither has a body
    "no-content-with-length": _fixed(b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", True),
    "not-modified-with-length": _fixed(
        b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1234\r\n\r\n", True
    ),
    "bad-status": _fixed(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok", True),
    "garbage-status": _fixed(b"HELLO THERE\r\n\r\n", False),
    "http09": _fixed(b"just some bytes, no status line at all", False),
    "status-999": _fixed(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok", True),
    "huge-header": _fixed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok", True),
    "many-headers": _fixed(
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(2000)) + b"Content-Length: 2\r\n\r\nok",
        True,
    ),
    "unsolicited-101": _unsolicited_101,
    "silent": _silent,
    "trickle-head": _trickle_head,
    "reset": _reset,
    "reset-mid-body": _reset_mid_body,
    "close": _fixed(b"", False),
    "half-close": _half_close,
    "echo-key": _echo_key,
}
