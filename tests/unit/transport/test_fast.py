"""The lean upstream client against raw upstreams that misbehave on purpose."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import Awaitable, Callable

import httptools
import pytest
from multidict import CIMultiDict

from sidecar.errors import DestinationNotAllowed, UpstreamTimeout, UpstreamUnreachable
from sidecar.transport.fast import MAX_WARMING, FastPool, FastResponse, _Connection
from tests.support.upstream import closed_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawUpstream:
    """Counts connections and hands each one to a scripted handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            finally:
                writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


def pool(port: int, allow_private: bool = True, timeout: float = 2.0) -> FastPool:
    return FastPool("127.0.0.1", port, None, allow_private, timeout, f"127.0.0.1:{port}")


async def answer_ok_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """An upstream connection that answers one request with 200 "ok", then closes."""
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


def keep_alive_after(gate: asyncio.Event | None = None, on_request: Callable[[], None] | None = None) -> Handler:
    """An upstream connection that answers 200 "ok" to every request (each once ``gate``
    is set; ``on_request`` is told of each first) until the client closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            try:
                await read_head(reader)
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            if on_request is not None:
                on_request()
            if gate is not None:
                await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return handler


keep_alive = keep_alive_after()


async def body(resp: FastResponse) -> bytes:
    out = b""
    while chunk := await resp.readany():
        out += chunk
    resp.release()
    return out


async def get(p: FastPool, path: str = "/", client: str = "alice") -> bytes:
    """GET ``path`` through the pool for ``client``; the whole body."""
    return await body(await p.send("GET", path, CIMultiDict(), None, client))


async def test_keep_alive_reuses_one_connection_and_sends_one_clean_request() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for _ in range(3):
            seen.append(await read_head(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with RawUpstream(handler) as up:
        p = pool(up.port)
        headers = CIMultiDict({"X-A": "1", "Content-Length": "99", "Host": "evil"})
        for _ in range(3):
            assert await body(await p.send("GET", "/x?y=1", headers, None, "alice")) == b"ok"
        await p.close()
    assert up.connections == 1
    assert seen[0].startswith(b"GET /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    # The client frames the request itself: the app's Content-Length and Host never pass.
    assert b"Content-Length" not in seen[0] and b"evil" not in seen[0] and b"X-A: 1" in seen[0]


async def test_a_late_answer_on_an_idle_connection_is_never_paired_with_the_next_request() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
            await writer.drain()
            await asyncio.sleep(1)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
            await writer.drain()

    async with RawUpstream(handler) as up:
        p = pool(up.port)
        first = await p.send("GET", "/a", CIMultiDict(), None, "alice")
        assert first.status == 204 and await body(first) == b""
        await asyncio.sleep(0.4)  # the smuggled answer arrives while the connection idles
        assert await get(p, "/b") == b"real"
        await p.close()
    assert up.connections == 2


async def test_an_answer_smuggled_behind_a_complete_one_poisons_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with RawUpstream(handler) as up:
        p = pool(up.port)
        assert (await p.send("GET", "/a", CIMultiDict(), None, "alice")).status == 204
        assert await get(p, "/b") == b"real"
        await p.close()
    assert up.connections == 2


async def test_a_pooled_connection_closed_by_the_upstream_is_retried_once() -> None:
    # Each connection answers once and closes, as an upstream's idle timeout would.
    async with RawUpstream(answer_ok_once) as up:
        p = pool(up.port)
        assert await get(p, "/a") == b"ok"
        await asyncio.sleep(0.1)
        assert await body(await p.send("POST", "/b", CIMultiDict(), b"payload", "alice")) == b"ok"
        await p.close()
    assert up.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    ],
    ids=["huge-field", "too-many-headers", "unsolicited-101", "bad-status", "double-length"],
)
async def test_malformed_answers_become_upstream_unreachable(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.3)

    async with RawUpstream(handler) as up:
        p = pool(up.port)
        with pytest.raises(UpstreamUnreachable):
            await p.send("GET", "/", CIMultiDict(), None, "alice")
        await p.close()


async def test_interim_answers_are_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with RawUpstream(handler) as up:
        p = pool(up.port)
        resp = await p.send("GET", "/", CIMultiDict(), None, "alice")
        assert resp.status == 200 and "Link" not in resp.headers
        assert await body(resp) == b"ok"
        await p.close()


async def test_truncated_body_is_an_error_not_a_clean_end() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-some")
        await writer.drain()

    async with RawUpstream(handler) as up:
        p = pool(up.port)
        resp = await p.send("GET", "/", CIMultiDict(), None, "alice")
        with pytest.raises(ConnectionError):
            await body(resp)
        await p.close()


async def test_address_guard_refuses_loopback_without_allow_private() -> None:
    p = pool(9, allow_private=False)
    with pytest.raises(DestinationNotAllowed):
        await p.send("GET", "/", CIMultiDict(), None, "alice")


async def test_open_connections_are_capped_and_waiters_get_the_freed_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import sidecar.transport.fast

    monkeypatch.setattr(sidecar.transport.fast, "MAX_CONNECTIONS", 2)
    active = 0
    peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            while True:
                try:
                    await read_head(reader)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            active -= 1

    async with RawUpstream(handler) as up:
        p = pool(up.port)

        results = await asyncio.wait_for(asyncio.gather(*(get(p) for _ in range(8))), 10)
        await p.close()
    assert results == [b"ok"] * 8
    assert up.connections <= 2 and peak <= 2


async def test_closed_connections_are_freed_at_once_not_left_to_the_cycle_collector() -> None:
    """Pools close hundreds of upstream connections (expired, or at a reload). Each must go
    with its last reference: left in a reference cycle, they invite full collections, which
    took ~30 ms with boto3's objects in the heap and stalled every request in flight."""
    release = asyncio.Event()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with RawUpstream(keep_alive_after(release)) as up, RawUpstream(answer_ok_once) as once:
            # Three at once, then closed by the pool.
            p = pool(up.port)
            calls = [asyncio.ensure_future(p.send("GET", "/", CIMultiDict(), None, "alice")) for _ in range(3)]
            await asyncio.sleep(0.05)
            release.set()
            assert [await body(await c) for c in calls] == [b"ok"] * 3
            # One closed by the upstream after its answer.
            q = pool(once.port)
            assert await get(q) == b"ok"
            assert p.open_connections == 3
            await p.close()
            for _ in range(100):  # until every close has reached its pool
                if p.open_connections == 0 and q.open_connections == 0:
                    break
                await asyncio.sleep(0.01)
            assert (up.connections, p.open_connections, q.open_connections) == (3, 0, 0)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, (_Connection, httptools.HttpResponseParser))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []


