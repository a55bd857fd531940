"""The aiohttp side of the data plane: a request from aiohttp's low-level server as an ``Exchange``.

aiohttp's server (connect.py) parses what the lean server hands over (odd heads,
streamed bodies, HTTP/1.0) and every request inside an intercepted CONNECT;
``serve_request`` runs each through ``DataPlane.serve`` and returns the response
aiohttp finishes. Compiled like the lean server: intercepted traffic takes this path.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import StreamReader, web
from multidict import CIMultiDict

from sidecar.errors import BadRequest, SidecarError, UnsupportedHttpVersion
from sidecar.exchange import REPLAY_BODY_LIMIT, STREAM_BROKEN, Exchange, ResponseHead
from sidecar.pipeline import DataPlane
from sidecar.refusal import error_response
from sidecar.transport.base import UpstreamAnswer

#: Targets connect.py puts in place of a request's own when the head aiohttp parsed cannot be
#: served: a target aiohttp could not even turn into a URL, a version other than 1.0 and 1.1,
#: a Transfer-Encoding other than one final chunked. The exchange is refused before routing
#: (``_refuse_marked``), and its access line's path is ``-`` (the mark is no path).
MARK: Final = "\x00"
UNPARSEABLE_TARGET = MARK + "unparseable-target"
UNSUPPORTED_VERSION = MARK + "unsupported-version"
BAD_TRANSFER_ENCODING = MARK + "bad-transfer-encoding"


def _refuse_marked(raw: str) -> SidecarError:
    """The refusal for a request connect.py marked (see MARK)."""
    if raw == UNSUPPORTED_VERSION:
        return UnsupportedHttpVersion(reason="http_version")
    if raw == BAD_TRANSFER_ENCODING:
        return BadRequest(
            "Transfer-Encoding must be exactly chunked, once, in HTTP/1.1.", reason="transfer_encoding"
        )
    return BadRequest("The request target is not a valid URL.", reason="bad_target")


class _OneWriteResponse(web.StreamResponse):
    """A response whose headers go out with the first body chunk: one write, not two.

    Only used when the upstream announced a Content-Length, so there is a body
    coming right behind the headers (streams keep headers-first delivery).
    """

    _send_headers_immediately = False


class AioExchange(Exchange):
    """One request aiohttp's server parsed; ``response`` is what goes back once ``serve`` is done."""

    __slots__ = ("request", "response")  # the rest are Exchange's

    def __init__(
        self, request: web.BaseRequest, origin: tuple[str, int] | None, tunnel_client_id: str | None
    ) -> None:
        self.request = request
        self.method = request.method
        raw = request.raw_path
        self.raw_path = raw
        self.headers = request.headers
        self.origin = origin
        self.tunnel_client_id = tunnel_client_id
        self.refusal = _refuse_marked(raw) if raw.startswith(MARK) else None
        # No body: nothing to await. A body is read (or streamed) by read_body.
        self.body_ready = not request.body_exists
        self.body = None
        self.response: web.StreamResponse | None = None

    def outgoing(self) -> CIMultiDict[str]:
        return CIMultiDict(self.request.headers)

    async def read_body(self) -> tuple[bytes | StreamReader | None, bool]:
        request = self.request
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = request.content_length
        if length is not None and length <= REPLAY_BODY_LIMIT:
            return await request.read(), True  # small: kept so a rotation can replay it
        return request.content, False

    def refuse(self, err: SidecarError, phrase: str | None = None) -> None:
        self.response = error_response(err, phrase)

    async def relay(self, answer: UpstreamAnswer, head: ResponseHead) -> bool:
        request = self.request
        response = (_OneWriteResponse if head.framed else web.StreamResponse)(status=head.status, reason=head.reason)
        self.response = response
        out = response.headers
        for name, value in head.headers:
            out.add(name, value)
        if head.framed:
            response.content_length = head.length
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
            transport = request.transport
            if transport is not None:
                transport.close()
            return False
        except BaseException:
            answer.close()  # cancelled (the app hung up): never leave the upstream connection behind
            raise
        answer.release()
        await response.write_eof()
        return True


async def serve_request(
    plane: DataPlane,
    request: web.BaseRequest,
    origin: tuple[str, int] | None = None,
    tunnel_client_id: str | None = None,
) -> web.StreamResponse:
    """aiohttp's request handler: ``origin`` and ``tunnel_client_id`` for a request inside an
    intercepted CONNECT (the origin it named, and the client, ``IdentityResolver.proxy_client_id``)."""
    ex = AioExchange(request, origin, tunnel_client_id)
    await plane.serve(ex)
    response = ex.response
    assert response is not None  # serve() ends in relay() or refuse(), or raises
    return response
