"""CONNECT: a passthrough tunnel, an interception, or a refusal, as ``Routes.connect`` decides.

    passthrough_hosts entry ─▶ address guard ─▶ 200, plain byte tunnel (no injection)
    upstream host, mitm on  ─▶ 200, TLS with a minted leaf ─▶ aiohttp's server bound to that origin
    anything else           ─▶ 403 destination_not_allowed, before any connection is made
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from multidict import CIMultiDict

from sidecar import metrics
from sidecar.errors import BadRequest, DestinationNotAllowed, SidecarError, UnsupportedHttpVersion
from sidecar.listen.aio_exchange import serve_request
from sidecar.listen.aio_server import AioRequestHandler, AioServer
from sidecar.net import HostPort, normalize_host, parse_host_port, resolve_allowed
from sidecar.record import FixedLine, Record
from sidecar.refusal import error_bytes
from sidecar.transport import failures

if TYPE_CHECKING:
    from sidecar.mitm import CertificateAuthority
    from sidecar.pipeline import DataPlane

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
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2
#: The access log's request line for a CONNECT (its path is the parsed authority, set on the
#: Record) and for a head aiohttp could not parse.
_CONNECT_LINE = FixedLine("CONNECT")


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


def _passthrough_forbidden() -> DestinationNotAllowed:
    """A passthrough host that resolves only to guarded addresses: the operator listed it, so
    the opt-in is the right pointer (for an internal host; a public one resolving privately is not)."""
    return DestinationNotAllowed(
        "The passthrough host resolves only to private, loopback, link-local or reserved addresses; "
        "for an internal host, set forward_proxy.passthrough_allow_private: true.",
        reason="forbidden_address",
    )


class _Sniffer(asyncio.Protocol):
    """Reads just enough of a new connection to tell CONNECT from everything else."""

    def __init__(self, connect: ConnectHandler) -> None:
        self.connect = connect
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.connect.loop.call_later(FIRST_BYTES_TIMEOUT, self.transport.close)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        head = self.buffer[: len(_CONNECT)]
        if len(head) < len(_CONNECT) and _CONNECT.startswith(head):
            return  # could still become a CONNECT
        if not head.startswith(_CONNECT):
            self._cancel_timer()
            self.connect.hand_to_http(self.transport, self.buffer)
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
        self.connect.spawn(self.connect.handle(self.transport, self.buffer[:end], self.buffer[end + 4 :]))

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

    def __init__(self, connect: ConnectHandler) -> None:
        self.connect = connect
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.last_active = time.monotonic()
        self.done = connect.loop.create_future()
        self._idle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._idle = self.connect.loop.call_later(TUNNEL_IDLE_SECONDS, self._check_idle)

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_active
        if idle >= TUNNEL_IDLE_SECONDS:
            self.close()
        else:
            self._idle = self.connect.loop.call_later(TUNNEL_IDLE_SECONDS - idle, self._check_idle)

    def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.close()
        if not self.done.done():
            self.done.set_result(None)


class ConnectHandler:
    """Decides and carries out one CONNECT: a passthrough tunnel, an interception, or a refusal."""

    def __init__(
        self,
        plane: DataPlane,
        loop: asyncio.AbstractEventLoop,
        authority: CertificateAuthority | None,
        server_kwargs: dict[str, Any],
        hand_to_http: Callable[[asyncio.Transport, bytes], None],
    ) -> None:
        self.plane = plane
        self.loop = loop
        self.authority = authority
        self.server_kwargs = server_kwargs
        #: A connection that turned out not to be a CONNECT goes back to the listener's HTTP server.
        self.hand_to_http = hand_to_http
        self.intercept_servers: dict[tuple[str, int], AioServer] = {}
        self.tunnels: set[_Tunnel] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def sniffer(self) -> _Sniffer:
        """The protocol for a new connection that may be a CONNECT."""
        return _Sniffer(self)

    def take_over(self, transport: asyncio.Transport, first: bytes) -> None:
        """A connection that starts with CONNECT (seen by the lean server): decided here."""
        sniffer = _Sniffer(self)
        transport.set_protocol(sniffer)
        sniffer.connection_made(transport)
        sniffer.data_received(first)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
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
        self.tunnels.add(tunnel)
        tunnel.start()
        try:
            await tunnel.done
        finally:
            self.tunnels.discard(tunnel)

    async def _intercept(self, client: asyncio.Transport, host: str, port: int, client_id: str | None) -> None:
        assert self.authority is not None
        loop = self.loop
        context = await loop.run_in_executor(None, self.authority.context_for, host)
        server = self.intercept_servers.get((host, port))
        if server is None:
            origin = (host, port)

            async def handle(request: web.BaseRequest) -> web.StreamResponse:
                handler = request.protocol
                named = handler.tunnel_client_id if isinstance(handler, AioRequestHandler) else None
                return await serve_request(self.plane, request, origin, named)

            server = AioServer(self.plane, loop, handle, **self.server_kwargs)
            self.intercept_servers[origin] = server
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

    def close(self) -> None:
        """At the end of a drain: every tunnel closed, every CONNECT still being decided cancelled."""
        for tunnel in list(self.tunnels):
            tunnel.close()
        for task in list(self.tasks):
            task.cancel()
