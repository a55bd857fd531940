"""The data plane: identity -> policy -> secret -> inject -> forward -> stream back.

Runs on aiohttp's low-level server (no router, no middlewares): the first path
segment or the absolute-form host picks the upstream with one dict look-up.
Every refusal is a SidecarError turned into a response in one place
(``refusal.error_response``); every request ends in one access-log line (``AccessLog.account``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from aiohttp import StreamReader, web
from multidict import CIMultiDict

from sidecar import metrics
from sidecar.errors import (
    BadRequest,
    ClientNotAllowed,
    DestinationNotAllowed,
    NoCredential,
    SecretStoreUnavailable,
    SidecarError,
    UnknownUpstream,
    UnsupportedHttpVersion,
)
from sidecar.exchange import REPLAY_BODY_LIMIT, STREAM_BROKEN, ResponseHead
from sidecar.identity.base import IdentityResolver
from sidecar.net import normalize_host
from sidecar.policy import client_allowed, scopes_allowed
from sidecar.record import Record, RequestLine
from sidecar.refusal import error_response, reason_phrase
from sidecar.secrets.base import Secret
from sidecar.secrets.cache import SecretCache
from sidecar.transport.base import UpstreamAnswer
from sidecar.upstream import Upstream

if TYPE_CHECKING:
    from sidecar.access_log import AccessLog
    from sidecar.fastserver import FastExchange
    from sidecar.identity.base import HeaderReader

log = logging.getLogger("sidecar.proxy")

#: Methods never forwarded: an upstream implementing them reflects the request,
#: injected key included, back to the app.
REFUSED_METHODS = frozenset({"TRACE", "TRACK"})
#: Targets connect.py puts in place of a request's own when the head aiohttp parsed cannot be
#: served: a target aiohttp could not even turn into a URL, a version other than 1.0 and 1.1,
#: a Transfer-Encoding other than one final chunked. The router refuses them (``_refuse_marked``).
MARK: Final = "\x00"
UNPARSEABLE_TARGET = MARK + "unparseable-target"
UNSUPPORTED_VERSION = MARK + "unsupported-version"
BAD_TRANSFER_ENCODING = MARK + "bad-transfer-encoding"


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything compiled from one config. A request keeps the Runtime it started with.

    Its field types are imported at run time, not only for the type checker: mypyc
    (see setup.py) compiles this dataclass and needs them.
    """

    upstreams: dict[str, Upstream]
    by_origin: dict[tuple[str, int], tuple[Upstream, ...]]  # longest base path first
    identity: IdentityResolver
    cache: SecretCache
    forward_proxy: bool
    mitm: bool
    passthrough: frozenset[tuple[str, int]]
    passthrough_allow_private: bool
    drop_headers: dict[str, frozenset[str]]  # per upstream: request headers never forwarded


class _OneWriteResponse(web.StreamResponse):
    """A response whose headers go out with the first body chunk: one write, not two.

    Only used when the upstream announced a Content-Length, so there is a body
    coming right behind the headers (streams keep headers-first delivery).
    """

    _send_headers_immediately = False


@dataclass(slots=True)
class Admitted:
    """A request that passed routing, identity, policy and the secret lookup."""

    upstream: Upstream
    path: str
    query: str
    client_id: str
    secret_id: str
    secret: Secret


def _check_path(path: str) -> None:
    """Refuse dot segments (also percent-encoded) and other paths an upstream could reinterpret."""
    if "#" in path or "\\" in path:
        raise BadRequest("The request path contains characters the sidecar will not forward.", reason="bad_path")
    if "." in path or "%" in path:
        decoded = unquote(path)
        for segment in decoded.replace("\\", "/").split("/"):
            # "..;x" too: Tomcat, Jetty and Spring drop ";params" and then walk up a level.
            if segment.partition(";")[0] in (".", ".."):
                raise BadRequest("Dot segments are not allowed in the path.", reason="dot_segment")


def _refuse_marked(raw: str) -> SidecarError:
    """The refusal for a request connect.py marked (see MARK)."""
    if raw == UNSUPPORTED_VERSION:
        return UnsupportedHttpVersion(reason="http_version")
    if raw == BAD_TRANSFER_ENCODING:
        return BadRequest(
            "Transfer-Encoding must be exactly chunked, once, in HTTP/1.1.", reason="transfer_encoding"
        )
    return BadRequest("The request target is not a valid URL.", reason="bad_target")


