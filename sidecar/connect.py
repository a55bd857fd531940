"""The data-plane listener: HTTP goes to aiohttp's server, CONNECT is handled here.

aiohttp's server has no public way to take over a connection after CONNECT, so
the listener's protocol looks at the first bytes of each connection. A request
that does not start with ``CONNECT `` is handed, with those bytes, to an aiohttp
``RequestHandler`` and never looked at again. A CONNECT is handled here, as the
runtime's ``Routes.connect`` (routing.py) decides:

    passthrough_hosts entry ─▶ address guard ─▶ 200, plain byte tunnel (no injection)
    upstream host, mitm on  ─▶ 200, TLS with a minted leaf ─▶ aiohttp handler bound to that origin
    anything else           ─▶ 403 destination_not_allowed, before any connection is made
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Coroutine
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, cast

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict
from yarl import URL

from sidecar import metrics
from sidecar.aio_exchange import BAD_TRANSFER_ENCODING, UNPARSEABLE_TARGET, UNSUPPORTED_VERSION, serve_request
from sidecar.errors import (
    BadRequest,
    DestinationNotAllowed,
    SidecarError,
    UnsupportedHttpVersion,
)
from sidecar.net import HostPort, normalize_host, parse_host_port, resolve_allowed
from sidecar.record import FixedLine, Record
from sidecar.refusal import error_bytes, error_response
from sidecar.transport import failures

#: The lean server (sidecar/fastserver.py) takes plain HTTP connections and hands
#: aiohttp anything it does not serve itself; SIDECAR_SERVER=aiohttp gives aiohttp
#: every connection (a comparison and an escape hatch).
FAST_SERVER = os.environ.get("SIDECAR_SERVER", "fast") != "aiohttp" and find_spec("httptools") is not None

if TYPE_CHECKING:
    from sidecar.fastserver import FastServer
    from sidecar.mitm import CertificateAuthority
    from sidecar.proxy import DataPlane

log = logging.getLogger("sidecar.connect")

_CONNECT = b"CONNECT "
#: Largest CONNECT head accepted; a bigger one is refused.
MAX_CONNECT_HEAD = 16 * 1024
#: A new connection must say what it wants within this time.
FIRST_BYTES_TIMEOUT = 30.0
#: Connecting to a passthrough host, and the TLS handshake of an interception.
CONNECT_TIMEOUT = 10.0
#: A tunnel with no bytes either way for this long is closed.
TUNNEL_IDLE_SECONDS = 300.0
#: aiohttp's server (requests the lean server hands over: heads over 16 KiB or not
#: ASCII; intercepted TLS) closes a connection waiting this long for a request head,
#: idle or part-way through one. Its own default, 3630 s, let a head that never ends
#: hold up to 128 header lines of 32 KiB for an hour, before any identity check.
HTTP_WAIT_SECONDS = 30.0
#: llhttp's reason for a well-formed ``HTTP/d.d`` it does not know (1.2, 3.0): a 505, where
#: its other version errors ("Invalid major version", "Expected dot") are garbage, a 400.
LLHTTP_UNKNOWN_VERSION = "Invalid HTTP version"
_ROOT = URL.build(path="/", encoded=True)
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2
#: The access log's request line for a CONNECT (its path is the parsed authority, set on the
#: Record) and for a head aiohttp could not parse.
_CONNECT_LINE = FixedLine("CONNECT")
_UNPARSED = FixedLine("-")


def parse_authority(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of a CONNECT, normalised; BadRequest otherwise."""
    parsed = parse_host_port(target, last_colon=True, normalize=False)
    if isinstance(parsed, str) or "@" in parsed.host or "/" in parsed.host:
        raise BadRequest("CONNECT needs host:port.", reason="bad_authority")
    normal = normalize_host(parsed.host)
    if normal is None:
        raise BadRequest("CONNECT names an invalid host.", reason="bad_authority")
    return normal, parsed.port


