"""One exchange between the app and an upstream: the seam both servers serve through.

``Exchange`` is one request as a server received it and the way back to its app;
``DataPlane.serve`` (proxy.py) runs the one pipeline over it, and each server
implements it: ``FastExchange`` (fastserver.py) and ``AioExchange``
(aio_exchange.py). ``ResponseHead`` turns an upstream's answer into what the app
may see (scrubbed reason and headers, framing); both relay it. The body constants
say how much of a request is kept for a replay and which failures mean a side
broke off.
"""

from __future__ import annotations

import aiohttp
from aiohttp import StreamReader
from multidict import CIMultiDict

from sidecar.errors import SidecarError, UpstreamUnreachable
from sidecar.identity.base import HeaderReader
from sidecar.inject import Scrubber
from sidecar.transport.base import HOP_BY_HOP, UpstreamAnswer

#: An upstream's own X-Sidecar-Error would pass for a refusal by the sidecar.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-sidecar-error"}
#: Request bodies up to this size are read whole so a rotated key can replay them.
REPLAY_BODY_LIMIT = 1024 * 1024
#: Longest reason phrase relayed to the app.
MAX_REASON = 256
#: Answers that never have a body (RFC 9110 15.3.5, 15.4.5).
NO_BODY_STATUS = frozenset({204, 304})
#: Either side breaking off mid-body, as the clients and transports report it.
STREAM_BROKEN = (TimeoutError, ConnectionError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class ResponseHead:
    """What goes back to the app from an upstream answer: scrubbed reason and headers, framing."""

    __slots__ = ("framed", "headers", "length", "reason", "status", "write_timeout")

    def __init__(self, answer: UpstreamAnswer, scrub: Scrubber, write_timeout: float) -> None:
        """``scrub``: the spellings of the key this answer must not carry (the upstream's
        ``injection.scrubber(secret)``); ``write_timeout``: the upstream's timeout (see below)."""
        #: An app that reads none of the answer for this long loses it, and the upstream
        #: connection it holds goes: a stalled reader cannot keep one for longer.
        self.write_timeout = write_timeout
        if answer.status < 200:
            # A 101 the app never asked for (Upgrade is stripped) or another interim
            # status as the final answer: not something to relay.
            answer.close()
            raise UpstreamUnreachable("The upstream answered with an unexpected interim status.", reason="protocol")
        self.status = answer.status
        if self.status in NO_BODY_STATUS:
            # Never a body, whatever the upstream's Content-Length says (a 304 may repeat the
            # length of the 200 it stands for): the app must not wait for one.
            self.length = None
            self.framed = False
        else:
            self.length = answer.content_length
            self.framed = (
                self.length is not None and "chunked" not in answer.headers.get("Transfer-Encoding", "").lower()
            )
        shortest = scrub.shortest
        # The reason phrase is the upstream's text too: an echo of the key there would
        # reach the app in the status line.
        # Shortened only after the scrub: a cut through an echoed key would leave a piece
        # of it that no longer matches any spelling.
        self.reason = scrub(answer.reason)[:MAX_REASON] if answer.reason else answer.reason
        drop = _RESPONSE_DROP
        connection = answer.headers.getall("Connection", None)
        if connection:  # every Connection line counts, not only the first
            drop = drop | {t.strip().lower() for line in connection for t in line.split(",")}
        # A value shorter than every spelling of the key cannot hold one (most of them).
        # A name that holds the key (an upstream echoing parameters as X-Param-<value>)
        # takes the whole header with it: a name cannot be partly redacted.
        self.headers = [
            (name, scrub(value) if len(value) >= shortest else value)
            for name, value in answer.headers.items()
            if name.lower() not in drop and (len(name) < shortest or scrub(name) == name)
        ]


class Exchange:
    """One request and the way back to its app: what ``DataPlane.serve`` works with.

    A native base class in the compiled build, not a Protocol: the pipeline's calls on
    it are then direct (vtable) calls, where a Protocol's are generic Python ones, on
    every request. Subclasses set every attribute below in their ``__init__`` and
    declare only their own in ``__slots__``; tests never subclass it (mypyc forbids an
    interpreted subclass of a compiled class).
    """

    __slots__ = ("body", "body_ready", "headers", "method", "origin", "raw_path", "refusal", "tunnel_client_id")

    method: str
    raw_path: str
    #: What identity reads; ``outgoing()`` is what goes upstream.
    headers: HeaderReader
    #: Inside an intercepted CONNECT: the origin it named (None elsewhere) ...
    origin: tuple[str, int] | None
    #: ... and the client it named (``IdentityResolver.proxy_client_id``), if any.
    tunnel_client_id: str | None
    #: Refused before routing, decided by the server that parsed the head (None: go on).
    refusal: SidecarError | None
    #: The body is here already (``body``, None for none): the pipeline awaits nothing for
    #: it. False: ``read_body()`` gets it.
    body_ready: bool
    body: bytes | None

    def outgoing(self) -> CIMultiDict[str]:
        """The headers to send upstream: a copy the pipeline edits in place."""
        raise NotImplementedError

    async def read_body(self) -> tuple[bytes | StreamReader | None, bool]:
        """The body to send when ``body_ready`` is False, and whether a replay may send it again."""
        return self.body, True

    def refuse(self, err: SidecarError, phrase: str | None = None) -> None:
        """Answer with the contract's JSON error (the pipeline decided its status, phrase and headers)."""
        raise NotImplementedError

    async def relay(self, answer: UpstreamAnswer, head: ResponseHead) -> bool:
        """Send the upstream's answer back; False if either side broke off mid-body."""
        raise NotImplementedError
