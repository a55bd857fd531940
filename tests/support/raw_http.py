"""Raw-socket HTTP for hostile tests: send exact bytes, parse what comes back, bounded in time.

Every socket here talks to 127.0.0.1 and every read has a deadline, so a sidecar
that hangs fails a test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from tests.support.process import SidecarProcess, address, metric, metrics_text  # noqa: F401  (re-exported)

LOCAL = "127.0.0.1"
#: Default upper bound on one raw exchange.
EXCHANGE_TIMEOUT = 5.0


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool  # framing finished (CL reached, last chunk seen); False: cut by a close

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def sidecar_error(self) -> str | None:
        return self.header("X-Sidecar-Error")

    def text(self) -> str:
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.status} {self.reason}\n{head}\n\n" + self.body.decode("latin-1")


@dataclass
class Exchange:
    responses: list[RawResponse] = field(default_factory=list)
    closed: bool = False  # the sidecar closed the connection
    raw: bytes = b""
    elapsed: float = 0.0

    @property
    def first(self) -> RawResponse:
        assert self.responses, f"no response at all (closed={self.closed}, raw={self.raw[:200]!r})"
        return self.responses[0]

    def text(self) -> str:
        return self.raw.decode("latin-1")


def _parse_chunked(data: bytes, pos: int) -> tuple[bytes, int] | None:
    body = b""
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(data[pos:end].split(b";", 1)[0].strip() or b"0", 16)
        pos = end + 2
        if size == 0:
            # trailers until an empty line
            while True:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    return None
                line = data[pos:end]
                pos = end + 2
                if not line:
                    return body, pos
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        pos += size + 2


def parse_responses(data: bytes, closed: bool, head_only: bool = False) -> list[RawResponse]:
    """Every response in ``data``; the last one may be incomplete when the peer closed."""
    out: list[RawResponse] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        lines = data[pos:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            break
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        pos = end + 4
        resp = RawResponse(status, parts[2] if len(parts) > 2 else "", headers, b"", True)
        if 100 <= status < 200 and status != 101:
            continue
        if head_only or status in (101, 204, 304):
            out.append(resp)
            continue
        te = (resp.header("Transfer-Encoding") or "").lower()
        cl = resp.header("Content-Length")
        if "chunked" in te:
            parsed = _parse_chunked(data, pos)
            if parsed is None:
                resp.body, resp.complete = data[pos:], False
                out.append(resp)
                break
            resp.body, pos = parsed
        elif cl is not None:
            n = int(cl)
            resp.body = data[pos : pos + n]
            resp.complete = len(resp.body) == n
            pos += len(resp.body)
            if not resp.complete:
                out.append(resp)
                break
        else:
            resp.body, resp.complete = data[pos:], closed
            pos = len(data)
        out.append(resp)
    return out


def exchange(
    url: str,
    data: bytes | list[bytes],
    *,
    responses: int = 1,
    timeout: float = EXCHANGE_TIMEOUT,
    shut_write: bool = False,
    head_only: bool = False,
    pause: float = 0.0,
) -> Exchange:
    """Send ``data`` (pieces sent ``pause`` apart) on one connection; read ``responses`` or until close."""
    started = time.monotonic()
    deadline = started + timeout
    result = Exchange()
    with socket.create_connection(address(url), timeout=timeout) as sock:
        pieces = data if isinstance(data, list) else [data]
        try:
            for piece in pieces:
                sock.sendall(piece)
                if pause:
                    time.sleep(pause)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the sidecar may refuse and close before we finished sending
        buf = b""
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                result.closed = True
                break
            if not chunk:
                result.closed = True
                break
            buf += chunk
            parsed = parse_responses(buf, False, head_only)
            if len([r for r in parsed if r.complete]) >= responses:
                break
        result.raw = buf
        result.responses = parse_responses(buf, result.closed, head_only)
    result.elapsed = time.monotonic() - started
    return result


def get(path: str, client: str | None = "alice", *, version: str = "HTTP/1.1", extra: str = "", host: str = "x") -> bytes:
    head = f"GET {path} {version}\r\nHost: {host}\r\n"
    if client is not None:
        head += f"X-Client-Id: {client}\r\n"
    return (head + extra + "\r\n").encode("latin-1")


# ---------------------------------------------------------------- the sidecar around a test module


@contextlib.contextmanager
def running_sidecar(
    config: dict[str, Any], workdir: Path, *, env: dict[str, str] | None = None, name: str = "adversarial",
    wait_ready: bool = True,
) -> Iterator[SidecarProcess]:
    """A real CLI process for a whole module (the root ``start_sidecar`` is per test)."""
    proc = SidecarProcess(config, workdir, env=env, name=name)
    try:
        proc.start(wait_ready=wait_ready)
        yield proc
    finally:
        try:
            proc.stop(timeout=10)
        except Exception:
            proc.kill()


def healthz(sc: SidecarProcess) -> int:
    try:
        return requests.get(sc.admin_url + "/healthz", timeout=3).status_code
    except requests.RequestException:
        return 0


def assert_alive(sc: SidecarProcess) -> None:
    assert sc.proc is not None and sc.proc.poll() is None, f"the sidecar died:\n{sc.output()[-4000:]}"
    assert healthz(sc) == 200, "the sidecar stopped answering /healthz"


def leak_forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret)}


def assert_no_secret(texts: list[str | bytes], *secrets: str) -> None:
    """None of ``secrets`` (raw or percent-encoded) appears in any of ``texts``."""
    for text in texts:
        s = text.decode("latin-1") if isinstance(text, bytes) else text
        for secret in secrets:
            for form in leak_forms(secret):
                assert form not in s, f"a secret ({secret[:8]}...) leaked into: {s[:300]!r}"


# ---------------------------------------------------------------- asyncio servers in a thread


class LoopThread:
    """An event loop in a daemon thread, for hostile servers the sync tests drive."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class StreamServerMixin:
    """start/stop/url for a raw asyncio server on 127.0.0.1 in its own loop thread.

    The dataclass using it declares ``port``, ``_thread`` and ``_server`` and
    implements ``_connection(reader, writer)``.
    """

    thread_name = "stream-server"
    port: int
    _thread: LoopThread | None
    _server: asyncio.Server | None

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    def start(self) -> Any:
        self._thread = LoopThread(self.thread_name)

        async def serve() -> int:
            self._server = await asyncio.start_server(self._connection, LOCAL, 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._thread.run(serve())
        return self

    def stop(self) -> None:
        assert self._thread is not None
        if self._server is not None:
            self._thread.call(self._server.close)
        self._thread.stop()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
