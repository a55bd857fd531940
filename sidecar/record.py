"""What one request did, as the access line and the metrics count it.

``Record`` is filled in as a request goes (by the data plane, the CONNECT handler
and aiohttp's error hook) and read once at its end by ``AccessLog.account``.
``RequestLine`` is what the access log and the router read of the request itself.
"""

from __future__ import annotations

from typing import Protocol


class Record:
    """What the access log line says about one request."""

    __slots__ = (
        "cache", "client_id", "credential", "destination", "error", "identity", "mode", "path", "reason", "status",
        "upstream",
    )

    def __init__(self) -> None:
        self.upstream = "-"
        self.path: str | None = None  # the request path without its query, once parsed
        self.destination: str | None = None  # forward-proxy mode: host[:port] the app named
        self.client_id: str | None = None
        self.identity: str | None = None
        self.cache: str | None = None
        self.credential: str | None = None  # the OAuth credential type; None for a stored key
        self.status = 0
        self.error: str | None = None
        self.reason: str | None = None
        self.mode = "route"


class RequestLine(Protocol):
    """What the access log and the router read of a request (aiohttp's or the fast server's)."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str: ...


class FixedLine:
    """A request line known without a request object: a CONNECT (its path is set on the
    Record), or a head aiohttp could not parse (method and path ``-``)."""

    __slots__ = ("method", "raw_path")

    def __init__(self, method: str, raw_path: str = "-") -> None:
        self.method = method
        self.raw_path = raw_path
