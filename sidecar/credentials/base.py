"""The credential provider: how the value for one caller and one upstream is got.

Providers are built per runtime (``app.Sidecar._build``, at start and on each reload)
and held by each ``Route``, never kept on an ``Upstream``: an upstream is reused across
reloads while the secret cache a provider reads is replaced when ``secrets`` changes.
A reload hands each provider the one it replaces (``factory.build_provider``), for
state that should outlive it (OAuth tokens), and retires and closes the replaced one
after the grace period, as it does an upstream it dropped.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from sidecar.identity.base import Identity
from sidecar.secrets.base import Secret


class CredentialProvider(Protocol):
    """What the data plane asks of a credential type (``api_key``: ``static.StaticKey``;
    the OAuth types: ``oauth``).

    A Protocol, not a base class, so a provider may be a plain Python class (the
    compiled build cannot subclass a compiled base from Python): the OAuth providers
    stay uncompiled, and tests may fake one. Each method may be an ``async def`` or a
    plain one returning an awaitable (StaticKey's ``get`` hands back the cache's own
    coroutine, so a request awaits no extra layer).
    """

    #: ``credential.type``: ``api_key``, ``oauth2_client_credentials``, ...
    kind: str

    def get(self, identity: Identity) -> Awaitable[tuple[Secret, str]]:
        """The value to inject for ``identity``, and the cache word of the access line
        (hit, miss, stale, negative). Refusals raise (NoCredential or SecretStoreUnavailable
        with the cache word in ``err.lookup``; the OAuth types' own codes).

        It takes the whole Identity, not the client ID: ``token_exchange`` exchanges the
        caller's own verified token, which it reads there.
        """
        ...

    def rejected(self, identity: Identity, value: Secret, status: int) -> Awaitable[Secret | None]:
        """The upstream answered ``status`` (401 or 403) to ``value``: a different current
        value to replay the request with once, or None (nothing better to be had, or a
        status this type does not replay on). Never raises a refusal: the upstream's
        answer then goes back as it is."""
        ...

    def prefetch(self, client_id: str) -> Awaitable[None]:
        """Load the value for ``client_id`` before the sidecar reports ready
        (``secrets.prefetch``). May raise NoCredential (logged, not retried) or
        SecretStoreUnavailable (retried until it succeeds)."""
        ...

    def retire(self) -> None:
        """A reload replaced this provider: start nothing new in the background.
        Requests in flight may still call it until it is closed."""
        ...

    def close(self) -> Awaitable[None]:
        """Release what the provider holds (a token endpoint's connections). Not its
        secret cache: the runtime owns that."""
        ...
