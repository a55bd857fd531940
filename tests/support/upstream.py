"""A real upstream for the tests: aiohttp on 127.0.0.1 in its own thread, recording requests.

Paths (after any prefix):
  /echo/...            JSON of what arrived: method, raw path, query, headers, body size
  /status/CODE         that status, with a small JSON body
  /stream?chunks=N&delay=S&tag=T   N chunks "T-i\n" (T: chunk), S seconds apart (chunked encoding)
  /sse?events=N&delay=S      text/event-stream
  /slow?delay=S        answers after S seconds
  /redirect?to=URL     302 to URL plus the query it received (so an injected key is echoed)
  /keyed               200 only when apiKey equals ``accepted_key``, else 401
  /reason-echo?pad=N   401 whose reason phrase repeats the apiKey it received, after N characters
  /truncate            promises 100 bytes, sends 10, closes
  /upload              reads the body in chunks, answers its size and sha256
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

#: What /reason-echo puts before the key in its reason phrase.
REASON_ECHO_PREFIX = "Bad key "


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A server's connections that carried a request, with their sockets.
Connections = dict[asyncio.BaseTransport, Any]


def tracking(connections: Connections) -> Any:
    """A middleware that records in ``connections`` each connection a request comes in on."""

    @web.middleware
    async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            connections.setdefault(request.transport, request.transport.get_extra_info("socket"))
        return await handler(request)

    return track


async def close_connections(connections: Connections, timeout: float = 10.0) -> None:
    """Cut every recorded connection and return once their sockets are closed.

    For a server's runner.cleanup() only starts closing a TLS connection (its
    close_notify waits for the peer): a loop stopped before that ends leaves the
    socket open.
    """
    for transport in connections:
        transport.abort()
    deadline = time.monotonic() + timeout
    while any(sock is not None and sock.fileno() != -1 for sock in connections.values()):
        assert time.monotonic() < deadline, "a test server's connections did not close"
        await asyncio.sleep(0)  # connection_lost, which closes the socket, runs on a later loop turn
    connections.clear()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 for a server to listen on: each socket stays bound until
    all are chosen (the kernel may hand a port out again as soon as its socket is closed)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Received:
    method: str
    raw_path: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body_size: int = 0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class EchoUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    accepted_key: str | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _connections: Connections = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        self.received.clear()
        self.accepted_key = None

    def last(self) -> Received:
        assert self.received, "the upstream received nothing"
        return self.received[-1]

    # ---- lifecycle

    def start(self) -> None:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="echo-upstream", daemon=True)
        self._thread.start()
        assert ready.wait(10), "echo upstream did not start"

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[tracking(self._connections)])
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _start(self) -> None:
        app = self._app()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._cleanup(), self._loop).result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    async def _cleanup(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
        await close_connections(self._connections)

    # ---- behaviour

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Received(
            method=request.method,
            raw_path=request.raw_path,
            path=request.path,
            query=request.query_string,
            headers=list(request.headers.items()),
        )
        self.received.append(rec)
        tail = request.path
        q = request.query
        if "/upload" in tail:
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_chunked(65536):
                digest.update(chunk)
                size += len(chunk)
            rec.body_size = size
            return web.json_response({"size": size, "sha256": digest.hexdigest()})
        body = await request.read()
        rec.body_size = len(body)
        if "/status/" in tail:
            code = int(tail.rsplit("/", 1)[1])
            return web.json_response({"upstream_status": code}, status=code)
        if "/stream" in tail:
            return await self._stream(
                request, int(q.get("chunks", "3")), float(q.get("delay", "0.1")), q.get("tag", "chunk")
            )
        if "/sse" in tail:
            return await self._sse(request, int(q.get("events", "3")), float(q.get("delay", "0.1")))
        if "/slow" in tail:
            await asyncio.sleep(float(q.get("delay", "1")))
            return web.json_response({"slow": True})
        if "/redirect" in tail:
            raise web.HTTPFound(q["to"] + "?" + request.query_string)
        if "/reason-echo" in tail:
            # A careless upstream that puts the key it got into its reason phrase.
            # ?pad=N puts N characters before it (a key that crosses a length limit).
            pad = "x" * int(q.get("pad", "0"))
            return web.Response(status=401, reason=f"{pad}{REASON_ECHO_PREFIX}{q.get('apiKey', '')}", text="no")
        if "/keyed" in tail:
            if self.accepted_key is not None and q.get("apiKey") == self.accepted_key:
                return web.json_response({"ok": True})
            return web.json_response({"error": "bad key"}, status=401)
        if "/truncate" in tail:
            resp = web.StreamResponse(status=200)
            resp.content_length = 100
            await resp.prepare(request)
            await resp.write(b"x" * 10)
            assert request.transport is not None
            request.transport.close()
            return resp
        return web.json_response(self._describe(rec, body))

    @staticmethod
    def _describe(rec: Received, body: bytes) -> dict[str, Any]:
        return {
            "method": rec.method,
            "raw_path": rec.raw_path,
            "query": rec.query,
            "headers": rec.headers,
            "body_size": len(body),
        }

    @staticmethod
    async def _stream(request: web.Request, chunks: int, delay: float, tag: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(chunks):
            await resp.write(f"{tag}-{i}\n".encode())
            await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    @staticmethod
    async def _sse(request: web.Request, events: int, delay: float) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(events):
            await resp.write(f"data: event-{i}\n\n".encode())
            await asyncio.sleep(delay)
        await resp.write_eof()
        return resp