def connect_head(head: bytes) -> tuple[str, CIMultiDict[str]]:
    """The authority a CONNECT head names and its headers, once the HTTP/1.1 rules hold for it
    (no parser but this reads it); raises.

    A request line of three parts ending in ``HTTP/d.d``, 1.0 or 1.1 (else 505); header lines
    ``name: value`` with a token for a name (no space before the colon, no folding: a line
    read one way here and another way by a client could hide an identity); and Host: one in
    HTTP/1.1, at most one in HTTP/1.0.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or _HTTP_VERSION.fullmatch(parts[2]) is None:
        raise BadRequest("Malformed CONNECT request line.", reason="bad_connect")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise UnsupportedHttpVersion(reason="http_version")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise BadRequest("Malformed CONNECT header line.", reason="bad_connect")
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    hosts = len(headers.getall("Host", ()))
    if hosts > 1 or (hosts == 0 and parts[2] == b"HTTP/1.1"):
        raise BadRequest("An HTTP/1.1 request carries exactly one Host header.", reason="host")
    return parts[1].decode("latin-1"), headers


def head_refusal(message: RawRequestMessage) -> str | None:
    """The mark (aio_exchange.py) for a head aiohttp's parsers accepted but the contract refuses.

    Both parsers take ``HTTP/2.0`` and ``HTTP/0.9`` in a request line (the pure-Python one
    any digit pair), and a Transfer-Encoding of ``gzip, chunked``, or one in HTTP/1.0; the
    pure-Python one ``chunked, chunked`` too. Host (none or several) they refuse themselves.
    """
    version = message.version
    if version != HttpVersion11 and version != HttpVersion10:
        return UNSUPPORTED_VERSION
    # Looked for before getall: aiohttp makes the request for a parse error from a message
    # whose headers are a plain (empty) dict.
    if hdrs.TRANSFER_ENCODING not in message.headers:
        return None
    codings = message.headers.getall(hdrs.TRANSFER_ENCODING)
    if (
        # RFC 9112 6.1: a Transfer-Encoding in HTTP/1.0 is faulty framing. "chunked" is
        # case-insensitive; .lower() folds some non-ASCII letters into ASCII ones, so ASCII first.
        version != HttpVersion11 or len(codings) != 1 or not codings[0].isascii()
        or codings[0].strip(" \t").lower() != "chunked"
    ):
        return BAD_TRANSFER_ENCODING
    return None


class _CaseSensitiveParser(HttpRequestParserPy):
    """aiohttp's pure-Python request parser, refusing a method that is not upper case.

    It upper-cases the method it read, so ``get`` would go upstream as ``GET`` with a key in
    it (llhttp, the lean server's and aiohttp's C parser, refuses ``get`` outright). Methods
    are case-sensitive (RFC 9110 9.1); every registered one is upper case.
    """

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        method = lines[0].partition(b" ")[0]
        if method != method.upper():
            raise BadHttpMethod(method.decode("latin-1"))
        return super().parse_message(lines)


def _passthrough_forbidden() -> DestinationNotAllowed:
    """A passthrough host that resolves only to guarded addresses: the operator listed it, so
    the opt-in is the right pointer (for an internal host; a public one resolving privately is not)."""
    return DestinationNotAllowed(
        "The passthrough host resolves only to private, loopback, link-local or reserved addresses; "
        "for an internal host, set forward_proxy.passthrough_allow_private: true.",
        reason="forbidden_address",
    )


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, with the contract's JSON error for requests it cannot parse.

    aiohttp answers a malformed request (bad framing, a header over the size limit)
    with a text body that quotes the offending line, which may hold a token.
    """

    front: Front
    #: In an intercepted tunnel: the client its CONNECT named, for every request inside it.
    tunnel_client_id: str | None = None

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        err: SidecarError = (
            BadRequest(reason="malformed") if 400 <= status < 500 else SidecarError(reason="internal_error")
        )
        reason = type(exc).__name__ if exc is not None else err.reason
        if isinstance(exc, BadStatusLine) and LLHTTP_UNKNOWN_VERSION in str(exc):
            # The pure-Python parser reads HTTP/1.2 as a version, and the router refuses it: the same 505.
            err = UnsupportedHttpVersion(reason="http_version")
            reason = err.reason
        metrics.count_refusal(err.code)
        rec = Record()
        rec.status = err.status
        rec.error = err.code
        rec.reason = reason
        # Never begun as a request: not in flight, no duration.
        self.front.plane.access_log.account(_UNPARSED, rec, 0.0, timed=False, inflight=False)
        response = error_response(err)
        response.force_close()
        return response