async def test_a_bursts_connections_serve_the_next_burst_without_new_handshakes() -> None:
    """Connections opened for a burst stay pooled: the next burst reuses them rather
    than closing and reopening hundreds (that churn cost a 500-request burst ~15 ms)."""
    arrived = 0
    all_in = asyncio.Event()

    def count() -> None:  # answers are held until all 100 of a burst are in
        nonlocal arrived
        arrived += 1
        if arrived % 100 == 0:
            all_in.set()

    async with RawUpstream(keep_alive_after(all_in, count)) as up:
        p = pool(up.port)

        for burst in range(2):
            all_in.clear()
            assert await asyncio.wait_for(asyncio.gather(*(get(p) for _ in range(100))), 10) == [b"ok"] * 100
            assert up.connections == 100, f"burst {burst + 1}"
        await p.close()


async def test_the_connection_cap_holds_while_the_name_is_being_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connects count against MAX_CONNECTIONS from the start: requests and warms that all
    begin during a slow DNS lookup must not open more than the cap between them."""
    import sidecar.transport.fast

    monkeypatch.setattr(sidecar.transport.fast, "MAX_CONNECTIONS", 3)
    lookups: list[str] = []

    async def slow_lookup(host: str, port: int) -> list[str]:
        lookups.append(host)
        await asyncio.sleep(0.05)
        return ["127.0.0.1"]

    async with RawUpstream(keep_alive) as up:
        p = FastPool("slow.test", up.port, None, True, 2.0, f"slow.test:{up.port}", lookup=slow_lookup)
        for _ in range(5):
            p.key_wait("alice", 1)

        assert await asyncio.gather(*(get(p) for _ in range(10))) == [b"ok"] * 10
        assert up.connections <= 3 and p.open_connections <= 3
        assert lookups and set(lookups) == {"slow.test"}  # the name went through the lookup given
        await p.close()


async def test_a_request_waiting_for_its_key_gets_a_connection_opened_meanwhile() -> None:
    """A cold request's upstream connection is opened while its key is fetched."""
    async with RawUpstream(keep_alive) as up:
        p = pool(up.port)
        p.key_wait("alice", 1)
        p.key_wait("alice", -1)
        # The key came before the warmed connection was ready (a key from memory): the
        # request waits for that connection instead of opening a second one.
        assert await get(p, "/x") == b"ok"
        assert up.connections == 1  # no second handshake
        p.key_wait("alice", 1)  # an idle connection is there: nothing more is opened
        await asyncio.sleep(0.05)
        p.key_wait("alice", -1)
        assert up.connections == 1 and not p.warming
        assert await get(p, "/y") == b"ok"
        assert up.connections == 1
        await p.close()


