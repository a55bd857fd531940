"""Request headers in, client ID out: the forwarded header, or a verified JWT.

Header mode trusts the pod: whoever can reach the sidecar's port can name any
client. JWT mode (``identity.jwt``) takes the client ID from a token whose
signature the sidecar verifies itself; see ``sidecar/tokens.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import CLIENT_ID_PATTERN, IdentitySettings
from sidecar.errors import BadRequest, InvalidClientId, MissingIdentity


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the client ID, and for JWT callers the scopes and groups held."""

    client_id: str
    source: str = "header"  # header | jwt | default
    scopes: frozenset[str] = field(default_factory=frozenset)


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

    async def resolve(self, headers: HeaderReader) -> Identity: ...

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


class HeaderIdentity:
    """Trust the client ID the MCP server forwards in a header (``X-Client-Id``)."""

    def __init__(self, settings: IdentitySettings) -> None:
        self.header = settings.header
        self.default = settings.default_client_id
        self.strip_headers = frozenset({settings.header.lower()})

    async def resolve(self, headers: HeaderReader) -> Identity:
        value = single_header(headers, self.header)
        if value is None or value == "":
            if self.default is None:
                raise MissingIdentity(f"No {self.header} header and no default client ID.")
            return Identity(self.default, "default")
        return Identity(validate_client_id(value), "header")

    @property
    def ready(self) -> bool:
        return True

    async def wait_ready(self) -> None:
        return None

    async def start(self, *, wait: bool = True) -> None:
        return None

    def retire(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_identity_resolver(settings: IdentitySettings) -> IdentityResolver:
    """Header mode, or JWT mode when ``identity.jwt`` is configured."""
    if settings.jwt:
        from sidecar.tokens import JwtIdentity

        return JwtIdentity(settings)
    return HeaderIdentity(settings)


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
