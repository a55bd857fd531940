"""A lean HTTP/1.1 server for the common request; anything else goes to aiohttp's.

The benchmark (bench/RESULTS.md) put aiohttp's server machinery (RequestHandler,
BaseRequest, StreamResponse) at about 25 µs of CPU per request, a third of the
sidecar's whole budget. This protocol serves what the sidecar sees nearly all the
time, and nothing else:

- HTTP/1.1, method GET, POST, PUT, PATCH, DELETE or OPTIONS, exactly one Host;
- an ASCII head of at most MAX_HEAD bytes, parsed by llhttp (httptools, the same
  parser aiohttp's C extension uses) with CRLF line ends;
- no body, or a Content-Length body of at most REPLAY_BODY_LIMIT, buffered whole;
- no Transfer-Encoding, Expect or Upgrade.

The first request on a connection that is anything else (a parse error included)
is handed, with every byte from its first byte on, to an aiohttp
``RequestHandler``, which then owns the connection for good; so every odd case
keeps aiohttp's behaviour and the adversarial suite's guarantees. The answer to a
fast request is written by hand: one write of head and body when the upstream's
answer is already whole, otherwise the body streamed with back-pressure
(Content-Length kept, or chunked).

Timeouts are checked by one sweep a second over all connections, not a timer per
request: a head or body that does not complete within HEAD_TIMEOUT and a kept-alive
connection idle for KEEPALIVE_SECONDS are closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict

from sidecar.exchange import NO_BODY_STATUS, REPLAY_BODY_LIMIT, STREAM_BROKEN, Exchange, ResponseHead
from sidecar.pipeline import DataPlane
from sidecar.refusal import error_bytes
from sidecar.transport.base import receive_buffer
from sidecar.transport.fast import FastResponse, time_out

if TYPE_CHECKING:
    from sidecar.errors import SidecarError
    from sidecar.transport.base import UpstreamAnswer

log = logging.getLogger("sidecar.fastserver")  # the name operators filter on, kept from before the move

#: Largest request head served here; a bigger one goes to aiohttp (which allows 32 KiB a field).
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
#: A request head (or its body) must be complete this long after its first byte.
HEAD_TIMEOUT = 30.0
#: An idle kept-alive connection is closed after this long (aiohttp's server default).
KEEPALIVE_SECONDS = 3630.0
#: Bytes of pipelined requests buffered while one is being answered; reading pauses beyond.
MAX_PENDING = MAX_HEAD + REPLAY_BODY_LIMIT
_CONNECT = b"CONNECT "
FAST_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS_LINES: dict[tuple[int, str], bytes] = {}
_date: list[object] = [-1, b""]


def _date_line(now: float) -> bytes:
    """``Date: <IMF-fixdate>\\r\\n``, formatted once a second."""
    whole = int(now)
    if whole != _date[0]:
        _date[0] = whole
        _date[1] = b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(whole)).encode() + b"\r\n"
    return cast(bytes, _date[1])


def _status_line(status: int, reason: str | None) -> bytes:
    key = (status, reason or "")
    line = _STATUS_LINES.get(key)
    if line is None:
        line = f"HTTP/1.1 {status} {reason or ''}\r\n".encode("latin-1", "replace")
        if len(_STATUS_LINES) < 512:  # bounded: statuses x reason phrases seen
            _STATUS_LINES[key] = line
    return line


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")  # the lean client decodes latin-1: bytes round-trip
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` in one copy, not two (a bytearray slice is itself a copy).

    For a body: 1 MiB took 57 µs instead of 668 (timeit); a small head is cheaper sliced.
    The view is released before returning: the buffer is resized right after, which an
    exported view would forbid.
    """
    with memoryview(buf) as view:
        return bytes(view[start:end])


class _Handover(Exception):
    """This request is not one for the fast path: aiohttp takes the connection."""


class _HeadParser:
    """llhttp callbacks collecting one request head."""

    __slots__ = (
        "complete", "content_length", "head_end", "headers", "hosts", "keep_alive", "method", "parser", "url",
    )

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.method = ""
        self.head_end = 0
        self.keep_alive = False
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.content_length = 0
        self.hosts = 0  # llhttp lets none or several through; aiohttp's parsers refuse both
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADERS:
            raise _Handover
        lower = name.lower()
        if lower in (b"transfer-encoding", b"expect", b"upgrade"):
            raise _Handover
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        if lower == b"content-length":
            self.content_length = int(value)  # llhttp checked: digits, no duplicates
            if self.content_length > REPLAY_BODY_LIMIT:
                raise _Handover
        elif lower == b"host":
            self.hosts += 1
        self.headers.append((key, text))

    def on_headers_complete(self) -> None:
        # Read here: once the message is complete llhttp resets its connection flags.
        parser = self.parser
        assert parser is not None
        if self.hosts != 1 or parser.get_http_version() != "1.1" or parser.should_upgrade():
            raise _Handover
        self.keep_alive = bool(parser.should_keep_alive())
        self.complete = True


