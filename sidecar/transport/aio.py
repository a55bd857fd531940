"""The aiohttp client's pieces: per-client shares of its pool, the answer that holds one, the address guard.

``sidecar.upstream`` builds aiohttp's session from these and sends through it what
the lean client (``transport.fast``) does not carry: HEAD and streamed request bodies.
Left as Python (setup.py): ``ForbiddenAddressError`` subclasses OSError and
``GuardedResolver`` aiohttp's resolver, which mypyc cannot compile as native classes.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDictProxy

from sidecar.policy import allowed_addresses
from sidecar.transport.base import CLIENT_LIMIT

#: Headers aiohttp would add on its own; the sidecar forwards what the app sent, no more.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class _ClientSlots:
    """One client's share: a semaphore of CLIENT_LIMIT, and how many hold or wait for it."""

    __slots__ = ("semaphore", "users")

    def __init__(self) -> None:
        self.semaphore = asyncio.Semaphore(CLIENT_LIMIT)
        self.users = 0


class ClientShares:
    """Per client, the aiohttp-path answers in flight, at most CLIENT_LIMIT (the lean pool has its own).

    A client over its share waits (within the request's timeout) for one of its own
    answers to end; other clients never wait for it. Clients with nothing in flight
    cost nothing: their entry goes when its last user does.
    """

    def __init__(self) -> None:
        self._by_client: dict[str, _ClientSlots] = {}

    async def take(self, client: str) -> None:
        slots = self._by_client.get(client)
        if slots is None:
            slots = self._by_client[client] = _ClientSlots()
        slots.users += 1
        try:
            await slots.semaphore.acquire()
        except BaseException:
            self._leave(client, slots)
            raise

    def give(self, client: str) -> None:
        slots = self._by_client.get(client)
        if slots is not None:
            slots.semaphore.release()
            self._leave(client, slots)

    def _leave(self, client: str, slots: _ClientSlots) -> None:
        slots.users -= 1
        if slots.users == 0:
            del self._by_client[client]


class SharedAnswer:
    """aiohttp's answer, holding one of its client's shares until it is released or closed."""

    __slots__ = ("_answer", "_client", "_shares")

    def __init__(self, answer: aiohttp.ClientResponse, shares: ClientShares, client: str) -> None:
        self._answer = answer
        self._shares: ClientShares | None = shares
        self._client = client

    @property
    def status(self) -> int:
        return self._answer.status

    @property
    def reason(self) -> str | None:
        return self._answer.reason

    @property
    def content_length(self) -> int | None:
        return self._answer.content_length

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._answer.headers

    @property
    def content(self) -> aiohttp.StreamReader:
        return self._answer.content

    def _give(self) -> None:
        shares, self._shares = self._shares, None
        if shares is not None:
            shares.give(self._client)

    def close(self) -> None:
        self._answer.close()
        self._give()

    def release(self) -> Any:
        try:
            return self._answer.release()
        finally:
            self._give()


class ForbiddenAddressError(OSError):
    """Every address a name resolved to is loopback, private, link-local or reserved."""


class GuardedResolver(AbstractResolver):
    """Resolve, then keep only allowed addresses; the connector connects to what it returns."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        keep = set(allowed_addresses((r["host"] for r in results), allow_private=False))
        allowed = [r for r in results if r["host"] in keep]
        if not allowed:
            raise ForbiddenAddressError(f"{host} resolves only to addresses the sidecar may not reach")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
