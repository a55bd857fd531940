"""Header mode: the client ID the MCP server forwards in a header, trusted as it is.

Whoever can reach the sidecar's port can name any client, so the pod is the trust
boundary. A client ID given to the proxy itself (a Basic ``Proxy-Authorization``
user name, or the header on a CONNECT; see ``base``) applies to the requests it
covers; a request naming someone else is refused.
"""

from __future__ import annotations

from sidecar.config import IdentitySettings
from sidecar.errors import MissingIdentity
from sidecar.identity.base import (
    PROXY_AUTHORIZATION,
    HeaderReader,
    Identity,
    conflicting_identity,
    proxy_user,
    single_header,
    validate_client_id,
)


class HeaderIdentity:
    """Trust the client ID the MCP server forwards in a header (``X-Client-Id``)."""

    def __init__(self, settings: IdentitySettings) -> None:
        self.header = settings.header
        self.default = settings.default_client_id
        self.strip_headers = frozenset({settings.header.lower()})
        # An identity header named Proxy-Authorization is read as it is, not as Basic.
        self._proxy_auth = settings.header.lower() != PROXY_AUTHORIZATION.lower()

    def proxy_client_id(self, headers: HeaderReader, *, connect: bool) -> str | None:
        named = (single_header(headers, self.header) or None) if connect else None
        user = proxy_user(headers) if self._proxy_auth else None
        if named is not None and user is not None and named != user:
            raise conflicting_identity(self.header)
        value = named or user
        return None if value is None else validate_client_id(value)

    async def resolve(self, headers: HeaderReader, proxy_client_id: str | None = None) -> Identity:
        value = single_header(headers, self.header)
        if proxy_client_id is not None:
            # Equal is fine (an app naming itself both ways); a different one is refused.
            if value and value != proxy_client_id:
                raise conflicting_identity(self.header)
            return Identity(proxy_client_id, "proxy")
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
