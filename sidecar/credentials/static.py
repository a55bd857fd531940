"""``api_key``: the store holds the key itself, per client, under the upstream's secret id.

Compiled (setup.py): ``get`` runs on every request.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from sidecar.config import UpstreamSettings
from sidecar.identity.base import Identity
from sidecar.secrets.base import Secret
from sidecar.secrets.cache import SecretCache


class StaticKey:
    """A key read from the secret store through the cache: ``secret`` (the id template,
    ``{client_id}`` and ``{upstream}``) and ``secret_field`` (a JSON object's field).

    Holds nothing but the runtime's cache: a reload builds a new one, and nothing carries over.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        cache: SecretCache,
        key_wait: Callable[[str, int], None] | None = None,
    ) -> None:
        self.kind = "api_key"
        #: the secret's name for a client: the template with the upstream already filled in
        self.secret_id: Callable[..., str] = functools.partial(settings.secret.format, upstream=settings.name)
        self.field = settings.secret_field
        self.cache = cache
        #: the upstream connects for a client while its key is being fetched (SecretCache.get)
        self.key_wait = key_wait

    def get(self, identity: Identity) -> Awaitable[tuple[Secret, str]]:
        # A plain method handing back the cache's coroutine: the request awaits it directly.
        client = identity.client_id
        return self.cache.get(self.secret_id(client_id=client), self.field, self.key_wait, client)

    def rejected(self, identity: Identity, value: Secret, status: int) -> Awaitable[Secret | None]:
        # 401 and 403 alike: APIs answer either to a revoked key; a rotated one in the
        # store (the cache reads it again) is the value to replay with.
        return self.cache.refresh_rejected(self.secret_id(client_id=identity.client_id), self.field, value)

    async def prefetch(self, client_id: str) -> None:
        await self.cache.get(self.secret_id(client_id=client_id), self.field)

    def retire(self) -> None:
        pass

    async def close(self) -> None:
        pass
