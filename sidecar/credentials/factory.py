"""One credential factory: an upstream's ``credential.type`` in, its provider out."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config import UpstreamSettings
from sidecar.credentials.base import CredentialProvider
from sidecar.credentials.oauth import build_oauth_provider
from sidecar.credentials.static import StaticKey
from sidecar.secrets.cache import SecretCache

KeyWait = Callable[[str, int], None]
#: (upstream settings, the runtime's secret cache, the upstream's key_wait, the provider
#: this one replaces on a reload or None) -> provider
Builder = Callable[[UpstreamSettings, SecretCache, KeyWait, CredentialProvider | None], CredentialProvider]


class CredentialBuildError(Exception):
    """A provider could not be built (a file it reads); the message names the setting, never a value."""


def _api_key(
    settings: UpstreamSettings, cache: SecretCache, key_wait: KeyWait, previous: CredentialProvider | None
) -> CredentialProvider:
    return StaticKey(settings, cache, key_wait)  # stateless but for the cache: nothing to carry over


def _oauth(
    settings: UpstreamSettings, cache: SecretCache, key_wait: KeyWait, previous: CredentialProvider | None
) -> CredentialProvider:
    try:
        provider = build_oauth_provider(settings, cache)  # reads client_secret_file, each reload again
    except (OSError, UnicodeDecodeError):
        raise CredentialBuildError(f"upstreams.{settings.name}.credential.client_secret_file: cannot be read") from None
    if previous is not None:
        provider.adopt(previous)  # a reload keeps the tokens got before
    return provider


#: ``credential.type`` -> how its provider is built. A new credential type is a module
#: in this package and a line here (plus its config).
BUILDERS: dict[str, Builder] = {
    "api_key": _api_key,
    "oauth2_client_credentials": _oauth,
    "oauth2_refresh_token": _oauth,
    "token_exchange": _oauth,
}


def credential_type(settings: UpstreamSettings) -> str:
    """The upstream's ``credential.type`` (``api_key`` when it has no ``credential:`` section)."""
    return settings.credential.type


def build_provider(
    settings: UpstreamSettings,
    cache: SecretCache,
    key_wait: KeyWait,
    previous: CredentialProvider | None = None,
) -> CredentialProvider:
    """The provider for one upstream in a new runtime; raises CredentialBuildError.

    ``previous``: the provider of the same upstream in the runtime being replaced (a
    reload), for state that should outlive it, such as an OAuth token cache. Its settings,
    its type or its secret cache may differ from the new ones: the builder decides what it keeps.
    """
    return BUILDERS[credential_type(settings)](settings, cache, key_wait, previous)
