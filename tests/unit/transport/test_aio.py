"""The aiohttp path's per-client share of an upstream (sidecar/transport/aio.py ClientShares)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.transport import aio
from sidecar.transport.aio import ClientShares


async def test_a_client_over_its_share_waits_for_its_own_answers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aio, "CLIENT_LIMIT", 2)
    shares = ClientShares()
    await shares.take("alice")
    await shares.take("alice")
    third = asyncio.ensure_future(shares.take("alice"))
    await asyncio.wait_for(shares.take("bob"), 1)  # bob is not behind alice
    await asyncio.sleep(0)
    assert not third.done()
    shares.give("alice")
    await asyncio.wait_for(third, 1)
    for client in ("alice", "alice", "bob"):
        shares.give(client)
    assert shares._by_client == {}  # nobody in flight: nothing kept


async def test_a_waiter_that_gives_up_leaves_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aio, "CLIENT_LIMIT", 1)
    shares = ClientShares()
    await shares.take("alice")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(shares.take("alice"), 0.05)
    shares.give("alice")
    assert shares._by_client == {}
    await asyncio.wait_for(shares.take("alice"), 1)  # the share is whole again
    shares.give("alice")
