"""The lean server (sidecar/fastserver.py) through the real CLI, on raw sockets.

It serves simple HTTP/1.1 requests itself and hands a connection to aiohttp at the
first request it does not serve; these tests drive both kinds on one connection,
pipelining, framing of what goes back, and keep-alive, the way an app's HTTP
client would. Every test runs with the fast server and with SIDECAR_SERVER=aiohttp:
the two must not differ in anything an app can see.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.access_log import AccessLog
from sidecar.config import IdentitySettings
from sidecar.identity.header import HeaderIdentity
from sidecar.listen import fast as fastserver
from sidecar.pipeline import DataPlane, Runtime
from sidecar.routing import Routes
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.upstream import EchoUpstream


@pytest.fixture(scope="module", params=["fast", "aiohttp"])
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    return {"alice": make_secret("fs-alice"), "bob": make_secret("fs-bob")}


@pytest.fixture
def sidecar(
    start_sidecar: Callable[..., SidecarProcess], echo: EchoUpstream, tmp_path: Path, keys: dict[str, str],
    server_kind: str,
) -> SidecarProcess:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({f"mcp/polygon/{k}": v for k, v in keys.items()}), encoding="utf-8")
    return start_sidecar(
        {
            "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
            "upstreams": {
                "polygon": {
                    "url": echo.url,
                    "secret": "mcp/polygon/{client_id}",
                    "inject": {"query": "apiKey"},
                    "allow_private": True,
                },
            },
        },
        env={"SIDECAR_SERVER": server_kind},
    )


class Conn:
    """A raw keep-alive connection that reads one response at a time."""

    def __init__(self, sc: SidecarProcess) -> None:
        self.sock = sc.connect()
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a response head: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                assert self._fill(), "connection closed mid-body"
            body, self.buf = self.buf[:n], self.buf[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    assert self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    assert self._fill()
                body += self.buf[:size]
                assert self.buf[size : size + 2] == b"\r\n"
                self.buf = self.buf[size + 2 :]
                if size == 0:
                    break
        else:
            body = b""
        return status, headers, body

    def closed_by_peer(self) -> bool:
        try:
            return not self._fill() and self.buf == b""
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def get(path: str, client: str = "alice", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: sidecar\r\nX-Client-Id: {client}\r\n{extra}\r\n".encode()


def test_pipelined_requests_answer_in_order_with_each_clients_key(
    sidecar: SidecarProcess, keys: dict[str, str]
) -> None:
    conn = Conn(sidecar)
    conn.send(get("/polygon/echo/one?x=1") + get("/polygon/echo/two", "bob") + get("/polygon/echo/three"))
    answers = [conn.response() for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    seen = [json.loads(a[2]) for a in answers]
    assert [s["raw_path"].split("?")[0] for s in seen] == ["/echo/one", "/echo/two", "/echo/three"]
    assert seen[0]["query"] == f"x=1&apiKey={keys['alice']}"
    assert seen[1]["query"] == f"apiKey={keys['bob']}"
    for s in seen:
        assert "x-client-id" not in {k.lower() for k, _ in s["headers"]}
    conn.close()


def test_head_arriving_a_byte_at_a_time(sidecar: SidecarProcess) -> None:
    conn = Conn(sidecar)
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in get("/polygon/echo/bytewise"):
        conn.send(bytes([byte]))
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["raw_path"].startswith("/echo/bytewise?")
    conn.close()


def test_requests_the_fast_path_does_not_serve_share_the_connection(sidecar: SidecarProcess) -> None:
    """A plain GET, then a chunked upload (aiohttp's), then a GET: one connection, three answers."""
    conn = Conn(sidecar)
    conn.send(get("/polygon/echo/first"))
    assert conn.response()[0] == 200
    payload = b"0123456789" * 1000
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    conn.send(
        b"POST /polygon/upload HTTP/1.1\r\nHost: s\r\nX-Client-Id: alice\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
    )
    status, _, body = conn.response()
    assert status == 200
    assert json.loads(body) == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    conn.send(get("/polygon/echo/third"))
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["raw_path"].startswith("/echo/third?")
    conn.close()


def test_content_length_body_arrives_whole_and_split(sidecar: SidecarProcess) -> None:
    conn = Conn(sidecar)
    payload = bytes(range(256)) * 300  # 76.8 kB, binary
    head = (
        b"POST /polygon/upload HTTP/1.1\r\nHost: s\r\nX-Client-Id: alice\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(payload)
    )
    conn.send(head + payload[:1000])
    conn.send(payload[1000:])
    status, _, body = conn.response()
    assert status == 200
    assert json.loads(body) == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    # The same again on the same connection, head and body in 1 KiB segments.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = head + payload
    for i in range(0, len(data), 1024):
        conn.send(data[i : i + 1024])
    status, _, body = conn.response()
    assert status == 200
    assert json.loads(body) == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    conn.close()


def test_requests_arriving_in_pieces_on_many_connections_each_keep_their_own_bytes(
    sidecar: SidecarProcess,
) -> None:
    """The lean server reads every connection into one receive buffer: a piece must be
    taken out of it before the next read, whichever connection that read is for."""
    conns = [Conn(sidecar) for _ in range(8)]
    payloads = [bytes([i]) * 5000 + f"connection {i}".encode() for i in range(len(conns))]
    requests = [
        b"POST /polygon/upload HTTP/1.1\r\nHost: s\r\nX-Client-Id: %s\r\nContent-Length: %d\r\n\r\n"
        % (b"alice" if i % 2 else b"bob", len(payload)) + payload
        for i, payload in enumerate(payloads)
    ]
    for conn in conns:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Heads and bodies cut mid-way, sent round-robin: reads of the connections alternate.
    cuts = [0, 30, 70, 2000, 4000, None]
    for start, end in itertools.pairwise(cuts):
        for conn, request in zip(conns, requests, strict=True):
            conn.send(request[start:end])
    for conn, payload in zip(conns, payloads, strict=True):
        status, _, body = conn.response()
        assert status == 200
        assert json.loads(body) == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        conn.close()


def test_answers_arriving_in_pieces_on_many_upstream_connections_each_keep_their_own_bytes(
    sidecar: SidecarProcess,
) -> None:
    """The lean client reads every upstream connection into one receive buffer too."""
    conns = [Conn(sidecar) for _ in range(8)]
    for i, conn in enumerate(conns):
        conn.send(get(f"/polygon/stream?chunks=6&delay=0.01&tag=answer{i}"))
    for i, conn in enumerate(conns):
        status, _, body = conn.response()
        assert status == 200
        assert body == b"".join(f"answer{i}-{n}\n".encode() for n in range(6))
        conn.close()


def test_streamed_upstream_answer_is_relayed_chunked_and_the_connection_kept(sidecar: SidecarProcess) -> None:
    conn = Conn(sidecar)
    conn.send(get("/polygon/stream?chunks=4&delay=0.05"))
    status, headers, body = conn.response()
    assert status == 200
    assert headers.get("transfer-encoding", "").lower() == "chunked"
    assert body == b"".join(f"chunk-{i}\n".encode() for i in range(4))
    conn.send(get("/polygon/echo/after"))
    assert conn.response()[0] == 200
    conn.close()


def test_refusal_keeps_the_connection_and_connection_close_is_honoured(sidecar: SidecarProcess) -> None:
    conn = Conn(sidecar)
    conn.send(get("/nope/x") + get("/polygon/echo/x", client="bad client"))
    status, headers, body = conn.response()
    assert status == 404 and headers["x-sidecar-error"] == "unknown_upstream"
    assert json.loads(body)["error"] == "unknown_upstream"
    status, headers, _ = conn.response()
    assert status == 400 and headers["x-sidecar-error"] == "invalid_client_id"
    conn.send(get("/polygon/echo/last", extra="Connection: close\r\n"))
    status, _, _ = conn.response()
    assert status == 200
    assert conn.closed_by_peer()
    conn.close()


def test_http10_request_is_answered_and_closed(sidecar: SidecarProcess) -> None:
    conn = Conn(sidecar)
    conn.send(b"GET /polygon/echo/old HTTP/1.0\r\nX-Client-Id: alice\r\n\r\n")
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["raw_path"].startswith("/echo/old?")
    assert conn.closed_by_peer()
    conn.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /polygon/echo/x HTTP/1.1\r\nX-Client-Id: alice\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /polygon/echo/x HTTP/1.1\r\nX Client: alice\r\n\r\n",
        b"GET /polygon/echo/x HTTP/1.1\r\nX-Client-Id: alice\r\nContent-Length: -1\r\n\r\n",
    ],
    ids=["two-lengths", "space-in-name", "negative-length"],
)
def test_malformed_heads_get_the_contract_400_and_no_upstream_call(
    sidecar: SidecarProcess, echo: EchoUpstream, raw: bytes
) -> None:
    conn = Conn(sidecar)
    conn.send(raw)
    status, headers, body = conn.response()
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "bad_request"
    assert echo.received == []
    conn.close()


