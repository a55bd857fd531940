"""aiohttp's server, for the connections the lean server hands over and for intercepted TLS.

What aiohttp would do on its own and the contract does not allow is changed here: a head
its parsers accept but the contract refuses is marked for the pipeline to refuse
(``head_refusal``), a request it cannot parse gets the contract's JSON error instead of a
text body quoting the offending line (``AioRequestHandler.handle_error``), and its
pure-Python parser stops upper-casing methods. Not compiled: the classes here subclass
aiohttp's own, and one has its ``__class__`` assigned.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from yarl import URL

from sidecar import metrics
from sidecar.errors import BadRequest, SidecarError, UnsupportedHttpVersion
from sidecar.listen.aio_exchange import BAD_TRANSFER_ENCODING, UNPARSEABLE_TARGET, UNSUPPORTED_VERSION
from sidecar.record import FixedLine, Record
from sidecar.refusal import error_response

if TYPE_CHECKING:
    from sidecar.pipeline import DataPlane

#: aiohttp's server (requests the lean server hands over: heads over 16 KiB or not
#: ASCII; intercepted TLS) closes a connection waiting this long for a request head,
#: idle or part-way through one. Its own default, 3630 s, let a head that never ends
#: hold up to 128 header lines of 32 KiB for an hour, before any identity check.
HTTP_WAIT_SECONDS = 30.0
#: llhttp's reason for a well-formed ``HTTP/d.d`` it does not know (1.2, 3.0): a 505, where
#: its other version errors ("Invalid major version", "Expected dot") are garbage, a 400.
LLHTTP_UNKNOWN_VERSION = "Invalid HTTP version"
_ROOT = URL.build(path="/", encoded=True)
_UNPARSED = FixedLine("-")


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


class AioRequestHandler(RequestHandler):
    """aiohttp's connection handler, with the contract's JSON error for requests it cannot parse.

    aiohttp answers a malformed request (bad framing, a header over the size limit)
    with a text body that quotes the offending line, which may hold a token.
    """

    plane: DataPlane
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
        self.plane.access_log.account(_UNPARSED, rec, 0.0, timed=False, inflight=False)
        response = error_response(err)
        response.force_close()
        return response


class AioServer(web.Server):
    """Makes ``AioRequestHandler``s (aiohttp's Server is the protocol factory)."""

    def __init__(self, plane: DataPlane, loop: asyncio.AbstractEventLoop, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.plane = plane
        self.loop = loop
        # What RequestHandler takes; handler_cancellation is the Server's own setting.
        self.handler_kwargs = {k: v for k, v in kwargs.items() if k != "handler_cancellation"}

    def __call__(self) -> AioRequestHandler:
        handler = AioRequestHandler(self, loop=self.loop, **self.handler_kwargs)
        handler.plane = self.plane
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
