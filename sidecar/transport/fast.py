"""A lean HTTP/1.1 client for the common request: keep-alive pool, one write, C parser.

Profiling (bench/RESULTS.md) put aiohttp's ClientSession at about 100 µs of CPU
per proxied request, more than the sidecar's whole budget. Most of that is
generality the sidecar does not use (cookies, redirects, auth, tracing, proxies,
per-request timeouts and URL objects). This client does one thing: send a
request whose head and (already buffered) body are known, on a pooled
connection, in a single write, and parse the answer with llhttp (httptools).

It handles only what it can do completely; ``Upstream._pick`` leaves aiohttp
(``transport.aio``) the rest (HEAD, streamed request bodies). Guarantees kept:

- the address guard: names are resolved here, forbidden addresses dropped, and
  the connection goes to an address that passed;
- a connection returns to the pool only after a complete response on a
  keep-alive exchange; anything odd (parse error, early close, a half-read body)
  closes it, so a malformed answer cannot desync the next request;
- a request that found its pooled connection closed by the upstream before any
  byte of the answer is retried once on a fresh connection;
- a connection serves one client only (the pool is partitioned by client), so even
  an answer the checks above cannot tell from a real one (extra bytes arriving just
  after the next request was written) can only reach the client that caused it.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import DestinationNotAllowed, SidecarError, UpstreamBodyError, UpstreamUnreachable
from sidecar.net import Lookup, ascii_digits, forbidden_destination, lookup, resolve_allowed
from sidecar.transport import failures
from sidecar.transport.base import CLIENT_LIMIT as BASE_CLIENT_LIMIT
from sidecar.transport.base import DNS_TTL_SECONDS, KEEPALIVE_SECONDS, POOL_LIMIT, receive_buffer

#: Limits on an answer's head, as aiohttp's client has (one field, the whole head).
MAX_FIELD_BYTES = 16 * 1024
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})
#: Bytes of response body buffered before reading from the upstream pauses.
HIGH_WATER = 256 * 1024
#: Open connections per upstream (busy and idle), the aiohttp connector's limit too; a
#: request beyond it waits for one to come back (bounded by timeout_seconds).
MAX_CONNECTIONS = POOL_LIMIT
#: Open connections per upstream for one client (see transport.base.CLIENT_LIMIT).
CLIENT_LIMIT = BASE_CLIENT_LIMIT
#: How long an idle pooled connection is kept (aiohttp's keep-alive too). Every idle
#: connection is kept, up to MAX_CONNECTIONS, as aiohttp's connector and Envoy keep them:
#: with a cap of 64, every burst closed the connections it had opened and the next burst
#: opened them again (a 500-request burst: 192 connects and closes; its p99 fell from
#: 57-72 to 44-50 ms when they were kept). An idle connection costs a socket and a few KiB
#: (tracemalloc: 7.8 KiB for both ends of a loopback pair together).
IDLE_SECONDS = KEEPALIVE_SECONDS
#: Connections being warmed at once (ahead of requests waiting for their key).
MAX_WARMING = 64


class _EarlyClose(Exception):
    """The pooled connection was closed before any byte of the answer: safe to retry."""


def time_out(waiter: asyncio.Future[None]) -> None:
    """A plain timer's end: the wait on ``waiter`` raises TimeoutError (no byte of a body for the
    read timeout here; the app reading nothing for the write timeout in the lean server)."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class FastResponse:
    """The answer: status, headers and a body read with ``readany`` (aiohttp's surface)."""

    __slots__ = (
        "_buffered", "_chunks", "_conn", "_done", "_error", "_read_timeout", "_waiter", "content_length",
        "headers", "reason", "status",
    )

    def __init__(self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str], timeout: float) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and ascii_digits(length) else None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read_timeout = timeout

    @property
    def content(self) -> FastResponse:
        return self

    def at_eof(self) -> bool:
        """Every byte of the body has arrived cleanly and been read (aiohttp's StreamReader has it too)."""
        return self._done and self._error is None and not self._chunks

    def ready(self) -> bool:
        """A readany() now would not wait: body bytes are here, or the body has ended."""
        return bool(self._chunks) or self._done

    # ---- fed by the connection

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- read by the proxy

    async def readany(self) -> bytes:
        """The next piece of body; b"" at the end; raises UpstreamBodyError if it broke off."""
        while not self._chunks:
            if self._done:
                if self._error is not None:
                    raise UpstreamBodyError("the upstream response body was cut off") from None
                return b""
            # A future and a plain timer: asyncio.timeout and get_running_loop() (a getpid()
            # syscall) would cost several µs for every wait on a body that comes in pieces.
            loop = self._conn.pool.loop if self._conn is not None else asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(self._read_timeout, time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the exchange was clean."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(reusable=self.at_eof())

    def close(self) -> None:
        """Drop the answer and its connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(reusable=False)


class _Connection(asyncio.BufferedProtocol):
    """One upstream connection: writes a request, parses one answer at a time.

    Reads land in the thread's receive buffer (``transport.base.receive_buffer``);
    llhttp parses them there, and the head and body pieces it hands back are copies.
    """

    def __init__(self, pool: FastPool, share: _Share) -> None:
        self.pool = pool
        self.share = share  # the one client this connection serves
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = False  # part of the pool's open-connection count
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._head_waiter: asyncio.Future[FastResponse] | None = None
        self._response: FastResponse | None = None
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._reason = b""
        self._got_bytes = False
        self._complete = False
        self._keep_alive = False
        self._paused = False
        self._delimited_by_close = False
        self._head_bytes = 0
        self._failed = False
        self._expecting = False  # an exchange is waiting for (the rest of) its answer
        self._received = receive_buffer()

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        parser = self._parser
        if self._failed or parser is None:
            return
        if not self._expecting and self._response is None:
            # Bytes nobody asked for on an idle pooled connection: a late or smuggled
            # answer that would be read as the next request's. The connection is dropped.
            self.abort()
            return
        self._got_bytes = True
        try:
            # llhttp reads the receive buffer in place; what it hands back are copies.
            parser.feed_data(self._received[:nbytes])
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamUnreachable("The upstream switched protocols.", reason="protocol"))
        except httptools.HttpParserError:
            self._fail(failures.malformed())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self._response
        if response is not None and not self._complete:
            if self._delimited_by_close and exc is None:
                response._finish()  # a body that ends with the connection (no length, not chunked)
            else:
                response._finish(UpstreamBodyError("connection closed mid-body"))
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            if not self._got_bytes:
                waiter.set_exception(_EarlyClose())
            else:
                waiter.set_exception(UpstreamUnreachable("The upstream closed the connection.", reason="protocol"))
        # Break the reference cycles (protocol <-> transport, protocol -> parser -> its bound
        # callbacks -> protocol): a closed connection is then freed by reference counting at
        # once instead of waiting for the cyclic collector. A burst closes hundreds of them,
        # and the full collection they invite took ~30 ms with boto3's objects in the heap.
        self.transport = None
        self._parser = None

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if not self._expecting:
            # A second answer after the one this exchange asked for (a response smuggled
            # behind a 204 or HEAD, say): never let it pair with a later request.
            self._fail(UpstreamUnreachable("The upstream sent an answer nobody asked for.", reason="protocol"))
        self._reason = b""
        self._head_bytes = 0

    def on_status(self, status: bytes) -> None:
        # Called again for each piece when the status line spans reads: kept whole (the
        # proxy scrubs the key from it before anything shortens it).
        self._reason += status
        self._head_bytes += len(status)
        if len(self._reason) > MAX_FIELD_BYTES:
            self._fail(UpstreamUnreachable("The upstream answered with an oversized head.", reason="protocol"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._failed:
            return
        self._head_bytes += len(name) + len(value)
        if len(value) > MAX_FIELD_BYTES or self._head_bytes > MAX_HEAD_BYTES or len(self._headers) >= MAX_HEADERS:
            self._fail(UpstreamUnreachable("The upstream answered with an oversized head.", reason="protocol"))
            return
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if self._failed or parser is None:
            return
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                # Upgrade is never forwarded, so a switch is unsolicited.
                self._fail(UpstreamUnreachable("The upstream switched protocols.", reason="protocol"))
                return
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._headers = CIMultiDict()
            return
        headers, self._headers = self._headers, CIMultiDict()
        self._keep_alive = bool(parser.should_keep_alive())
        self._delimited_by_close = (
            "Content-Length" not in headers
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
        )
        response = FastResponse(self, status, self._reason.decode("latin-1"), headers, self.pool.timeout)
        self._response = response
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._failed:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._response is None or self._failed:  # the end of an interim answer
            return
        self._complete = True
        self._expecting = False
        self._response._finish()

    # ---- used by the pool and the response

    def _fail(self, error: UpstreamUnreachable) -> None:
        self._failed = True
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self._response is not None:
            self._response._finish(UpstreamBodyError("malformed response body"))
        self.abort()

    async def exchange(self, request: bytes, deadline: float) -> FastResponse:
        """Send one request; wait for the whole head of its answer until ``deadline`` (loop time).

        A plain timer, not ``asyncio.timeout``: that context manager costs several
        microseconds a request (a Timeout object, the current task, uncancel).
        """
        transport = self.transport
        if transport is None:  # closed since it was pooled (connection_lost drops it): one fresh try
            raise _EarlyClose()
        self._response = None
        self._complete = False
        self._got_bytes = False
        self._expecting = True
        loop = self.pool.loop
        waiter: asyncio.Future[FastResponse] = loop.create_future()
        self._head_waiter = waiter
        transport.write(request)
        timer = loop.call_at(deadline, self._head_timeout)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._head_waiter = None

    def _head_timeout(self) -> None:
        """The answer's head did not arrive in time: the exchange fails, the connection goes."""
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(failures.head_timeout())
        self.abort()

    def finished(self, reusable: bool) -> None:
        self._response = None
        if reusable and self._complete and self._keep_alive and not self.closed:
            self.pool.give_back(self)
        else:
            self.abort()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Share:
    """One client's share of an upstream's pool: its idle connections and its counts.

    A connection belongs to the share it was opened for and never serves another
    client: an upstream that answers twice, or an app that smuggles a second request
    through a lenient upstream parser, can then only ever shift answers within one
    client's own traffic, never hand one client's answer (or the key echoed in it) to
    another. A share exists while it has connections, warms or requests waiting, so
    thousands of clients cost nothing once their connections have gone.
    """

    __slots__ = ("client", "idle", "key_waits", "open", "waiting", "warm_credits", "warming")

    def __init__(self, client: str) -> None:
        self.client = client
        self.idle: list[_Connection] = []  # oldest first; the newest is taken first
        self.open = 0  # connections counted against CLIENT_LIMIT (connecting, busy, idle)
        self.warming = 0  # warms running for this client
        self.waiting = 0  # requests waiting in the pool's queue
        self.key_waits = 0  # requests waiting for this client's key from the store
        self.warm_credits = 0  # warms still allowed: one per request that started waiting

    def unused(self) -> bool:
        """Nothing left in it (an idle connection is counted in ``open`` too)."""
        return not (self.open or self.warming or self.waiting or self.key_waits)


class FastPool:
    """Keep-alive connections to one upstream origin, partitioned by client, checked by the address guard (Transport).

    At most MAX_CONNECTIONS are open at once for the upstream and at most CLIENT_LIMIT
    of them for one client, so one client cannot hold every connection while others
    wait. When the pool is full, a client that has no idle connection of its own
    closes the longest-idle connection of another client and opens its own.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        allow_private: bool,
        timeout: float,
        host_header: str,
        dial: tuple[str, int] | None = None,
        refusal: Callable[[], DestinationNotAllowed] = forbidden_destination,
        lookup: Lookup = lookup,
    ) -> None:
        self.host = host  # the TLS server name and the name certificates are checked against
        self.port = port
        #: what is resolved (by the address guard) and connected to: ``dial`` (an upstream's
        #: connect_to) when set, else host and port
        self.dial_host, self.dial_port = dial or (host, port)
        self.ssl_context = ssl_context
        self.allow_private = allow_private
        #: the forbidden_address refusal naming the opt-in (the upstream's allow_private)
        self.refusal = refusal
        #: how the dial host is resolved (net.lookup; a test answers names itself)
        self.lookup = lookup
        self.timeout = timeout
        self.host_line = f"Host: {host_header}\r\n".encode("ascii")
        # Kept: asyncio.get_running_loop() costs a getpid() syscall on every call (CPython 3.11).
        self.loop = asyncio.get_running_loop()
        self._shares: dict[str, _Share] = {}
        #: every idle connection, longest idle first: for expiry and for eviction
        self._idle: OrderedDict[_Connection, None] = OrderedDict()
        self._addresses: list[str] = []
        self._resolved_at = -float(DNS_TTL_SECONDS)
        self._closed = False
        self._open = 0  # connections counted against MAX_CONNECTIONS (connecting, busy, idle)
        self._waiters: deque[tuple[_Share, asyncio.Future[None]]] = deque()
        self._warming: set[asyncio.Task[bool]] = set()

    # ---- observed by tests and the admin side

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def warming(self) -> int:
        return len(self._warming)

    def client_connections(self, client: str) -> int:
        share = self._shares.get(client)
        return 0 if share is None else share.open

    # ---- requests

    async def start(self) -> None:
        """Nothing to start: connections open on demand (the pool is built on a running loop)."""

    async def send(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None, client: str
    ) -> FastResponse:
        """Send ``method target`` with ``headers`` and ``body`` for ``client``; return the answer's head."""
        head = [f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape"), self.host_line]
        for name, value in headers.items():
            if name.lower() in _FRAMING:
                continue  # this client frames the body itself
            head.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
        if body is not None:
            head.append(f"Content-Length: {len(body)}\r\n\r\n".encode("ascii"))
            head.append(body)
        elif method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: 0\r\n\r\n")
        else:
            head.append(b"\r\n")
        data = b"".join(head)
        # One budget, timeout_seconds, for waiting for a connection, connecting and the
        # whole head of the answer, as on the aiohttp path: not a full one for each step.
        deadline = self.loop.time() + self.timeout
        share = self._shares.get(client)
        if share is None:
            share = self._shares[client] = _Share(client)
        conn = self._take_idle(share)
        if conn is None and self._must_wait(share, share.waiting):
            async with asyncio.timeout_at(deadline):  # a TimeoutError: translated by transport.failures
                conn = await self._wait_for_slot(share)
        if conn is not None:
            try:
                return await conn.exchange(data, deadline)
            except _EarlyClose:
                pass  # the upstream had closed the idle connection: one fresh try
            except BaseException:
                conn.abort()  # cancelled or failed mid-exchange: the connection is in an unknown state
                raise
        conn = await self._connect(share, deadline)
        try:
            return await conn.exchange(data, deadline)
        except _EarlyClose:
            raise UpstreamUnreachable("The upstream closed the connection.", reason="protocol") from None
        except BaseException:
            conn.abort()
            raise

    def _room(self, share: _Share) -> bool:
        """May ``share`` open a connection now (closing another client's idle one if the pool is full)?"""
        return share.open < CLIENT_LIMIT and (self._open < MAX_CONNECTIONS or bool(self._idle))

    def _must_wait(self, share: _Share, ahead: int) -> bool:
        """Must a request of ``share`` with no idle connection of its own, ``ahead`` of its
        requests queued before it, wait? Yes when a connection being warmed for the client
        is on its way that none of those is waiting for, or when the client's share or the
        pool is full."""
        return ahead < share.warming or not self._room(share)

    def _may_go(self, share: _Share) -> bool:
        """Would a request of ``share`` waiting in the queue get a connection if woken now?"""
        return bool(share.idle) or not self._must_wait(share, share.waiting - 1)

    async def _wait_for_slot(self, share: _Share) -> _Connection | None:
        """Wait for a connection of this client to be given back or warmed (returned), or for room (None)."""
        conn = None
        while conn is None and self._must_wait(share, share.waiting):
            waiter = self.loop.create_future()
            self._waiters.append((share, waiter))
            share.waiting += 1
            try:
                await waiter
            except BaseException:
                share.waiting -= 1
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: pass the turn on
                else:
                    waiter.cancel()
                self._drop_if_unused(share)
                raise
            share.waiting -= 1
            conn = self._take_idle(share)
        return conn

    def _wake_one(self) -> None:
        """Wake the longest-waiting request that can now go on (its client's share permitting)."""
        waiters = self._waiters
        while waiters and waiters[0][1].done():
            waiters.popleft()  # cancelled while waiting
        for index, (share, waiter) in enumerate(waiters):
            if not waiter.done() and self._may_go(share):
                del waiters[index]
                waiter.set_result(None)
                return

    def key_wait(self, client: str, delta: int) -> None:
        """A request of ``client`` starts (+1) or stops (-1) waiting for its key.

        While requests wait, the pool opens connections for them (TCP and TLS), so the
        handshakes overlap the store call instead of following it: a cold call costs
        max(store, connect) rather than their sum, and a burst of 500 requests waiting
        for one key finds its connections open when it comes. It warms until idle and
        warming connections of that client cover its requests waiting, at most
        MAX_WARMING at once and none beyond the pool's or the client's limit. Each
        request that starts waiting allows one warm, so an upstream that drops
        connections at once is not reconnected in a loop. Warming stops when the waits
        end, whether the key came or the lookup failed (a caller with no key never takes
        a connection), and after a failed warm until the next request starts waiting;
        the requests themselves meet and report the failure.
        """
        share = self._shares.get(client)
        if share is None:
            if delta <= 0:
                return
            share = self._shares[client] = _Share(client)
        share.key_waits = max(0, share.key_waits + delta)
        if delta > 0:
            share.warm_credits = min(share.warm_credits + delta, CLIENT_LIMIT)
            self._top_up(share)
        elif share.key_waits == 0:
            share.warm_credits = 0
            self._drop_if_unused(share)

    def _top_up(self, share: _Share) -> None:
        """Start one more warm if the client's requests waiting for a key outnumber its idle and warming connections."""
        if (
            self._closed
            or share.warm_credits <= 0
            or len(self._warming) >= MAX_WARMING
            or self._open + len(self._warming) >= MAX_CONNECTIONS
            or share.open + share.warming >= CLIENT_LIMIT
        ):
            return
        self._prune(time.monotonic())
        if len(share.idle) + share.warming >= share.key_waits:
            return
        share.warm_credits -= 1
        share.warming += 1
        task = self.loop.create_task(self._warm_one(share))
        self._warming.add(task)
        task.add_done_callback(functools.partial(self._warmed, share))

    def _warmed(self, share: _Share, task: asyncio.Task[bool]) -> None:
        self._warming.discard(task)
        share.warming -= 1
        if task.cancelled() or task.exception() is not None or not task.result():
            # No connection came of it: a request that waited for this one opens its own.
            # (One that came was handed over by give_back, which woke that request.)
            self._wake_one()
        self._top_up(share)  # the next one, while requests still wait for their key
        self._drop_if_unused(share)

    async def _warm_one(self, share: _Share) -> bool:
        """Open a connection for ``share`` and pool it; False if the connect failed."""
        try:
            conn = await self._connect(share, self.loop.time() + self.timeout)
        except (SidecarError, OSError):
            share.warm_credits = 0  # the upstream is failing: no connect storm; the requests report it
            return False
        self.give_back(conn)
        return True

    def _prune(self, now: float) -> None:
        """Close idle connections past IDLE_SECONDS (the longest idle are first).

        Run before idle connections are used or counted, so an expired one is neither
        handed to a request nor counted as ready for the requests waiting for a key.
        """
        idle = self._idle
        while idle:
            conn = next(iter(idle))
            if now - conn.idle_since < IDLE_SECONDS:
                return
            self._release(conn)
            conn.abort()

    def _take_idle(self, share: _Share) -> _Connection | None:
        """The client's most recently used idle connection that is still open, if any."""
        idle = share.idle
        if not idle:
            return None
        self._prune(time.monotonic())
        while idle:
            conn = idle.pop()
            self._idle.pop(conn, None)
            if not conn.closed:  # aborted (an unsolicited answer, say), not yet forgotten
                return conn
        return None

    def give_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        conn.share.idle.append(conn)
        self._idle[conn] = None
        self._wake_one()

    def _release(self, conn: _Connection) -> None:
        """Take ``conn`` out of the idle lists and the counts (it is closing); wakes nobody."""
        share = conn.share
        if conn in self._idle:
            del self._idle[conn]
            share.idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self._open -= 1
            share.open -= 1
            self._drop_if_unused(share)

    def _drop_if_unused(self, share: _Share) -> None:
        """Forget a share with nothing left in it, so clients that have gone cost nothing."""
        if share.unused() and self._shares.get(share.client) is share:
            del self._shares[share.client]

    def forget(self, conn: _Connection) -> None:
        """A connection closed: it leaves the idle lists and the counts."""
        counted = conn.counted
        self._release(conn)
        if counted:
            self._wake_one()

    async def _resolve(self) -> list[str]:
        """The guard's allowed addresses for the dial host, reused for DNS_TTL_SECONDS."""
        now = time.monotonic()
        if not self._addresses or now - self._resolved_at >= DNS_TTL_SECONDS:
            self._addresses = await resolve_allowed(
                self.dial_host, self.dial_port, self.allow_private, self.refusal, lookup=self.lookup
            )
            self._resolved_at = now
        return self._addresses

    async def _connect(self, share: _Share, deadline: float) -> _Connection:
        """Resolve and connect (TLS handshake included) for ``share`` before ``deadline`` (loop time)."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self._open_connection(share)
        except TimeoutError:
            raise failures.connect_timeout() from None

    async def _open_connection(self, share: _Share) -> _Connection:
        loop = self.loop
        if self._open >= MAX_CONNECTIONS and self._idle:
            # The pool is full: the connection idle longest (another client's: this one
            # had none to take) makes room.
            oldest = next(iter(self._idle))
            self._release(oldest)
            oldest.abort()
        # A request whose share was dropped meanwhile (its last connection closed under
        # it) brings it back rather than counting into a share nobody else sees.
        self._shares.setdefault(share.client, share)
        # Counted from the start, name resolution included, so concurrent connects cannot
        # overshoot the limits; the connection carries the count once it is made.
        self._open += 1
        share.open += 1
        counted_here = True
        try:
            addresses = await self._resolve()
            last: BaseException | None = None
            for address in addresses:
                conn = _Connection(self, share)
                try:
                    await loop.create_connection(
                        lambda conn=conn: conn,
                        address,
                        self.dial_port,
                        ssl=self.ssl_context,
                        server_hostname=self.host if self.ssl_context is not None else None,
                    )
                except ssl.SSLError:
                    raise failures.tls_failed() from None
                except OSError as exc:
                    last = exc
                    continue
                if conn.closed:  # lost in the moment between connecting and here
                    last = ConnectionError("closed at once")
                    continue
                conn.counted = True
                counted_here = False
                return conn
            raise failures.connect_failed() from last
        finally:
            if counted_here:
                self._open -= 1
                share.open -= 1
                self._drop_if_unused(share)
                self._wake_one()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._warming):
            task.cancel()
        for conn in list(self._idle):
            self._release(conn)
            conn.abort()
