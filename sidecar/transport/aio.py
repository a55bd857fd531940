"""The aiohttp client of one upstream and its pieces: per-client shares, the answer holding one, the address guard.

``sidecar.upstream`` sends through ``AioClient`` what the lean client
(``transport.fast``) does not carry: HEAD and streamed request bodies (everything,
with SIDECAR_UPSTREAM_CLIENT=aiohttp). Left as Python (setup.py):
``ForbiddenAddressError`` subclasses OSError and ``GuardedResolver`` aiohttp's
resolver, which mypyc cannot compile as native classes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.errors import DestinationNotAllowed, UpstreamUnreachable
from sidecar.net import Lookup, forbidden_destination, lookup, resolve_allowed, url_host
from sidecar.transport.base import CLIENT_LIMIT, DNS_TTL_SECONDS, POOL_LIMIT, READ_BUFFER

#: Headers aiohttp would add on its own; the sidecar forwards what the app sent, no more.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class _ClientSlots:
    """One client's share: a semaphore of CLIENT_LIMIT, and how many hold or wait for it."""

    __slots__ = ("semaphore", "users")

    def __init__(self) -> None:
        self.semaphore = asyncio.Semaphore(CLIENT_LIMIT)
        self.users = 0


class ClientShares:
    """Per client, the aiohttp-path answers in flight, at most CLIENT_LIMIT (the lean pool has its own).

    A client over its share waits (within the request's timeout) for one of its own
    answers to end; other clients never wait for it. Clients with nothing in flight
    cost nothing: their entry goes when its last user does.
    """

    def __init__(self) -> None:
        self._by_client: dict[str, _ClientSlots] = {}

    async def take(self, client: str) -> None:
        slots = self._by_client.get(client)
        if slots is None:
            slots = self._by_client[client] = _ClientSlots()
        slots.users += 1
        try:
            await slots.semaphore.acquire()
        except BaseException:
            self._leave(client, slots)
            raise

    def give(self, client: str) -> None:
        slots = self._by_client.get(client)
        if slots is not None:
            slots.semaphore.release()
            self._leave(client, slots)

    def _leave(self, client: str, slots: _ClientSlots) -> None:
        slots.users -= 1
        if slots.users == 0:
            del self._by_client[client]


class SharedAnswer:
    """aiohttp's answer, holding one of its client's shares until it is released or closed."""

    __slots__ = ("_answer", "_client", "_shares")

    def __init__(self, answer: aiohttp.ClientResponse, shares: ClientShares, client: str) -> None:
        self._answer = answer
        self._shares: ClientShares | None = shares
        self._client = client

    @property
    def status(self) -> int:
        return self._answer.status

    @property
    def reason(self) -> str | None:
        return self._answer.reason

    @property
    def content_length(self) -> int | None:
        return self._answer.content_length

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._answer.headers

    @property
    def content(self) -> aiohttp.StreamReader:
        return self._answer.content

    def _give(self) -> None:
        shares, self._shares = self._shares, None
        if shares is not None:
            shares.give(self._client)

    def close(self) -> None:
        self._answer.close()
        self._give()

    def release(self) -> Any:
        try:
            return self._answer.release()
        finally:
            self._give()