def test_large_head_goes_through(sidecar: SidecarProcess) -> None:
    """A head over the fast path's 16 KiB (aiohttp allows 32 KiB a field) is still served."""
    conn = Conn(sidecar)
    big = "".join(f"X-Big-{i}: {str(i) * 6000}\r\n" for i in range(3))  # the echo upstream allows 8 KiB a field
    conn.send(get("/polygon/echo/big", extra=big))
    status, _, body = conn.response()
    assert status == 200
    got: dict[str, Any] = dict(json.loads(body)["headers"])
    assert [got[f"X-Big-{i}"] for i in range(3)] == [str(i) * 6000 for i in range(3)]
    conn.close()


# ---------------------------------------------------------------- timeouts (in-process, short limits)


def _idle_plane() -> DataPlane:
    """A real DataPlane with no upstreams: no request in these tests gets as far as the plane.

    (A real one, not None: the compiled build checks argument types.)
    """
    runtime = Runtime(routes=Routes({}, {}, forward_proxy=False), identity=HeaderIdentity(IdentitySettings()))
    return DataPlane(runtime, AccessLog())


async def _lean_server(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Server, list[bytes]]:
    """The lean server alone on 127.0.0.1 with a 0.3 s head limit; what it hands to aiohttp is recorded."""
    monkeypatch.setattr(fastserver, "HEAD_TIMEOUT", 0.3)
    handed: list[bytes] = []

    def hand(transport: asyncio.Transport, data: bytes) -> None:
        handed.append(data)
        transport.close()

    server = fastserver.FastServer(_idle_plane(), hand, hand)
    listener = await asyncio.get_running_loop().create_server(server.protocol, "127.0.0.1", 0)
    return listener, handed


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /polygon/x HTTP/1.1\r\nHost: a\r\n", b"POST /p/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"],
    ids=["nothing", "half-a-head", "half-a-body"],
)
async def test_a_request_that_never_completes_is_closed(monkeypatch: pytest.MonkeyPatch, sent: bytes) -> None:
    listener, handed = await _lean_server(monkeypatch)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(sent)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the once-a-second sweep
    assert asyncio.get_running_loop().time() - started < 2.5
    assert handed == []  # nothing went to aiohttp or upstream
    writer.close()
    listener.close()