class FastExchange(Exchange):
    """A request the fast server parsed and buffered whole, and the connection it came on."""

    __slots__ = ("conn", "keep_alive", "started")  # the rest are Exchange's

    def __init__(
        self, conn: FastConnection, method: str, raw_path: str, headers: CIMultiDict[str], body: bytes | None,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.origin = None
        self.tunnel_client_id = None
        self.refusal = None
        self.body_ready = True
        self.body = body
        self.keep_alive = keep_alive
        self.started = False  # a byte of the answer went out

    def outgoing(self) -> CIMultiDict[str]:
        # The fast server's own copy, made for this request: edited in place.
        return cast(CIMultiDict[str], self.headers)

    def _closing(self) -> bool:
        return not self.keep_alive or self.conn.server.closing

    def refuse(self, err: SidecarError, phrase: str | None = None) -> None:
        """Write the contract's JSON error (``DataPlane`` decided its status, phrase and headers)."""
        if self.started:
            self.conn.abort()  # the answer had begun: the app must see it cut, not completed
            return
        close = self._closing()
        if close:
            self.keep_alive = False
        self.started = True
        self.conn.write(error_bytes(err, close=close, extra=_date_line(time.time()), phrase=phrase))

    async def relay(self, answer: UpstreamAnswer, head: ResponseHead) -> bool:
        """Send the upstream's answer back; False if either side broke off mid-body."""
        conn = self.conn
        lines = []
        date = True
        for name, value in head.headers:
            if date and len(name) == 4 and name.lower() == "date":
                date = False
            lines.append(f"{name}: {value}\r\n")
        parts = [_status_line(head.status, head.reason), _encode("".join(lines))]
        if date:
            parts.append(_date_line(time.time()))
        bodiless = head.status in NO_BODY_STATUS
        chunked = False
        if head.framed:
            parts.append(b"Content-Length: %d\r\n" % (head.length or 0))
        elif not bodiless:
            chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if self._closing():
            self.keep_alive = False
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        try:
            if bodiless:
                self.started = True
                conn.write(b"".join(parts))
            else:
                content = answer.content
                # The head goes out with the first piece of body when that is already here
                # (one write); otherwise at once: an event stream may stay quiet for a long
                # time after its head, and the app must not wait for its first event to see it.
                chunk: bytes | None = None
                if isinstance(content, FastResponse) and content.ready():
                    chunk = await content.readany()
                    if chunked and chunk:
                        parts.append(b"%x\r\n" % len(chunk))
                        parts.append(chunk)
                        parts.append(b"\r\n")
                    elif chunk:
                        parts.append(chunk)
                self.started = True
                conn.write(b"".join(parts))
                # Both clients say when the body is complete: no wait for an empty last read.
                while (chunk is None or chunk) and not content.at_eof():
                    if conn.paused:
                        await conn.drain(head.write_timeout)
                    chunk = await content.readany()
                    if not chunk:
                        break
                    conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    conn.write(b"0\r\n\r\n")
        except STREAM_BROKEN:
            # Either side broke mid-body: the app must see a cut response, never a clean
            # end, and the upstream connection must not go back to the pool half-read.
            answer.close()
            self.keep_alive = False
            conn.abort()
            return False
        except BaseException:
            answer.close()  # cancelled (the app hung up): never leave the upstream connection behind
            raise
        answer.release()
        return True


class FastConnection(asyncio.BufferedProtocol):
    """One app connection on the fast path; see the module docstring.

    Reads land in the thread's receive buffer (``transport.base.receive_buffer``)
    and are appended to this connection's own at once.
    """

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        # Grows in place: a body arriving in many small pieces must not be copied again
        # with every piece (a 1 MiB body in 1 KiB segments would copy ~500 MB).
        self.buffer = bytearray()
        self.waiting: _HeadParser | None = None  # a parsed head whose body is still arriving
        self.paused = False  # the app is not reading: writes wait in drain()
        self.reading_paused = False
        self.deadline = 0.0
        self.fresh = True  # nothing read yet: the connection could still be a CONNECT
        self.task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._received = receive_buffer()

    @property
    def busy(self) -> bool:
        """A request is being answered (its task runs)."""
        return self.task is not None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.deadline = time.monotonic() + HEAD_TIMEOUT

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out at once: the next read, on any connection, reuses the receive buffer.
        self.buffer += self._received[:nbytes]
        if self.fresh:
            head = self.buffer[:8]
            if _CONNECT.startswith(head) and len(head) < 8:
                return  # could still become a CONNECT
            self.fresh = False
            if head == _CONNECT:
                self._hand(self.server.hand_to_connect)
                return
        if self.busy:
            if len(self.buffer) > MAX_PENDING and not self.reading_paused and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the app hung up: its upstream call is abandoned with it
        self.transport = None
        self._wake_drain()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drain()

    # ---- requests

    def _next(self) -> None:
        """Start the request at the front of the buffer if it is complete and fast-path material."""
        buf = self.buffer
        if not buf:
            return
        if self.server.closing:
            self.abort()
            return
        fields = self.waiting
        if fields is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD or b"\n\n" in buf or not buf.isascii():
                    self._handover()
                else:
                    self._arm_head_deadline()
                return
            head_end = end + 4
            head = buf[:head_end]  # one copy; llhttp and isascii() take a bytearray as it is
            if head_end > MAX_HEAD or not head.isascii():
                self._handover()
                return
            fields = _HeadParser()
            parser = fields.parser
            assert parser is not None
            try:
                parser.feed_data(head)
            except (httptools.HttpParserError, ValueError):
                self._handover()
                return
            finally:
                fields.parser = None
            if not fields.complete:
                self._handover()
                return
            fields.method = parser.get_method().decode("ascii")
            if fields.method not in FAST_METHODS:
                self._handover()
                return
            fields.head_end = head_end
        length = fields.content_length
        head_end = fields.head_end
        if len(buf) < head_end + length:
            self.waiting = fields  # parsed once; later pieces only count bytes
            self._arm_head_deadline()
            return  # the body is still arriving
        self.waiting = None
        body = _copy(buf, head_end, head_end + length) if length else None
        del buf[: head_end + length]
        self.deadline = 0.0
        exchange = FastExchange(
            self, fields.method, fields.url.decode("ascii"), CIMultiDict(fields.headers), body,
            fields.keep_alive,
        )
        task = self.server.loop.create_task(self.server.plane.serve(exchange))
        self.task = task
        task.add_done_callback(lambda _: self._done(exchange))

    def _arm_head_deadline(self) -> None:
        """A request has begun: it must be complete within HEAD_TIMEOUT of its first byte."""
        limit = time.monotonic() + HEAD_TIMEOUT
        if self.deadline == 0.0 or self.deadline > limit:
            self.deadline = limit

    def _done(self, exchange: FastExchange) -> None:
        self.task = None
        if self.transport is None:
            return
        if not exchange.keep_alive or self.server.closing or not exchange.started:
            self.transport.close()
            return
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.deadline = 0.0
        if self.buffer:
            self._next()
        if not self.busy and self.transport is not None and self.deadline == 0.0:
            self.deadline = time.monotonic() + KEEPALIVE_SECONDS

    def _handover(self) -> None:
        """aiohttp's server takes this connection, with every byte of the current request."""
        self._hand(self.server.hand_to_http)

    def _hand(self, to: Callable[[asyncio.Transport, bytes], None]) -> None:
        transport = self.transport
        if transport is None:
            return
        self.server.connections.discard(self)
        self.transport = None
        if self.reading_paused:
            transport.resume_reading()
        data = bytes(self.buffer)
        self.buffer.clear()
        self.waiting = None
        to(transport, data)

    # ---- used by FastExchange

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self, patience: float) -> None:
        """Wait until the app reads again; TimeoutError if it reads nothing for ``patience`` seconds.

        A plain timer, not asyncio.timeout (several µs), as for the lean client's waits.
        """
        loop = self.server.loop
        while self.paused and self.transport is not None:
            waiter = self._drain = loop.create_future()
            timer = loop.call_later(patience, time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()

    def _wake_drain(self) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> None:
        if not self.busy and self.transport is not None:
            self.transport.close()


class FastServer:
    """Makes FastConnections; sweeps their timeouts; drains them."""

    def __init__(
        self,
        plane: DataPlane,
        hand_to_http: Callable[[asyncio.Transport, bytes], None],
        hand_to_connect: Callable[[asyncio.Transport, bytes], None],
    ) -> None:
        # Kept: asyncio.get_running_loop() costs a getpid() syscall on every call (CPython 3.11).
        self.loop = asyncio.get_running_loop()
        self.plane = plane
        self.hand_to_http = hand_to_http
        self.hand_to_connect = hand_to_connect
        self.connections: set[FastConnection] = set()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def protocol(self) -> FastConnection:
        """The listener's protocol factory: every new connection starts here."""
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(1.0, self._sweep)
        return FastConnection(self)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            if not conn.busy and conn.deadline and now >= conn.deadline and conn.transport is not None:
                conn.transport.close()
        self._sweeper = self.loop.call_later(1.0, self._sweep) if self.connections else None

    async def drain(self, grace: float) -> None:
        """Close idle connections now, busy ones after their answer; abort what is left at ``grace``."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_if_idle()
        busy = [conn.task for conn in self.connections if conn.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
