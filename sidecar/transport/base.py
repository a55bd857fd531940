"""What both upstream clients share: their interface, their answer, the pool limits, the headers never forwarded.

Compiled with the request path (setup.py); nothing here imports either client, so
the lean client (``transport.fast``), the aiohttp client (``transport.aio``) and
``sidecar.upstream`` all import from here and not from each other.
"""

from __future__ import annotations

import os
import threading
from importlib.util import find_spec
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

#: RFC 9110 7.6.1 connection-specific fields, plus the proxy ones.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "transfer-encoding", "upgrade",
    }
)
#: Credentials for services on the app's own host (a Vault agent; the AWS Parameters and
#: Secrets extension): an app's HTTP client may attach them to every request, and no
#: upstream is meant to see them. An upstream whose ``inject`` names one gets its own key there.
LOCAL_CREDENTIAL_HEADERS = frozenset({"x-vault-token", "x-aws-parameters-secrets-token"})
#: Idle keep-alive connections to an upstream live this long.
KEEPALIVE_SECONDS = 30.0
#: Upper bound on open connections per upstream (both clients).
POOL_LIMIT = 256
#: Upper bound on one client's share of them: three quarters, so one client (a burst, or
#: an app that stops reading its answers) always leaves a quarter to the others.
CLIENT_LIMIT = POOL_LIMIT * 3 // 4
#: Resolved upstream addresses are reused this long (both clients).
DNS_TTL_SECONDS = 10
#: aiohttp's client reads an answer's body in pieces of at most this.
READ_BUFFER = 64 * 1024
#: What the lean server and client read in one go: asyncio's own read size.
RECEIVE_BYTES = 256 * 1024

_thread = threading.local()


def receive_buffer() -> memoryview:
    """This thread's receive buffer: the lean protocols' ``get_buffer`` (asyncio.BufferedProtocol).

    A plain Protocol costs a fresh 256 KiB bytes object per read: glibc maps it
    (mmap), shrinks it to what arrived (mremap) and unmaps it, three system calls
    and fresh pages on every read from the app and from the upstream. The lean
    protocols instead receive into this one buffer and take what arrived out of
    it in ``buffer_updated``, before the next read: asyncio (sockets and
    sslproto alike) calls ``get_buffer``, fills it and calls ``buffer_updated``
    without yielding in between. One per thread, as each event loop runs in one.
    """
    try:
        return _thread.buffer  # type: ignore[no-any-return]
    except AttributeError:
        buffer = _thread.buffer = memoryview(bytearray(RECEIVE_BYTES))
        return buffer

#: The lean client (transport.fast) carries the common requests and aiohttp the rest;
#: SIDECAR_UPSTREAM_CLIENT=aiohttp sends everything through aiohttp (a comparison and an
#: escape hatch). Read once, here, when the module is imported.
_LEAN = os.environ.get("SIDECAR_UPSTREAM_CLIENT", "fast") != "aiohttp" and find_spec("httptools") is not None


def lean_enabled() -> bool:
    """Whether upstreams send through the lean client (unless an Upstream is told otherwise)."""
    return _LEAN


class UpstreamAnswer(Protocol):
    """What the proxy reads from an upstream answer (aiohttp's ClientResponse or FastResponse)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> BodyReader: ...

    def close(self) -> None: ...

    def release(self) -> Any: ...


class BodyReader(Protocol):
    """An answer's body as the proxy reads it (aiohttp's StreamReader or FastResponse)."""

    async def readany(self) -> bytes: ...

    def at_eof(self) -> bool: ...


class Transport(Protocol):
    """One upstream's client: the lean pool (transport.fast.FastPool) or aiohttp's (transport.aio.AioClient).

    ``sidecar.upstream.Upstream`` holds one of each, concretely typed, and picks
    one per request; this Protocol types what they both are. Each raises the
    contract's errors where it knows them; whatever else escapes is translated by
    ``transport.failures``, where every upstream error is also counted.
    """

    async def start(self) -> None: ...

    async def send(
        self, method: str, target: str, headers: CIMultiDict[str], data: Any, client: str
    ) -> UpstreamAnswer: ...

    def key_wait(self, client: str, delta: int) -> None: ...

    async def close(self) -> None: ...