async def test_connect_goes_to_the_connect_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    listener, handed = await _lean_server(monkeypatch)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONN")  # could still become a CONNECT: nobody is handed anything yet
    await asyncio.sleep(0.1)
    assert handed == []
    writer.write(b"ECT api.example:443 HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert handed == [b"CONNECT api.example:443 HTTP/1.1\r\n\r\n"]
    writer.close()
    listener.close()


def test_expect_100_continue_is_met_here_and_not_forwarded(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    """The sidecar answers 100 Continue itself; the upstream gets the body, never the Expect."""
    conn = Conn(sidecar)
    conn.send(
        b"POST /polygon/echo/e HTTP/1.1\r\nHost: s\r\nX-Client-Id: alice\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    while b"\r\n\r\n" not in conn.buf:
        assert conn._fill()
    interim, conn.buf = conn.buf.split(b"\r\n\r\n", 1)
    assert interim.startswith(b"HTTP/1.1 100")
    conn.send(b"hello")
    status, _, body = conn.response()
    assert status == 200
    seen = json.loads(body)
    assert seen["body_size"] == 5
    assert "expect" not in {k.lower() for k, _ in seen["headers"]}
    conn.close()


@pytest.mark.parametrize(
    "sent",
    [
        "GET /polygon/x HTTP/1.1\r\nHost: a\r\nX-Name: caf\u00e9\r\n".encode(),  # not ASCII: aiohttp's
        b"GET /polygon/x HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n",  # over 16 KiB: aiohttp's
    ],
    ids=["non-ascii", "over-16-kib"],
)
async def test_a_head_handed_to_aiohttp_that_never_completes_is_closed(
    monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    """aiohttp's own idle limit (3630 s) held such a head, and its memory, for an hour."""
    from sidecar.listen import aio_server
    from sidecar.listen import front as listener

    monkeypatch.setattr(aio_server, "HTTP_WAIT_SECONDS", 0.3)
    front = listener.Front(_idle_plane(), {"access_log": None, "max_line_size": 32768, "max_field_size": 32768}, None)
    _, port = await front.listen("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert asyncio.get_running_loop().time() - started < 5
        writer.close()
        await writer.wait_closed()
    finally:
        await front.drain(1.0)


def test_a_quiet_event_stream_gets_its_head_at_once(
    start_sidecar: Callable[..., SidecarProcess], tmp_path: Path, keys: dict[str, str], server_kind: str
) -> None:
    """An upstream that sends its head, then nothing for a while (an SSE stream before its first event)."""
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    release = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            release.wait(10)
            conn.sendall(b"d\r\ndata: event\n\n\r\n0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys), encoding="utf-8")
    sc = start_sidecar(
        {
            "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
            "upstreams": {"quiet": {"url": f"http://127.0.0.1:{port}", "secret": "{client_id}",
                                   "inject": {"query": "apiKey"}, "allow_private": True}},
        },
        env={"SIDECAR_SERVER": server_kind},
    )
    try:
        conn = Conn(sc)
        conn.sock.settimeout(10)
        conn.send(get("/quiet/events"))
        started = time.monotonic()
        while b"\r\n\r\n" not in conn.buf:
            assert conn._fill()
        # The upstream holds its first event until the app has seen the head.
        assert conn.buf.startswith(b"HTTP/1.1 200"), conn.buf
        assert time.monotonic() - started < 5
        release.set()
        status, headers, body = conn.response()
        assert status == 200 and headers["content-type"] == "text/event-stream" and body == b"data: event\n\n"
        conn.close()
    finally:
        release.set()
        thread.join(10)
        listener.close()