class ForbiddenAddressError(OSError):
    """Every address a name resolved to is loopback, private, link-local or reserved.

    An OSError, so aiohttp's connector wraps it as it wraps a failed lookup
    (ClientConnectorError); ``transport.failures.translate`` unwraps it into
    ``refusal()``, the refusal of whoever built the resolver.
    """

    def __init__(self, refusal: Callable[[], DestinationNotAllowed]) -> None:
        super().__init__("the name resolves only to addresses the sidecar may not reach")
        self.refusal = refusal


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver over ``lookup``, through the one address guard (``net.resolve_allowed``).

    The connector connects only to what it returns: the addresses the guard allows.
    """

    def __init__(
        self,
        lookup: Lookup = lookup,
        allow_private: bool = False,
        refusal: Callable[[], DestinationNotAllowed] = forbidden_destination,
    ) -> None:
        self._lookup = lookup
        self._allow_private = allow_private
        self._refusal = refusal

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await resolve_allowed(host, port, self._allow_private, self._refusal, lookup=self._lookup)
        except DestinationNotAllowed:
            raise ForbiddenAddressError(self._refusal) from None
        except UpstreamUnreachable:
            # The name does not resolve: an OSError, as aiohttp's own resolvers raise.
            raise OSError(f"{host} does not resolve") from None
        results: list[ResolveResult] = []
        for address in addresses:
            found = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, found):
                results.append(
                    ResolveResult(hostname=host, host=address, port=port, family=found, proto=0, flags=0)
                )
        if not results:
            raise OSError(f"{host} has no address of the family asked for")
        return results

    async def close(self) -> None:
        return None


class AioClient:
    """aiohttp's client for one upstream (Transport): a session of its own, guarded by GuardedResolver.

    aiohttp's pool cannot be partitioned by client, so its connections serve one
    request each: a connection that served one client never serves another, and an
    answer left behind (an upstream answering a HEAD with a body, say) is never read
    as the next request's. It carries only what the lean client cannot (HEAD,
    streamed request bodies); SIDECAR_UPSTREAM_CLIENT=aiohttp pays a connect for
    every request.
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
        scheme = "https" if ssl_context is not None else "http"
        self.ssl_context = ssl_context
        self.timeout_seconds = timeout
        #: host[:port] as in a Host header (the port only when not the scheme's default)
        self.authority = host_header
        #: where requests are sent: the origin, or connect_to's address (``dial``), in which
        #: case Host and the TLS server name are set to the upstream's host on each request
        self._request_origin = f"{scheme}://{host_header}"
        self._dialled = dial is not None
        self._server_hostname: str | None = None
        if dial is not None:
            dial_host, dial_port = dial
            self._request_origin = f"{scheme}://{url_host(dial_host)}:{dial_port}"
            if ssl_context is not None:
                self._server_hostname = host
        self._resolver = GuardedResolver(lookup, allow_private, refusal)
        self.session: aiohttp.ClientSession | None = None
        self.shares = ClientShares()

    async def start(self) -> None:
        """Create the pooled session (needs a running loop)."""
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            ssl=self.ssl_context if self.ssl_context is not None else False,
            limit=POOL_LIMIT,
            force_close=True,
            ttl_dns_cache=DNS_TTL_SECONDS,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.timeout_seconds, sock_read=self.timeout_seconds
            ),
            trust_env=False,  # the sidecar is the proxy; it never goes through HTTP_PROXY itself
            read_bufsize=READ_BUFFER,
        )

    async def send(
        self, method: str, target: str, headers: CIMultiDict[str], data: Any, client: str
    ) -> SharedAnswer:
        """Send one request for ``client``; aiohttp's exceptions are left to ``transport.failures``."""
        session = self.session
        assert session is not None
        # sock_read alone would let an upstream trickle its head a byte at a time
        # forever; the head as a whole must arrive within timeout_seconds (the wait
        # for the client's share of connections included).
        async with asyncio.timeout(self.timeout_seconds):
            await self.shares.take(client)
            try:
                url = URL(self._request_origin + target, encoded=True)
                if self._dialled:
                    # connect_to: the URL names the address dialled, so Host is set here
                    # (aiohttp would take it from the URL) and the TLS server name below.
                    headers["Host"] = self.authority
                answer = await session.request(
                    method, url, headers=headers, data=data, allow_redirects=False, compress=None,
                    server_hostname=self._server_hostname,
                )
            except BaseException:
                self.shares.give(client)
                raise
            return SharedAnswer(answer, self.shares, client)

    def key_wait(self, client: str, delta: int) -> None:
        """Nothing to warm: aiohttp's connections serve one request each."""

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
