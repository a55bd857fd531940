"""The address guard on the upstream side, in process: both clients, one guard, names answered by the test.

A name is answered by a ``lookup`` the test passes in (no real DNS), so a name can
"rebind" to a loopback address; the guard (``net.resolve_allowed``) must refuse it
before either client connects, whichever of the two would carry the request.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import pytest
from multidict import CIMultiDict

from sidecar.config import UpstreamSettings, parse_settings
from sidecar.errors import DestinationNotAllowed, UpstreamUnreachable
from sidecar.metrics import REGISTRY
from sidecar.net import resolve_allowed
from sidecar.transport.aio import ForbiddenAddressError, GuardedResolver
from sidecar.upstream import Upstream
from tests.support.tls import Canary


def fixed(table: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    """A lookup that answers from ``table``; a name not in it does not resolve."""

    async def lookup(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "not in the table")
        return table[host]

    return lookup


GUARD_TABLE = [
    ("public.test", ["93.184.216.34"], ["93.184.216.34"]),
    ("mixed.test", ["10.0.0.5", "93.184.216.34"], ["93.184.216.34"]),
    ("metadata.test", ["169.254.169.254"], None),
    ("imds6.test", ["fd00:ec2::254"], None),
    ("loop.test", ["127.0.0.1", "::1"], None),
    ("private.test", ["10.1.2.3", "172.16.0.1", "192.168.1.1"], None),
    ("cgnat.test", ["100.64.0.1"], None),
    ("mapped.test", ["::ffff:10.0.0.1"], None),
    ("sixtofour.test", ["2002:a00:1::"], None),
    ("nat64.test", ["64:ff9b::a00:1"], None),
    ("teredo.test", ["2001::1"], None),
    ("multicast.test", ["224.0.0.1"], None),
    ("unspecified.test", ["0.0.0.0"], None),
    ("compat.test", ["::127.0.0.1"], None),
    ("sitelocal.test", ["fec0::1"], None),
    ("nat64local.test", ["64:ff9b:1::a00:1"], None),
    ("public6.test", ["2606:4700:4700::1111"], ["2606:4700:4700::1111"]),
]


@pytest.mark.parametrize(("name", "answers", "kept"), GUARD_TABLE)
async def test_the_guard_table(name: str, answers: list[str], kept: list[str] | None) -> None:
    """The lean client's guard (resolve_allowed) and aiohttp's (GuardedResolver) keep the same addresses."""
    lookup = fixed({name: answers})
    resolver = GuardedResolver(lookup)
    if kept is None:
        with pytest.raises(DestinationNotAllowed):
            await resolve_allowed(name, 80, False, lookup=lookup)
        with pytest.raises(ForbiddenAddressError):
            await resolver.resolve(name, 80, socket.AF_UNSPEC)
    else:
        assert await resolve_allowed(name, 80, False, lookup=lookup) == kept
        assert [r["host"] for r in await resolver.resolve(name, 80, socket.AF_UNSPEC)] == kept
    # allow_private (an internal API) lets every answer through, in order, once each
    assert await resolve_allowed(name, 80, True, lookup=lookup) == list(dict.fromkeys(answers))


async def test_a_name_that_does_not_resolve() -> None:
    with pytest.raises(UpstreamUnreachable) as caught:
        await resolve_allowed("nowhere.test", 80, False, lookup=fixed({}))
    assert caught.value.reason == "dns"
    with pytest.raises(OSError):  # aiohttp's connector wraps it as for its own resolvers
        await GuardedResolver(fixed({})).resolve("nowhere.test", 80, socket.AF_UNSPEC)


def _settings(port: int) -> UpstreamSettings:
    return parse_settings(
        {
            "secrets": {"backend": "aws"},
            "upstreams": {
                "rebind": {"url": f"http://rebind.test:{port}", "secret": "{client_id}", "inject": {"query": "k"}}
            },
        }
    ).upstreams["rebind"]


def _forbidden_count() -> float:
    value = REGISTRY.get_sample_value("sidecar_upstream_errors_total", {"upstream": "rebind", "kind": "forbidden_address"})
    return value or 0.0


@pytest.mark.parametrize("lean", [True, False], ids=["lean-client", "aiohttp-client"])
async def test_rebinding_name_is_refused_by_the_connection_itself(lean: bool) -> None:
    """A name that resolves to loopback (DNS rebinding) is refused before any connection, by either client."""
    canary = Canary()
    try:
        upstream = Upstream(_settings(canary.port), lean=lean, lookup=fixed({"rebind.test": ["127.0.0.1"]}))
        await upstream.start()
        # The request below goes through the client under test, not the other one.
        assert (upstream._pick("GET", None) is not None) is lean
        before = _forbidden_count()
        try:
            with pytest.raises(DestinationNotAllowed) as caught:
                await upstream.send("GET", "/", CIMultiDict(), None, "alice")
        finally:
            await upstream.close()
        assert caught.value.reason == "forbidden_address"
        assert "upstreams.rebind" in caught.value.message  # the upstream's own opt-in, for both clients
        assert _forbidden_count() == before + 1  # counted once, as an upstream error
        assert canary.connections == 0
    finally:
        canary.close()