async def test_a_burst_waiting_for_one_key_finds_one_connection_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests waiting for one key (a burst for a new client) find their connections
    open when it arrives: warming goes on past MAX_WARMING at a time, and stops at the
    number waiting."""
    import sidecar.transport.fast

    monkeypatch.setattr(sidecar.transport.fast, "MAX_WARMING", 4)
    async with RawUpstream(keep_alive) as up:
        p = pool(up.port)
        for _ in range(20):
            p.key_wait("alice", 1)
        assert p.warming <= 4
        for _ in range(200):
            if p.idle_connections == 20:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert (up.connections, p.idle_connections, p.warming) == (20, 20, 0)
        for _ in range(20):
            p.key_wait("alice", -1)  # the key arrived

        results = await asyncio.gather(*(get(p) for _ in range(20)))
        assert results == [b"ok"] * 20 and up.connections == 20  # no request connected on its own
        await p.close()


async def test_an_idle_connection_past_its_time_is_neither_used_nor_counted_as_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An expired idle connection is closed, not handed to a request (the upstream may be
    closing it at that moment) and not counted as ready for a request waiting for its key."""
    import sidecar.transport.fast

    monkeypatch.setattr(sidecar.transport.fast, "IDLE_SECONDS", 0.05)
    async with RawUpstream(keep_alive) as up:
        p = pool(up.port)
        assert await get(p) == b"ok"
        await asyncio.sleep(0.1)
        p.key_wait("alice", 1)  # the expired connection does not cover it: one is warmed
        for _ in range(100):
            if up.connections == 2 and not p.warming:
                break
            await asyncio.sleep(0.01)
        p.key_wait("alice", -1)
        assert up.connections == 2 and p.idle_connections == 1
        await asyncio.sleep(0.1)
        assert await get(p) == b"ok"
        assert up.connections == 3 and p.open_connections == 1  # a fresh connection; the expired ones closed
        await p.close()


async def test_callers_without_a_key_do_not_keep_the_pool_connecting() -> None:
    """Each wait allows one warm, and warming ends with the wait. Callers whose lookup fails
    (no key in the store) never take a connection: an upstream that drops idle connections
    at once must see one connect per such caller, not a refill of the pool each time."""
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        return  # closed at once

    async with RawUpstream(drop) as up:
        p = pool(up.port)
        for _ in range(10):
            p.key_wait("alice", 1)
            await asyncio.sleep(0.02)
            p.key_wait("alice", -1)  # the lookup failed: 403 no_credential, no upstream call
        await asyncio.sleep(0.1)
        assert 1 <= up.connections <= 10 and not p.warming
        await p.close()


async def test_warm_to_an_unreachable_upstream_is_silent_and_bounded() -> None:
    p = pool(closed_port())
    for _ in range(200):
        p.key_wait("alice", 1)
    assert p.warming <= MAX_WARMING
    await asyncio.sleep(0.2)
    assert not p.warming  # every attempt ended, none raised, and none started after the failures
    assert p._shares["alice"].warm_credits == 0
    with pytest.raises(UpstreamUnreachable):
        await p.send("GET", "/x", CIMultiDict(), None, "alice")  # the request itself reports the failure
    await p.close()


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout() -> None:
    """Name resolution, connect and TLS handshake share one timeout, reported as connect_timeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read()  # accepts TCP, never answers the ClientHello

    async with RawUpstream(silent) as up:
        p = FastPool("127.0.0.1", up.port, ssl.create_default_context(), True, 0.3, f"127.0.0.1:{up.port}")
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout) as info:
            await p.send("GET", "/x", CIMultiDict(), None, "alice")
        assert info.value.reason == "connect_timeout"
        assert asyncio.get_running_loop().time() - started < 2
        await p.close()


async def test_timeout_seconds_is_one_budget_for_the_connection_wait_and_the_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wait for a free connection and a slow head, each within the limit, together exceed it."""
    import sidecar.transport.fast

    monkeypatch.setattr(sidecar.transport.fast, "MAX_CONNECTIONS", 1)
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        await release.wait()  # the first request holds the only connection
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)
        await asyncio.sleep(0.35)  # the second one's head comes late
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with RawUpstream(handler) as up:
        p = pool(up.port, timeout=0.5)
        first = asyncio.ensure_future(get(p))
        while up.connections == 0:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        second = asyncio.ensure_future(p.send("GET", "/x", CIMultiDict(), None, "alice"))
        await asyncio.sleep(0.35)
        release.set()
        assert await first == b"ok"
        with pytest.raises(UpstreamTimeout):
            await second  # the old code gave each step its own 0.5 s and answered 200 at about 0.7 s
        assert loop.time() - started >= 0.45
        await p.close()