class DataPlane:
    """The request handler: ``handle`` for aiohttp's low-level server, ``handle_fast`` for fastserver."""

    def __init__(self, runtime: Runtime, access_log: AccessLog) -> None:
        self.runtime = runtime
        self.access_log = access_log

    async def handle(
        self, request: web.BaseRequest, origin: tuple[str, int] | None = None, tunnel_client_id: str | None = None
    ) -> web.StreamResponse:
        """Handle one request; ``origin`` is set for requests inside an intercepted CONNECT, and
        ``tunnel_client_id`` when that CONNECT named a client (``IdentityResolver.proxy_client_id``)."""
        rt = self.runtime
        started = time.perf_counter()
        rec = Record()
        metrics.bump(metrics.INFLIGHT)
        try:
            return await self._proxy(rt, request, rec, origin, tunnel_client_id)
        except SidecarError as err:
            return error_response(self._refuse(err, rec), reason_phrase(err, rec.mode))
        except asyncio.CancelledError:
            # The app hung up (handler_cancellation): the upstream call is abandoned with it.
            rec.status = rec.status or 499
            rec.reason = "client_closed"
            raise
        except Exception as exc:
            bug = self._refuse(self._bug(exc, rec), rec)
            return error_response(bug, reason_phrase(bug, rec.mode))
        finally:
            self.access_log.account(request, rec, time.perf_counter() - started)

    async def handle_fast(self, exchange: FastExchange) -> None:
        """Handle one request the fast server parsed and buffered whole; it writes the answer."""
        rt = self.runtime
        started = time.perf_counter()
        rec = Record()
        metrics.bump(metrics.INFLIGHT)
        try:
            admitted = await self._admit(rt, exchange, exchange.headers, rec, None, None)
            headers = exchange.headers  # the fast server's own copy: edited in place
            self._drop_hop_headers(rt, admitted.upstream, headers)
            answer, secret = await self._exchange(rt, exchange.method, admitted, headers, exchange.body, True, rec)
            upstream = admitted.upstream
            head = ResponseHead(answer, upstream.injection.scrubber(secret), upstream.settings.timeout_seconds)
            rec.status = head.status
            if not await exchange.relay(answer, head):
                rec.reason = "stream_interrupted"
        except SidecarError as err:
            exchange.refuse(self._refuse(err, rec), reason_phrase(err, rec.mode))
        except asyncio.CancelledError:
            rec.status = rec.status or 499
            rec.reason = "client_closed"
            raise
        except Exception as exc:
            bug = self._refuse(self._bug(exc, rec), rec)
            exchange.refuse(bug, reason_phrase(bug, rec.mode))
        finally:
            self.access_log.account(exchange, rec, time.perf_counter() - started)

    @staticmethod
    def _bug(exc: Exception, rec: Record) -> SidecarError:
        # A bug, not a refusal. The exception text could hold a URL with a key in it,
        # so only its type is logged.
        log.error(
            "unexpected failure handling a request",
            extra={"upstream": rec.upstream, "exception": type(exc).__name__},
        )
        return SidecarError(reason="internal_error")

    @staticmethod
    def _refuse(err: SidecarError, rec: Record) -> SidecarError:
        rec.status = err.status
        rec.error = err.code
        rec.reason = err.reason
        metrics.count_refusal(err.code)
        return err

    def _route(
        self, rt: Runtime, request: RequestLine, rec: Record, origin: tuple[str, int] | None
    ) -> tuple[Upstream, str, str]:
        """Pick the upstream; return it with the path and raw query to send."""
        raw = request.raw_path
        if raw.startswith(MARK):
            raise _refuse_marked(raw)
        if request.method in REFUSED_METHODS:
            raise BadRequest(f"{request.method} is not forwarded: it would echo the injected key.", reason="method")
        if origin is not None:
            # Inside an intercepted CONNECT: the destination was fixed by the CONNECT,
            # whatever the Host header says.
            rec.mode = "mitm"
            if not rt.mitm:
                raise DestinationNotAllowed("TLS interception was turned off.", reason="mitm_disabled")
            if not raw.startswith("/"):
                raise BadRequest("Requests inside a tunnel use origin-form targets.", reason="bad_target")
            path, _, query = raw.partition("?")
            rec.path = path
            return self._match_origin(rt, origin, "https", path, query)
        if raw.startswith("/"):
            path, _, query = raw.partition("?")
            rec.path = path
            name, slash, rest = path[1:].partition("/")
            upstream = rt.upstreams.get(name)
            if upstream is None:
                raise UnknownUpstream()
            target = upstream.settings.base_path + ("/" + rest if slash else "")
            return upstream, target or "/", query
        rec.mode = "proxy"
        if request.method == "CONNECT":
            # The listener handles CONNECT as the first request of a connection (connect.py);
            # one that follows other requests on a kept-alive connection is refused.
            raise DestinationNotAllowed("CONNECT must be the first request on a connection.", reason="connect")
        if not rt.forward_proxy:
            raise BadRequest("Forward-proxy requests are disabled.", reason="forward_proxy_disabled")
        return self._match_absolute(rt, raw, rec)

    def _match_absolute(self, rt: Runtime, raw: str, rec: Record) -> tuple[Upstream, str, str]:
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError:
            raise BadRequest("The request target is not a valid URL.", reason="bad_target") from None
        rec.path = parts.path or "/"
        rec.destination = parts.netloc.rpartition("@")[2]  # never userinfo in a log line
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise DestinationNotAllowed("Only http and https destinations exist here.", reason="scheme")
        if "@" in parts.netloc or parts.fragment:
            raise BadRequest("The request target carries user information or a fragment.", reason="bad_target")
        host = normalize_host(parts.hostname or "")
        if host is None:
            raise DestinationNotAllowed("The destination host is not valid.", reason="bad_host")
        origin = (host, port or (443 if scheme == "https" else 80))
        return self._match_origin(rt, origin, scheme, parts.path or "/", parts.query)

    @staticmethod
    def _match_origin(
        rt: Runtime, origin: tuple[str, int], scheme: str, path: str, query: str
    ) -> tuple[Upstream, str, str]:
        """The upstream on this host and port with the longest base path that prefixes ``path``."""
        for upstream in rt.by_origin.get(origin, ()):
            if scheme == "https" and upstream.settings.scheme != "https":
                continue  # never send what arrived over TLS on in the clear
            base = upstream.settings.base_path
            if not base or path == base or path.startswith(base + "/"):
                return upstream, path, query
        raise DestinationNotAllowed(reason="not_an_upstream")

    async def _admit(
        self,
        rt: Runtime,
        request: RequestLine,
        headers: HeaderReader,
        rec: Record,
        origin: tuple[str, int] | None,
        tunnel_client_id: str | None,
    ) -> Admitted:
        """Route, identify, check policy and look the key up; every refusal raises."""
        upstream, path, query = self._route(rt, request, rec, origin)
        rec.upstream = upstream.name
        _check_path(path)
        # An absolute-form request may name its client to the proxy (a Proxy-Authorization user);
        # a request in an intercepted tunnel has whatever its CONNECT named.
        proxy_client_id = (
            rt.identity.proxy_client_id(headers, connect=False) if rec.mode == "proxy" else tunnel_client_id
        )
        identity = await rt.identity.resolve(headers, proxy_client_id)
        rec.client_id = identity.client_id
        rec.identity = identity.source
        if not client_allowed(upstream.client_matcher, identity.client_id):
            raise ClientNotAllowed(reason="client_glob")
        if upstream.scopes and not scopes_allowed(upstream.scopes, identity.scopes):
            raise ClientNotAllowed("The caller holds none of the scopes this upstream needs.", reason="scope")
        settings = upstream.settings
        secret_id = upstream.secret_id(client_id=identity.client_id)
        try:
            secret, rec.cache = await rt.cache.get(
                secret_id, settings.secret_field, upstream.key_wait, identity.client_id
            )
        except (NoCredential, SecretStoreUnavailable) as err:
            rec.cache = err.lookup  # the cache's outcome word, set where it was decided
            raise
        return Admitted(upstream, path, query, identity.client_id, secret_id, secret)

    @staticmethod
    def _drop_hop_headers(rt: Runtime, upstream: Upstream, headers: CIMultiDict[str]) -> None:
        """Remove identity, hop-by-hop and app-supplied key headers from the outgoing copy."""
        connection = headers.getall("Connection", None)
        for name in rt.drop_headers[upstream.name]:
            headers.popall(name, None)
        if connection:
            # RFC 9110 7.6.1: fields named in Connection are for this hop only, on every
            # Connection line (a second line is as valid as a list in one).
            for line in connection:
                for token in line.split(","):
                    headers.popall(token.strip(), None)

    async def _exchange(
        self,
        rt: Runtime,
        method: str,
        admitted: Admitted,
        headers: CIMultiDict[str],
        data: bytes | StreamReader | None,
        replayable: bool,
        rec: Record,
    ) -> tuple[UpstreamAnswer, Secret]:
        """Inject, send; on 401/403 with a rotated key in the store, send once more."""
        upstream = admitted.upstream
        secret = admitted.secret
        field = upstream.settings.secret_field
        target = upstream.injection.target(admitted.path, admitted.query, headers, secret)
        answer = await upstream.send(method, target, headers, data, admitted.client_id)
        if answer.status in (401, 403):
            fresh = await rt.cache.refresh_rejected(admitted.secret_id, field, secret)
            if fresh is None:
                metrics.ROTATIONS.labels(upstream.name, "unchanged").inc()
            elif not replayable:
                metrics.ROTATIONS.labels(upstream.name, "not_replayable").inc()
                rec.reason = "credential_refreshed_not_replayed"
            else:
                # The key was rotated in the store: the refused answer is dropped and the
                # request is sent once more with the new value.
                answer.close()
                metrics.ROTATIONS.labels(upstream.name, "replayed").inc()
                log.info("upstream refused a credential that has since changed; replaying once",
                         extra={"upstream": upstream.name, "client_id": admitted.client_id})
                rec.reason = "credential_rotated"
                secret = fresh
                target = upstream.injection.target(admitted.path, admitted.query, headers, secret)
                answer = await upstream.send(method, target, headers, data, admitted.client_id)
        return answer, secret

    async def _proxy(
        self,
        rt: Runtime,
        request: web.BaseRequest,
        rec: Record,
        origin: tuple[str, int] | None,
        tunnel_client_id: str | None,
    ) -> web.StreamResponse:
        admitted = await self._admit(rt, request, request.headers, rec, origin, tunnel_client_id)
        headers = CIMultiDict(request.headers)
        self._drop_hop_headers(rt, admitted.upstream, headers)
        data: bytes | StreamReader | None = None
        replayable = True
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = request.content_length
            if length is not None and length <= REPLAY_BODY_LIMIT:
                data = await request.read()  # small: kept so a rotation can replay it
            else:
                data = request.content
                replayable = False
        answer, secret = await self._exchange(rt, request.method, admitted, headers, data, replayable, rec)
        upstream = admitted.upstream
        head = ResponseHead(answer, upstream.injection.scrubber(secret), upstream.settings.timeout_seconds)
        return await self._stream_back(request, answer, head, rec)

    async def _stream_back(
        self, request: web.BaseRequest, answer: UpstreamAnswer, head: ResponseHead, rec: Record
    ) -> web.StreamResponse:
        response = (_OneWriteResponse if head.framed else web.StreamResponse)(status=head.status, reason=head.reason)
        out = response.headers
        for name, value in head.headers:
            out.add(name, value)
        if head.framed:
            response.content_length = head.length
        rec.status = head.status
        try:
            await response.prepare(request)
            if request.method != "HEAD" and head.status not in (204, 304):
                content = answer.content
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    # write() waits while the app is not reading: bounded, as in the fast server.
                    async with asyncio.timeout(head.write_timeout):
                        await response.write(chunk)
        except STREAM_BROKEN:
            # Either side broke mid-body. The app must see a cut response, never a clean
            # end, and the upstream connection must not go back to the pool half-read.
            answer.close()
            rec.reason = "stream_interrupted"
            transport = request.transport
            if transport is not None:
                transport.close()
            return response
        except BaseException:
            answer.close()  # cancelled (the app hung up): never leave the upstream connection behind
            raise
        answer.release()
        await response.write_eof()
        return response
