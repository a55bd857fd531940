"""One client's traffic never reaches another: desynced upstream connections, stalled readers.

Issue 16, items 2 and 3, through the real CLI with a raw upstream and raw app sockets:

- An upstream that sends an answer nobody asked for can only ever reach the client
  whose connection it came on. The window is made deterministic here: the extra answer
  is held until the next request arrives on that connection, which is the moment it
  would pass for that request's own answer (on a busy machine the bytes can arrive in
  exactly that gap). The same goes for an app that smuggles a second request through
  an upstream's lenient parser, and for an upstream that answers a HEAD with a body.
- An app that stops reading a large answer loses it after ``timeout_seconds`` without
  progress, and its upstream connection with it; while it stalls, other clients are
  served from the rest of the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from sidecar.transport.base import CLIENT_LIMIT, POOL_LIMIT
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess, address
from tests.support.raw_http import (
    LoopThread,
    StreamServerMixin,
    assert_alive,
    assert_no_secret,
    exchange,
    get,
    running_sidecar,
)

#: Upstream timeout for the desync upstream; the stall tests use their own.
TIMEOUT = 3.0
#: How long a stalled reader may hold its answer in the stall test (the upstream's timeout_seconds).
STALL_TIMEOUT = 2.0
#: The big upstream's timeout in the pool test: long enough that no stall is cut while bob asks.
POOL_TIMEOUT = 20.0
BIG_BODY = 64 * 1024 * 1024
#: One more than the pool holds per upstream: an app that could take every connection does.
STALLED_STREAMS = POOL_LIMIT + 1
#: Client sides (name, environment): the lean client and aiohttp's client with both its parsers.
MODES = {
    "lean-client": {},
    "aiohttp-client": {"SIDECAR_UPSTREAM_CLIENT": "aiohttp"},
    "aiohttp-client-py-parser": {"SIDECAR_UPSTREAM_CLIENT": "aiohttp", "AIOHTTP_NO_EXTENSIONS": "1"},
}


def echo(target: str, method: str = "GET") -> bytes:
    """An answer whose body is the request target (the injected key included)."""
    body = target.encode("latin-1")
    if method == "HEAD":
        body = b""
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(target), body)


@dataclass
class DesyncUpstream(StreamServerMixin):
    """Answers each request, and on the paths below leaves an extra answer on the connection.

    Paths are ``/<upstream>/<kind>/...``. ``late``: the extra answer echoes this request's target and is written just
    before the answer to the next request on the same connection. ``lenient``:
    a POST whose body is read as a second request (Content-Length ignored), answered
    the same late way. ``head-body``: a HEAD answered with a body (itself a
    complete answer echoing the target in a header) that follows the head late, as ``late``. ``big``: a body of BIG_BODY bytes,
    written as fast as the reader takes it. Anything else: the echo.
    """

    thread_name = "desync-upstream"
    port: int = 0
    connections: int = 0
    #: (connection number, target) of every request, in order
    seen: list[tuple[int, str]] = field(default_factory=list)
    big_open: int = 0
    big_cut: int = 0  # big answers the sidecar stopped reading and closed
    _thread: LoopThread | None = None
    _server: asyncio.Server | None = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        pending = b""
        try:
            for _ in range(1000):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                self.seen.append((number, target))
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                kind = [*target.split("?")[0].split("/"), "", "", ""][2]  # /<upstream>/<kind>/...
                if kind == "lenient":
                    # The body is read as the next request on this connection.
                    smuggled = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                    inner = smuggled.split("\r\n")[0].split(" ")[1]
                    self.seen.append((number, inner))
                    writer.write(pending + echo(target))
                    pending = echo(inner)
                    continue
                if length:
                    await reader.readexactly(length)
                if kind == "big":
                    await self._big(writer)
                    continue
                answer = echo(target, method)
                writer.write(pending + answer)
                # late: an extra answer. head-body: the body of a HEAD answer (itself an
                # answer, echoing the target in a header: a HEAD's reader sees only the head).
                pending = b""
                if kind == "late":
                    pending = echo(target)
                elif kind == "head-body":
                    pending = b"HTTP/1.1 200 OK\r\nX-Echo: %s\r\nContent-Length: 0\r\n\r\n" % target.encode()
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _big(self, writer: asyncio.StreamWriter) -> None:
        self.big_open += 1
        piece = b"x" * (256 * 1024)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_BODY)
            for _ in range(BIG_BODY // len(piece)):
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, OSError):
            self.big_cut += 1
            raise
        finally:
            self.big_open -= 1


@pytest.fixture(scope="module")
def upstream() -> Iterator[DesyncUpstream]:
    server = DesyncUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {"alice": make_secret("iso-alice"), "bob": make_secret("iso-bob")}


def _config(workdir: Any, up: DesyncUpstream, keys: dict[str, str]) -> dict[str, Any]:
    path = workdir / "keys.yaml"
    path.write_text(yaml.safe_dump(keys), encoding="utf-8")
    common: dict[str, Any] = {"secret": "{client_id}", "inject": {"query": "apiKey"}, "allow_private": True}
    return {
        "secrets": {"backend": "file", "file": {"path": str(path)}},
        "upstreams": {  # one upstream server; the base path names the upstream
            name: {**common, "url": f"{up.url}/{name}", "timeout_seconds": timeout}
            for name, timeout in (("desync", TIMEOUT), ("stall", STALL_TIMEOUT), ("pool", POOL_TIMEOUT))
        },
    }


@pytest.fixture(scope="module", params=list(MODES))
def sc(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: DesyncUpstream,
    keys: dict[str, str],
) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("isolation")
    with running_sidecar(_config(workdir, upstream, keys), workdir, env=MODES[request.param],
                         name=f"isolation-{request.param}") as proc:
        yield proc


def _ask(sc: SidecarProcess, client: str, path: str, method: str = "GET", body: bytes = b"") -> Any:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nX-Client-Id: {client}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    ex = exchange(sc.url, (head + "\r\n").encode("latin-1") + body, head_only=method == "HEAD", timeout=TIMEOUT + 5)
    assert ex.responses, ex.raw[:300]
    return ex


# ------------------------------------------------------------------ item 2: answers nobody asked for


@pytest.mark.parametrize("kind", ["late", "lenient"])
def test_an_extra_answer_never_reaches_another_client(
    sc: SidecarProcess, upstream: DesyncUpstream, keys: dict[str, str], kind: str
) -> None:
    """alice's request leaves a second answer (echoing her key) on its connection; bob's
    request, sent next, must get his own answer, from a connection alice never used."""
    marker = f"{kind}-{time.monotonic_ns()}"
    if kind == "late":
        first = _ask(sc, "alice", f"/desync/late/{marker}")
    else:
        smuggled = f"GET /desync/ok/{marker}-smuggled?leak=alice HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        first = _ask(sc, "alice", f"/desync/lenient/{marker}", "POST", smuggled)
    assert first.first.status == 200 and keys["alice"] in first.first.body.decode(), first.text()
    for attempt in range(3):
        ex = _ask(sc, "bob", f"/desync/ok/{marker}-bob{attempt}")
        assert_no_secret([ex.raw], keys["alice"])
        assert ex.first.status in (200, 502), ex.text()
        if ex.first.status == 200:
            assert ex.first.body.decode().startswith(f"/desync/ok/{marker}-bob{attempt}?"), ex.text()
    _assert_bob_had_his_own_connections(upstream, marker)
    assert_alive(sc)


def _assert_bob_had_his_own_connections(upstream: DesyncUpstream, marker: str) -> None:
    alice_connections = {n for n, t in upstream.seen if marker in t and "bob" not in t}
    bob_connections = {n for n, t in upstream.seen if f"{marker}-bob" in t}
    assert alice_connections and bob_connections, upstream.seen
    assert not bob_connections & alice_connections, "bob was sent on alice's connection"


def test_a_head_answered_with_a_body_never_reaches_another_client(
    sc: SidecarProcess, upstream: DesyncUpstream, keys: dict[str, str]
) -> None:
    """HEAD goes through aiohttp's client, which leaves the body of a HEAD answer unread on
    the connection: the next request on it would read that as its own answer."""
    marker = f"head-{time.monotonic_ns()}"
    first = _ask(sc, "alice", f"/desync/head-body/{marker}", "HEAD")
    assert first.first.status == 200, first.text()
    for attempt in range(3):
        ex = _ask(sc, "bob", f"/desync/ok/{marker}-bob{attempt}", "HEAD")
        assert_no_secret([ex.raw], keys["alice"])
        assert ex.first.status in (200, 502), ex.text()
    _assert_bob_had_his_own_connections(upstream, marker)
    assert_alive(sc)


# ------------------------------------------------------------------ item 3: a reader that stalls


def _stalled_reader(sc: SidecarProcess, path: str, client: str = "alice") -> socket.socket:
    """Ask for a big answer and never read it (a tiny receive window fills at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(address(sc.url))
    sock.sendall(get(path, client))
    return sock


def _wait_for(condition: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - started


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_stalled_reader_loses_its_upstream_connection_after_timeout_seconds(
    sc: SidecarProcess, upstream: DesyncUpstream
) -> None:
    cut_before = upstream.big_cut
    sock = _stalled_reader(sc, "/stall/big/one")
    try:
        _wait_for(lambda: upstream.big_open >= 1, 5, "the upstream started the big answer")
        started = time.monotonic()
        _wait_for(lambda: upstream.big_cut > cut_before, STALL_TIMEOUT + 10, "the stalled answer was cut")
        # Not before the app had timeout_seconds to read: the cut is the stall rule, nothing else.
        assert time.monotonic() - started >= STALL_TIMEOUT * 0.5
        # The app sees a cut answer: the connection ends before the promised body did.
        sock.settimeout(10)
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received < BIG_BODY
    finally:
        sock.close()
    assert_alive(sc)


def test_one_client_that_stops_reading_cannot_take_the_pool_from_the_others(
    sc: SidecarProcess, upstream: DesyncUpstream, keys: dict[str, str]
) -> None:
    """alice opens more stalled answers than the pool has connections; bob is still served
    at once, and the sidecar's memory per stalled answer stays bounded."""
    assert sc.proc is not None
    rss_before = _rss_kib(sc.proc.pid)
    socks: list[socket.socket] = []
    try:
        for i in range(STALLED_STREAMS):
            socks.append(_stalled_reader(sc, f"/pool/big/{i}"))
        # Every connection alice may have is taken and stalled.
        _wait_for(lambda: upstream.big_open >= CLIENT_LIMIT, 30, "alice's stalled answers started")
        started = time.monotonic()
        ex = exchange(sc.url, get("/pool/ok/bob", "bob"), timeout=POOL_TIMEOUT + 5)
        took = time.monotonic() - started
        assert ex.first.status == 200 and ex.first.body.decode().startswith("/pool/ok/bob?"), ex.text()
        assert took < POOL_TIMEOUT / 2, f"bob waited {took:.1f} s for a connection alice held"
        assert_no_secret([ex.raw], keys["alice"])
        grown = _rss_kib(sc.proc.pid) - rss_before
        assert grown < STALLED_STREAMS * 1024, f"{grown} KiB for {STALLED_STREAMS} stalled answers"
    finally:
        for s in socks:
            s.close()
    _wait_for(lambda: upstream.big_open == 0, 30, "the stalled answers ended with their apps")
    assert_alive(sc)
