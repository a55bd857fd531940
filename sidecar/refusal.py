"""The HTTP shape of a refusal: status line, headers and the contract's JSON body.

Every refusal the sidecar answers, whichever server or handler decided it, takes its
shape here: ``error_response`` for aiohttp's server, ``error_bytes`` for the lean
server and CONNECT, which write their answers by hand.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web

from sidecar.errors import SidecarError

RETRY_AFTER_SECONDS = "5"
#: Access-log modes whose refusals carry their code as the reason phrase (``reason_phrase``):
#: absolute-form requests and requests inside an intercepted CONNECT. CONNECT itself always does.
CODE_PHRASE_MODES = frozenset({"proxy", "mitm"})


def error_headers(err: SidecarError) -> dict[str, str]:
    """The headers of a refusal besides its framing; the one place refusals take shape."""
    headers = {"X-Sidecar-Error": err.code, "Cache-Control": "no-store"}
    if err.code == "invalid_token":
        # RFC 6750 section 3: a refused bearer token is named as such, for OAuth clients.
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if err.status == 503:
        # The store or the identity provider is failing. The cache retries the store this
        # often and the provider's keys are retried in the background: sooner is pointless.
        headers["Retry-After"] = RETRY_AFTER_SECONDS
    return headers


def reason_phrase(err: SidecarError, mode: str) -> str:
    """The status line's reason phrase for a refusal: its code in forward-proxy modes, else the standard one.

    A proxy client (requests, httpx, aiohttp, urllib, curl) shows the app the status line
    of a refused CONNECT and nothing else, and an app unaware of the sidecar (HTTP_PROXY,
    HTTPS_PROXY) reads every refusal through such messages (``403 Client Error:
    destination_not_allowed``). Route mode keeps the standard phrases: an app that calls the
    sidecar by name reads X-Sidecar-Error and the body.
    """
    return err.code if mode in CODE_PHRASE_MODES else HTTPStatus(err.status).phrase


def error_bytes(err: SidecarError, *, close: bool, extra: bytes = b"", phrase: str | None = None) -> bytes:
    """The same refusal written by hand (the lean server, CONNECT); ``extra``: more header lines.

    ``phrase``: the reason phrase (``reason_phrase``); the standard one when None.
    """
    body = err.body()
    head = [f"HTTP/1.1 {err.status} {phrase or HTTPStatus(err.status).phrase}\r\n"]
    head += [f"{name}: {value}\r\n" for name, value in error_headers(err).items()]
    head.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    if close:
        head.append("Connection: close\r\n")
    return "".join(head).encode("ascii") + extra + b"\r\n" + body


def error_response(err: SidecarError, phrase: str | None = None) -> web.Response:
    """The contract's JSON error with ``X-Sidecar-Error`` as an aiohttp response (``phrase`` as in error_bytes)."""
    return web.Response(
        status=err.status, reason=phrase, body=err.body(), content_type="application/json",
        headers=error_headers(err),
    )