# ---------------------------------------------------------------- the pool is partitioned by client


async def test_a_connection_serves_one_client_only() -> None:
    """A connection alice used is never handed to bob, even idle and healthy: an answer
    left on it (which no check can tell from bob's own) could only ever reach alice."""
    async with RawUpstream(keep_alive) as up:
        p = pool(up.port)
        assert await get(p, "/a1", "alice") == b"ok"
        assert await get(p, "/b1", "bob") == b"ok"
        assert up.connections == 2  # bob did not take alice's idle connection
        assert await get(p, "/a2", "alice") == b"ok"
        assert await get(p, "/b2", "bob") == b"ok"
        assert up.connections == 2  # each reused their own
        assert (p.client_connections("alice"), p.client_connections("bob")) == (1, 1)
        await p.close()


async def test_one_client_cannot_take_every_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """alice's requests beyond her share wait for her own connections; bob's go at once."""
    import sidecar.transport.fast

    monkeypatch.setattr(sidecar.transport.fast, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(sidecar.transport.fast, "CLIENT_LIMIT", 3)
    gate = asyncio.Event()
    held = 0

    def arrived() -> None:
        nonlocal held
        held += 1

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            try:
                head = await read_head(reader)
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            if head.startswith(b"GET /hold"):
                arrived()
                await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with RawUpstream(handler) as up:
        p = pool(up.port, timeout=5)
        alice = [asyncio.ensure_future(get(p, "/hold", "alice")) for _ in range(5)]
        for _ in range(200):
            if held == 3:
                break
            await asyncio.sleep(0.01)
        assert held == 3 and p.client_connections("alice") == 3
        assert await asyncio.wait_for(get(p, "/free", "bob"), 2) == b"ok"  # the quarter left to others
        assert held == 3 and not any(a.done() for a in alice)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*alice), 5) == [b"ok"] * 5
        assert up.connections == 4 and p.client_connections("alice") <= 3
        await p.close()


async def test_a_full_pool_closes_another_clients_idle_connection_to_make_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sidecar.transport.fast

    monkeypatch.setattr(sidecar.transport.fast, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(sidecar.transport.fast, "CLIENT_LIMIT", 2)
    gate = asyncio.Event()
    async with RawUpstream(keep_alive_after(gate)) as up:
        p = pool(up.port)
        both = asyncio.gather(get(p, "/1", "alice"), get(p, "/2", "alice"))
        for _ in range(200):
            if up.connections == 2:
                break
            await asyncio.sleep(0.01)
        gate.set()
        assert await both == [b"ok", b"ok"]
        assert (p.open_connections, p.idle_connections) == (2, 2)
        assert await asyncio.wait_for(get(p, "/3", "bob"), 2) == b"ok"
        assert up.connections == 3  # bob opened his own ...
        assert p.open_connections == 2  # ... in place of alice's longest-idle one
        assert (p.client_connections("alice"), p.client_connections("bob")) == (1, 1)
        await p.close()


async def test_thousands_of_clients_stay_within_the_pool() -> None:
    """Each client gets its own connection; the pool stays at MAX_CONNECTIONS and forgets
    the clients whose connections it closed."""
    from sidecar.transport.fast import MAX_CONNECTIONS

    clients = MAX_CONNECTIONS + 44
    async with RawUpstream(keep_alive) as up:
        p = pool(up.port)
        for i in range(clients):
            assert await get(p, "/", f"client-{i}") == b"ok"
        assert up.connections == clients
        assert p.open_connections == MAX_CONNECTIONS
        assert len(p._shares) == MAX_CONNECTIONS  # one per client still holding a connection
        assert p.client_connections("client-0") == 0  # the longest idle went first
        assert p.client_connections(f"client-{clients - 1}") == 1
        await p.close()
