"""The one identity factory: header mode, or JWT mode when ``identity.jwt`` is configured.

The JWT module is imported only then: it loads PyJWT and cryptography, which header
mode never needs.
"""

from __future__ import annotations

from sidecar.config import IdentitySettings
from sidecar.identity.base import IdentityResolver
from sidecar.identity.header import HeaderIdentity


def build_identity_resolver(settings: IdentitySettings) -> IdentityResolver:
    """Header mode, or JWT mode when ``identity.jwt`` is configured."""
    if settings.jwt:
        from sidecar.identity.jwt_bearer import JwtIdentity

        return JwtIdentity(settings)
    return HeaderIdentity(settings)
