"""The upstream side's one error table: which failure becomes which refusal, and how it is counted.

Both clients raise the contract's errors (sidecar.errors) and build the common
ones here; whatever a library raises past them (aiohttp, ssl, asyncio, OSError)
``translate`` maps, never copying its text, which may name an address or quote an
answer. ``count`` is the one place an upstream error is counted
(``sidecar_upstream_errors_total{upstream, kind}``), by the refusal's reason.

CONNECT tunnels dial too (``tunnel``): their refusals keep their own reasons
(``dns_timeout``, ``connect_timeout``, ``connect``) and, as a tunnel names no
upstream, are never counted here.

Compiled (setup.py): the lean client, compiled, builds its refusals with these.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
from prometheus_client import Counter

from sidecar.errors import DestinationNotAllowed, SidecarError, UpstreamTimeout, UpstreamUnreachable
from sidecar.metrics import UPSTREAM_ERRORS
from sidecar.transport.aio import ForbiddenAddressError

#: The kinds an upstream error is counted as (the metric's ``kind`` label).
COUNTED_KINDS = ("connect", "tls", "timeout", "protocol", "forbidden_address")
#: A refusal's reason -> the kind it is counted as; a reason not here is not counted.
KINDS: dict[str, str] = {
    "connect": "connect", "dns": "connect", "tls": "tls", "connect_timeout": "timeout",
    "protocol": "protocol", "forbidden_address": "forbidden_address", "timeout": "timeout",
}
#: A CONNECT tunnel's stage -> the reason its timeout is refused with.
_TUNNEL_TIMEOUTS: dict[str, str] = {"dns": "dns_timeout", "connect": "connect_timeout"}


def tls_failed() -> UpstreamUnreachable:
    return UpstreamUnreachable("The TLS handshake with the upstream failed.", reason="tls")


def connect_failed() -> UpstreamUnreachable:
    return UpstreamUnreachable("The connection to the upstream failed.", reason="connect")


def malformed() -> UpstreamUnreachable:
    return UpstreamUnreachable("The upstream answered with a malformed response.", reason="protocol")


def connect_timeout() -> UpstreamTimeout:
    """Connecting (name resolution and the TLS handshake included) did not finish in time."""
    return UpstreamTimeout(reason="connect_timeout")


def head_timeout() -> UpstreamTimeout:
    """The answer's head did not arrive in time."""
    return UpstreamTimeout(reason="timeout")


def forbidden_address(upstream: str) -> DestinationNotAllowed:
    """The refusal of an upstream that resolves only to guarded addresses, naming the opt-in.

    Only ever for a configured upstream: the operator chose its host, so pointing at
    ``allow_private`` is the right advice for an internal API (and wrong for anything else).
    """
    return DestinationNotAllowed(
        f"Upstream {upstream} resolves only to private, loopback, link-local or reserved addresses, "
        f"which the sidecar does not reach by default; for an internal API, set allow_private: true "
        f"on upstreams.{upstream}.",
        reason="forbidden_address",
    )


def translate(exc: BaseException) -> SidecarError:
    """Map an aiohttp/ssl/OS exception that escaped a client to the contract's error; never copies its text."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ForbiddenAddressError):
            return os_error.refusal()
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return tls_failed()
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return head_timeout()
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionError)):
        return connect_failed()
    return malformed()


def counters(upstream: str) -> dict[str, Counter]:
    """The upstream's error counters, one per kind, labelled once (not per error)."""
    return {kind: UPSTREAM_ERRORS.labels(upstream, kind) for kind in COUNTED_KINDS}


def count(errors: dict[str, Counter], err: SidecarError) -> None:
    """Count ``err`` under its kind if it is an upstream error (a refusal of ours is not)."""
    kind = KINDS.get(err.reason)
    if kind is not None:
        errors[kind].inc()


def tunnel(stage: str, exc: OSError) -> SidecarError:
    """A CONNECT tunnel's dial failure at ``stage`` ("dns" or "connect") as its refusal (not counted)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(reason=_TUNNEL_TIMEOUTS[stage])
    return UpstreamUnreachable("The connection to the tunnel destination failed.", reason="connect")
