"""Request headers in, client ID out: what the identity modes share.

Header mode (``sidecar/identity/header.py``) trusts the pod: whoever can reach the
sidecar's port can name any client. JWT mode (``identity.jwt``,
``sidecar/identity/jwt_bearer.py``) takes the client ID from a token whose
signature the sidecar verifies itself. ``sidecar/identity/factory.py`` builds one.

An app may also name itself to the proxy rather than on each request: the
identity header on a CONNECT, or the user name of a Basic ``Proxy-Authorization``
(``HTTPS_PROXY=http://alice@127.0.0.1:8080``) on a CONNECT or an absolute-form
request. ``proxy_client_id`` reads it; header mode applies it to the requests it
covers (a request naming someone else is refused), JWT mode refuses it (a user
name is not a verified identity). It is never ignored.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.client_id import CLIENT_ID_PATTERN
from sidecar.errors import BadRequest, InvalidClientId
from sidecar.secrets.base import Secret


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the client ID, and for JWT callers the scopes and groups held.

    ``token``: JWT mode, the caller's verified token itself, for ``token_exchange``
    (credentials/oauth.py) to exchange; never forwarded, never compared or printed.
    """

    client_id: str
    source: str = "header"  # header | jwt | default
    scopes: frozenset[str] = field(default_factory=frozenset)
    token: Secret | None = field(default=None, compare=False, repr=False)


#: Request headers as aiohttp hands them over (case-insensitive multidict).
HeaderReader = CIMultiDictProxy[str] | CIMultiDict[str]


class IdentityResolver(Protocol):
    """Turns request headers into an Identity or raises a SidecarError."""

    #: lower-case header names that carried identity; they never reach the upstream
    strip_headers: frozenset[str]

    @property
    def ready(self) -> bool:
        """True once identities can be checked (JWT mode: the signing keys are loaded)."""

    async def wait_ready(self) -> None:
        """Return once ``ready`` is true."""

    async def start(self, *, wait: bool = True) -> None:
        """Warm up: JWT mode starts loading the keys, retried in the background until they
        load. With ``wait``, return once the first attempt is over. Never raises."""

    def proxy_client_id(self, headers: HeaderReader, *, connect: bool) -> str | None:
        """The client ID given to the proxy itself (see the module docstring), validated; None if none.

        ``connect``: ``headers`` are a CONNECT's, where the identity header is one too.
        """

    async def resolve(self, headers: HeaderReader, proxy_client_id: str | None = None) -> Identity:
        """Who sent a request with ``headers``; ``proxy_client_id`` from ``proxy_client_id`` when given."""

    def retire(self) -> None:
        """A newer runtime replaced this one: stop background work (``close`` follows later)."""

    async def close(self) -> None: ...


def validate_client_id(client_id: str) -> str:
    """Refuse IDs that could escape a secret-name template (``/``, ``..``, ARNs, length)."""
    if CLIENT_ID_PATTERN.fullmatch(client_id) is None:
        raise InvalidClientId()
    return client_id


def single_header(headers: HeaderReader, name: str) -> str | None:
    """The one value of ``name``; two are refused, even equal ones (the contract's rule).

    Two identity lines are ambiguous however they compare: a hop in front of the sidecar
    may have read, or added, either one.
    """
    values = headers.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"The request carries more than one {name} header.", reason="duplicate_identity")
    return values[0]


#: The proxy's own credentials (RFC 9110 11.7.1); hop-by-hop, so never forwarded.
PROXY_AUTHORIZATION = "Proxy-Authorization"


def proxy_user(headers: HeaderReader) -> str | None:
    """The user name of a Basic ``Proxy-Authorization``; None when there is none, or it is empty.

    Only the name is kept: a password, if the app's proxy URL has one, is neither checked
    nor logged. Any other scheme is refused, not skipped: it could only be meant as an identity.
    """
    value = single_header(headers, PROXY_AUTHORIZATION)
    if value is None:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "basic":
        raise BadRequest(
            "Proxy-Authorization is read only as Basic credentials whose user name is the client ID.",
            reason="proxy_authorization",
        )
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest(
            "Proxy-Authorization holds no valid Basic credentials.", reason="proxy_authorization"
        ) from None
    return decoded.partition(":")[0] or None


def conflicting_identity(header: str) -> BadRequest:
    """Two client IDs for one request: which one a hop in front of the sidecar meant is unknowable."""
    return BadRequest(
        f"The client ID given to the proxy (Proxy-Authorization user, or {header} on the CONNECT) "
        f"and the {header} header differ.",
        reason="conflicting_identity",
    )


def claim_strings(claims: Mapping[str, object], *names: str) -> frozenset[str]:
    """Collect string values (space-separated or list) of the named claims."""
    out: set[str] = set()
    for name in names:
        value: object = claims.get(name)
        if value is None and "." in name:
            # A nested claim such as Keycloak's realm_access.roles.
            value = claims
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(v for v in value if isinstance(v, str))
    return frozenset(out)