class _Server(web.Server):
    """Makes ``_RequestHandler``s (aiohttp's Server is the protocol factory)."""

    def __init__(self, front: Front, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.front = front
        # What RequestHandler takes; handler_cancellation is the Server's own setting.
        self.handler_kwargs = {k: v for k, v in kwargs.items() if k != "handler_cancellation"}

    def __call__(self) -> _RequestHandler:
        handler = _RequestHandler(self, loop=self.front.loop, **self.handler_kwargs)
        handler.front = self.front
        if type(handler._parser) is HttpRequestParserPy:
            # AIOHTTP_NO_EXTENSIONS (or no C extension): the parser aiohttp built, as it built
            # it, with the method check added (a subclass with no state of its own).
            handler._parser.__class__ = _CaseSensitiveParser
        return handler

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> BaseRequest:
        mark = head_refusal(message)
        if mark is not None:
            # Refused by the router, in HTTP/1.1 whatever the request line said, and the
            # connection closed after it: what follows a head like this is not to be read
            # as a next request.
            message = message._replace(path=mark, url=_ROOT, version=HttpVersion11, should_close=True)
        try:
            return super()._make_request(message, payload, protocol, writer, task)
        except (UnicodeError, ValueError):
            # A target aiohttp cannot turn into a URL (a host that fails IDNA): without
            # this the connection's task dies with no answer. The handler refuses the marker.
            marked = message._replace(path=UNPARSEABLE_TARGET, url=URL.build(path="/", encoded=True))
            return super()._make_request(marked, payload, protocol, writer, task)


class _Sniffer(asyncio.Protocol):
    """Reads just enough of a new connection to tell CONNECT from everything else."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.front.loop.call_later(FIRST_BYTES_TIMEOUT, self.transport.close)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        head = self.buffer[: len(_CONNECT)]
        if len(head) < len(_CONNECT) and _CONNECT.startswith(head):
            return  # could still become a CONNECT
        if not head.startswith(_CONNECT):
            self._cancel_timer()
            self.front.hand_to_http(self.transport, self.buffer)
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_CONNECT_HEAD:
                self._cancel_timer()
                too_large = BadRequest("The CONNECT request is too large.")
                self.transport.write(error_bytes(too_large, close=True, phrase=too_large.code))
                self.transport.close()
            return
        self._cancel_timer()
        self.transport.pause_reading()
        self.front.spawn(self.front.handle_connect(self.transport, self.buffer[:end], self.buffer[end + 4 :]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Half(asyncio.Protocol):
    """One direction of a tunnel: what arrives here is written to the peer, with back-pressure."""

    def __init__(self, tunnel: _Tunnel) -> None:
        self.tunnel = tunnel
        self.peer: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        self.tunnel.last_active = time.monotonic()
        if self.peer is not None:
            self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
            return True  # keep the other direction open (half-close)
        return False

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()


class _Tunnel:
    """A spliced pair of transports, closed when either side closes or both idle too long."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.last_active = time.monotonic()
        self.done = front.loop.create_future()
        self._idle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._idle = self.front.loop.call_later(TUNNEL_IDLE_SECONDS, self._check_idle)

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_active
        if idle >= TUNNEL_IDLE_SECONDS:
            self.close()
        else:
            self._idle = self.front.loop.call_later(TUNNEL_IDLE_SECONDS - idle, self._check_idle)

    def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.close()
        if not self.done.done():
            self.done.set_result(None)


class Front:
    """Owns the data-plane socket; see the module docstring."""

    def __init__(
        self,
        plane: DataPlane,
        http_server_kwargs: dict[str, object],
        authority: CertificateAuthority | None,
    ) -> None:
        self.plane = plane
        self.server_kwargs = {"keepalive_timeout": HTTP_WAIT_SECONDS, **http_server_kwargs}
        self.http = _Server(self, functools.partial(serve_request, plane), **self.server_kwargs)
        self.loop = asyncio.get_running_loop()
        self.fast: FastServer | None = None
        if FAST_SERVER:
            from sidecar.fastserver import FastServer

            self.fast = FastServer(plane, self.hand_to_http, self.hand_to_connect)
        self.authority = authority
        self._intercept_servers: dict[tuple[str, int], _Server] = {}
        self._tunnels: set[_Tunnel] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Server | None = None

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        """Bind; returns the bound address."""
        loop = asyncio.get_running_loop()
        # The fast server reads the first bytes itself and passes a CONNECT on to a _Sniffer.
        factory: Callable[[], asyncio.Protocol] = self.fast.protocol if self.fast is not None else self._sniffer
        self._listener = await loop.create_server(
            factory, host, port, reuse_address=True, reuse_port=reuse_port or None, backlog=1024
        )
        sockname = self._listener.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def _sniffer(self) -> _Sniffer:
        return _Sniffer(self)

    def hand_to_connect(self, transport: asyncio.Transport, first: bytes) -> None:
        """A connection that starts with CONNECT (seen by the fast server): decided here."""
        sniffer = _Sniffer(self)
        transport.set_protocol(sniffer)
        sniffer.connection_made(transport)
        sniffer.data_received(first)

    def hand_to_http(self, transport: asyncio.Transport, first: bytes) -> None:
        handler = self.http()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(first)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ CONNECT

    async def handle_connect(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        started = time.perf_counter()
        rec = Record()
        rec.path = "-"
        rec.status = 200
        rec.mode = "tunnel"
        metrics.bump(metrics.INFLIGHT)
        try:
            authority, headers = connect_head(head)
            host, port = parse_authority(authority)
            # Logged only once parsed: a raw authority could carry user:password@.
            rec.path = str(HostPort(host, port))
            rt = self.plane.runtime
            if rt.routes.connect(host, port, rec, self.authority is not None) is None:
                # A passthrough host. Nothing is injected into a byte tunnel, so a client named on
                # the CONNECT has nothing to apply to: checked like any (JWT mode refuses it) and logged.
                rec.client_id = rt.identity.proxy_client_id(headers, connect=True)
                await self._tunnel(transport, host, port, rest)
                return
            if rest:
                raise BadRequest("Data arrived before the tunnel was established.", reason="early_data")
            rec.client_id = rt.identity.proxy_client_id(headers, connect=True)
            rec.mode = "mitm"
            await self._intercept(transport, host, port, rec.client_id)
        except SidecarError as err:
            rec.status = err.status
            rec.error = err.code
            rec.reason = err.reason
            metrics.count_refusal(err.code)
            if not transport.is_closing():
                # The code as reason phrase (403 destination_not_allowed): a proxy client
                # shows the app this status line and never the body.
                transport.write(error_bytes(err, close=True, phrase=err.code))
                transport.close()
        except Exception:
            rec.status = 502
            log.error("CONNECT handling failed", exc_info=False)
            transport.close()
        finally:
            if rec.client_id is not None:
                rec.identity = "proxy"
            # Counted without a duration sample: a tunnel's lifetime is no request latency.
            self.plane.access_log.account(_CONNECT_LINE, rec, time.perf_counter() - started, timed=False)

    async def _tunnel(self, client: asyncio.Transport, host: str, port: int, rest: bytes) -> None:
        loop = self.loop
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                allowed = await resolve_allowed(
                    host, port, self.plane.runtime.routes.passthrough_allow_private, _passthrough_forbidden
                )
        except TimeoutError as exc:
            raise failures.tunnel("dns", exc) from None
        address = allowed[0]
        tunnel = _Tunnel(self)
        to_upstream = _Half(tunnel)
        to_client = _Half(tunnel)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                upstream, _ = await loop.create_connection(lambda: to_client, address, port)
        except OSError as exc:  # a TimeoutError too
            raise failures.tunnel("connect", exc) from None
        tunnel.client, tunnel.upstream = client, upstream
        to_client.peer = client
        to_upstream.peer = upstream
        client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client.set_protocol(to_upstream)
        if rest:
            upstream.write(rest)
        client.resume_reading()
        self._tunnels.add(tunnel)
        tunnel.start()
        try:
            await tunnel.done
        finally:
            self._tunnels.discard(tunnel)

    async def _intercept(self, client: asyncio.Transport, host: str, port: int, client_id: str | None) -> None:
        assert self.authority is not None
        loop = self.loop
        context = await loop.run_in_executor(None, self.authority.context_for, host)
        server = self._intercept_servers.get((host, port))
        if server is None:
            origin = (host, port)

            async def handle(request: web.BaseRequest) -> web.StreamResponse:
                handler = request.protocol
                named = handler.tunnel_client_id if isinstance(handler, _RequestHandler) else None
                return await serve_request(self.plane, request, origin, named)

            server = _Server(self, handle, **self.server_kwargs)
            self._intercept_servers[origin] = server
        handler = server()
        # One server per origin, one handler per connection: the CONNECT's client goes with it.
        handler.tunnel_client_id = client_id
        client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            tls = await loop.start_tls(
                client, handler, context, server_side=True, ssl_handshake_timeout=CONNECT_TIMEOUT
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError):
            # The app does not trust our CA, or went away: nothing was sent upstream.
            log.warning("TLS handshake with the app failed", extra={"host": host})
            client.close()
            return
        if tls is None:
            return
        handler.connection_made(tls)

    # ------------------------------------------------------------------ shutdown

    async def drain(self, grace: float) -> None:
        """Stop accepting; let HTTP requests finish within ``grace``; close tunnels."""
        if self._listener is not None:
            self._listener.close()
        await asyncio.sleep(0)
        servers = [self.http, *self._intercept_servers.values()]
        for server in servers:
            server.pre_shutdown()
        waits = [server.shutdown(grace) for server in servers]
        if self.fast is not None:
            waits.append(self.fast.drain(grace))
        await asyncio.gather(*waits)
        for tunnel in list(self._tunnels):
            tunnel.close()
        for task in list(self._tasks):
            task.cancel()
        if self._listener is not None:
            await self._listener.wait_closed()
