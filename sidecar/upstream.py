"""One configured upstream: its pooled client session, address guard, TLS and rules.

Everything per upstream is built once (origin string, injection rule, client
glob, timeouts, header drop list); a request only does look-ups. aiohttp client
exceptions are translated into our errors here, at the boundary where they arise.
The clients and what they share are in ``sidecar.transport`` (``base``: limits and
the answer Protocol; ``fast``: the lean client; ``aio``: aiohttp's pieces).
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import UpstreamSettings
from sidecar.errors import (
    DestinationNotAllowed,
    SidecarError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from sidecar.inject import CompiledInjection, compile_injector
from sidecar.metrics import UPSTREAM_ERRORS
from sidecar.net import trust_context, url_host
from sidecar.policy import compile_client_matcher
from sidecar.transport.aio import SKIP_AUTO_HEADERS, ClientShares, ForbiddenAddressError, GuardedResolver, SharedAnswer
from sidecar.transport.base import (
    DNS_TTL_SECONDS,
    HOP_BY_HOP,
    LOCAL_CREDENTIAL_HEADERS,
    POOL_LIMIT,
    READ_BUFFER,
    UpstreamAnswer,
)

if TYPE_CHECKING:
    from sidecar.transport.fast import FastPool

#: The lean client (sidecar/transport/fast.py) carries the common requests; aiohttp the rest.
#: SIDECAR_UPSTREAM_CLIENT=aiohttp sends everything through aiohttp (a comparison and
#: an escape hatch).
FAST_CLIENT = os.environ.get("SIDECAR_UPSTREAM_CLIENT", "fast") != "aiohttp" and find_spec("httptools") is not None
_ERROR_KINDS = {
    "connect": "connect", "dns": "connect", "tls": "tls", "connect_timeout": "timeout",
    "protocol": "protocol", "forbidden_address": "forbidden_address", "timeout": "timeout",
}


class Upstream:
    """A compiled upstream: send requests with ``send`` after ``start``."""

    def __init__(self, settings: UpstreamSettings, resolver: AbstractResolver | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        default_port = 443 if settings.scheme == "https" else 80
        #: host[:port] as in a Host header and a URL (the port only when not the default)
        self.authority = url_host(settings.host) + ("" if settings.port == default_port else f":{settings.port}")
        self.origin = f"{settings.scheme}://{self.authority}"
        #: where the aiohttp path sends its requests: the origin, or connect_to's address, in
        #: which case Host and the TLS server name are set to url's host on each request
        self._request_origin = self.origin
        self._server_hostname: str | None = None
        if settings.connect_to is not None:
            dial_host, dial_port = settings.connect_to
            self._request_origin = f"{settings.scheme}://{url_host(dial_host)}:{dial_port}"
            if settings.scheme == "https":
                self._server_hostname = settings.host
        #: the secret's name for a client: the template with the upstream already filled in
        self.secret_id = functools.partial(settings.secret.format, upstream=settings.name)
        self.injection: CompiledInjection = compile_injector(settings.inject)
        self.client_matcher = compile_client_matcher(settings.clients)
        self.scopes = frozenset(settings.scopes)
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=settings.timeout_seconds, sock_read=settings.timeout_seconds
        )
        # Expect: this hop meets it (the proxy answers 100 Continue and reads the body),
        # so the upstream must not wait for a body that is already here.
        drop = set(HOP_BY_HOP) | LOCAL_CREDENTIAL_HEADERS | {"host", "expect"}
        if self.injection.header is not None:
            drop.add(self.injection.header.lower())
        self.drop_request_headers = frozenset(drop)
        self._resolver = resolver
        self.session: aiohttp.ClientSession | None = None
        self.shares = ClientShares()
        self.fast: FastPool | None = None
        self._errors = {
            kind: UPSTREAM_ERRORS.labels(self.name, kind)
            for kind in ("connect", "tls", "timeout", "protocol", "forbidden_address")
        }

    async def start(self) -> None:
        """Create the pooled session (needs a running loop)."""
        s = self.settings
        ssl_context: ssl.SSLContext | bool = False
        if s.scheme == "https":
            ssl_context = trust_context(s.ca_file)
        if FAST_CLIENT and self._resolver is None:
            from sidecar.transport.fast import FastPool

            # One pool per upstream: its connections all go to this upstream's dial
            # address, so two upstreams of one origin (or one with connect_to) never share one.
            self.fast = FastPool(
                s.host, s.port, ssl_context if isinstance(ssl_context, ssl.SSLContext) else None,
                s.allow_private, s.timeout_seconds, self.authority, dial=s.connect_to,
                refusal=self.forbidden_address,
            )
        resolver: AbstractResolver | None = self._resolver
        if not s.allow_private:
            resolver = GuardedResolver(resolver)
        # aiohttp's pool cannot be partitioned by client, so its connections serve one
        # request each: a connection that served one client never serves another, and an
        # answer left behind (an upstream answering a HEAD with a body, say) is never read
        # as the next request's. It carries only what the lean client cannot (HEAD,
        # streamed request bodies); SIDECAR_UPSTREAM_CLIENT=aiohttp pays a connect for
        # every request.
        connector = aiohttp.TCPConnector(
            resolver=resolver,
            ssl=ssl_context,
            limit=POOL_LIMIT,
            force_close=True,
            ttl_dns_cache=DNS_TTL_SECONDS,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            timeout=self.timeout,
            trust_env=False,  # the sidecar is the proxy; it never goes through HTTP_PROXY itself
            read_bufsize=READ_BUFFER,
        )

    async def send(
        self, method: str, target: str, headers: CIMultiDict[str], data: Any, client: str
    ) -> UpstreamAnswer:
        """Send one request for ``client`` (``target`` is the raw path and query); failures become our errors."""
        assert self.session is not None
        try:
            if (
                self.fast is not None
                and method != "HEAD"  # llhttp cannot be told a response has no body
                and (data is None or isinstance(data, bytes))
            ):
                # The lean client bounds the connection wait, connecting and the head together.
                return await self.fast.request(method, target, headers, data, client)
            # sock_read alone would let an upstream trickle its head a byte at a time
            # forever; the head as a whole must arrive within timeout_seconds (the wait
            # for the client's share of connections included).
            async with asyncio.timeout(self.settings.timeout_seconds):
                await self.shares.take(client)
                try:
                    url = URL(self._request_origin + target, encoded=True)
                    if self._request_origin is not self.origin:
                        # connect_to: the URL names the address dialled, so Host is set here
                        # (aiohttp would take it from the URL) and the TLS server name below.
                        headers["Host"] = self.authority
                    answer = await self.session.request(
                        method, url, headers=headers, data=data, allow_redirects=False, compress=None,
                        server_hostname=self._server_hostname,
                    )
                except BaseException:
                    self.shares.give(client)
                    raise
                return SharedAnswer(answer, self.shares, client)
        except SidecarError as err:
            kind = _ERROR_KINDS.get(err.reason)
            if kind is not None:
                self._errors[kind].inc()
            raise
        except Exception as exc:
            raise self.translate(exc) from None

    def forbidden_address(self) -> DestinationNotAllowed:
        """The refusal of an upstream that resolves only to guarded addresses, naming the opt-in.

        Only ever for a configured upstream: the operator chose its host, so pointing at
        ``allow_private`` is the right advice for an internal API (and wrong for anything else).
        """
        return DestinationNotAllowed(
            f"Upstream {self.name} resolves only to private, loopback, link-local or reserved addresses, "
            f"which the sidecar does not reach by default; for an internal API, set allow_private: true "
            f"on upstreams.{self.name}.",
            reason="forbidden_address",
        )

    def key_wait(self, client: str, delta: int) -> None:
        """A request of ``client`` starts (+1) or stops (-1) waiting for its key: connect meanwhile."""
        if self.fast is not None:
            self.fast.key_wait(client, delta)

    def translate(self, exc: BaseException) -> SidecarError:
        """Map an aiohttp/OS exception to the contract's error; never copies its text."""
        if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ForbiddenAddressError):
            self._errors["forbidden_address"].inc()
            return self.forbidden_address()
        if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError):
            self._errors["tls"].inc()
            return UpstreamUnreachable("The TLS handshake with the upstream failed.", reason="tls")
        if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            self._errors["timeout"].inc()
            return UpstreamTimeout(reason="timeout")
        if isinstance(exc, aiohttp.ClientConnectorError | ConnectionError):
            self._errors["connect"].inc()
            return UpstreamUnreachable("The connection to the upstream failed.", reason="connect")
        self._errors["protocol"].inc()
        return UpstreamUnreachable("The upstream answered with a malformed response.", reason="protocol")

    async def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        if self.session is not None:
            await self.session.close()
            self.session = None
