"""The real data plane in the test's own event loop: fast tests of routing, path checks and scrubbing.

``async with data_plane(config, keys) as p:`` builds Settings from ``config`` with the
real config reader, starts ``sidecar.app.Sidecar`` (both listeners on 127.0.0.1:0), and
gives it an aiohttp upstream in the same loop that records what it received. The
secret store is ``keys`` (secret id -> value) in a dict the test may change (a
rotation); access lines go to a file under the leak check's output folder, so a key
in one fails the run like a key anywhere else. No subprocess: a test costs
milliseconds, and it runs whichever build is installed (pure, or compiled in place)
without subclassing any compiled class.

In ``config``, ``${ECHO}`` is the upstream's ``http://127.0.0.1:PORT`` (``${ECHO_PORT}`` its port), and with
``tls=True`` ``${ECHO_TLS_PORT}`` is its TLS port and ``${CA_FILE}`` the CA that signed
its certificate for ``TLS_NAMES`` (for ``connect_to`` + ``ca_file``): the config
reader's own ``${VAR}`` interpolation fills them in.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.access_log import AccessLog
from sidecar.app import Sidecar
from sidecar.config import parse_settings
from sidecar.secrets.base import RawSecret, ReadOnlyStore, SecretNotFound
from tests.support.leaks import output_file

#: The names on the TLS upstream's certificate (``tls=True``).
TLS_NAMES = ("api.example.test", "other.example.test")
#: Where every harness appends its access lines (scanned by the leak check).
ACCESS_LOG = "in-process-access.log"
READY_SECONDS = 10.0
#: Longest a raw exchange may take; every request in these tests answers in milliseconds.
EXCHANGE_SECONDS = 10.0

Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DictStore(ReadOnlyStore):
    """A secret store in a dict: ``keys[secret_id] = new`` is a rotation the sidecar is not told about."""

    name = "file"

    def __init__(self, keys: Mapping[str, RawSecret]) -> None:
        self.keys: dict[str, RawSecret] = dict(keys)
        self.on_change: Callable[[], None] | None = None
        self.fetches = 0

    async def start(self) -> None:
        return None

    async def fetch(self, secret_id: str) -> RawSecret:
        self.fetches += 1
        try:
            return self.keys[secret_id]
        except KeyError:
            raise SecretNotFound(secret_id) from None

    async def close(self) -> None:
        return None


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    tls: bool
    host: str | None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Upstream:
    """An aiohttp upstream in the test's loop: answers with what it saw, or with ``respond``."""

    received: list[Seen] = field(default_factory=list)
    #: How to answer instead of the JSON echo (a test that needs a careless upstream).
    respond: Responder | None = None
    port: int = 0
    tls_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def last(self) -> Seen:
        assert self.received, "the upstream received nothing"
        return self.received[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        seen = Seen(
            method=request.method,
            raw_path=request.raw_path,
            path=request.path,
            query=request.query_string,
            headers=list(request.headers.items()),
            tls=request.secure,
            host=request.headers.get("Host"),
        )
        self.received.append(seen)
        if self.respond is not None:
            return await self.respond(request)
        return web.json_response({"method": seen.method, "raw_path": seen.raw_path, "tls": seen.tls})


@dataclass
class RawResponse:
    """A response as bytes on the wire, split: status line, headers in order, body (de-chunked)."""

    raw: bytes
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> RawResponse:
    """The first response in ``raw``: a refusal of a garbled one fails the test, not this parser."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {raw[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, reason = [*status_line.split(" ", 2), ""][:3]
    assert version in ("HTTP/1.0", "HTTP/1.1"), status_line
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    resp = RawResponse(raw, int(status), reason, headers, rest)
    if "chunked" in (resp.header("Transfer-Encoding") or "").lower():
        resp.body = _dechunk(rest)
    elif resp.header("Content-Length") is not None:
        resp.body = rest[: int(resp.header("Content-Length") or 0)]
    return resp


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[:size])
        data = data[size + 2 :]


@dataclass
class Plane:
    """A running sidecar and its upstream, as a test sees them."""

    sidecar: Sidecar
    upstream: Upstream
    store: DictStore
    access_log: AccessLog
    host: str
    port: int
    workdir: Path
    _log_path: Path
    _log_start: int

    async def raw(self, data: bytes) -> RawResponse:
        """Send ``data`` on a new connection; read until the sidecar closes it (send ``Connection: close``)."""
        return parse_response(await self.raw_bytes(data))

    async def raw_bytes(self, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), EXCHANGE_SECONDS)
        finally:
            writer.close()
            await writer.wait_closed()

    async def request(
        self, method: str, target: str, headers: Mapping[str, str] | None = None, client: str | None = "alice"
    ) -> RawResponse:
        """One request, written by hand as ``target`` is (nothing normalised), with X-Client-Id ``client``."""
        lines = [f"{method} {target} HTTP/1.1", "Host: sidecar.test"]
        if client is not None:
            lines.append(f"X-Client-Id: {client}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append("Connection: close")
        return await self.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def access_lines(self) -> list[dict[str, Any]]:
        """This sidecar's access lines so far (the pending ones written first)."""
        self.access_log.flush()
        with self._log_path.open("rb") as f:
            f.seek(self._log_start)
            return [json.loads(line) for line in f.read().splitlines() if line]


@asynccontextmanager
async def data_plane(
    config: Mapping[str, Any], keys: Mapping[str, RawSecret], *, tls: bool = False
) -> AsyncIterator[Plane]:
    """The sidecar for ``config`` serving ``keys``, on 127.0.0.1, in this event loop."""
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    log_path = output_file(ACCESS_LOG)
    stream = log_path.open("a", encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="plane-") as tmp:
        workdir = Path(tmp)
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            upstream.port = runner.addresses[0][1]
            env = {"ECHO": upstream.url, "ECHO_PORT": str(upstream.port)}
            if tls:
                env.update(await _start_tls(runner, upstream, workdir))
            raw = _with_harness_defaults(config, workdir)
            settings = parse_settings(raw, base_dir=workdir, env=env)
            store = DictStore(keys)
            access_log = AccessLog("json", stream=stream)
            sidecar = Sidecar(settings, access_log=access_log, backend=store)
            await sidecar.start()
            try:
                await _until(lambda: sidecar.ready, "the sidecar did not become ready")
                assert sidecar.address is not None
                yield Plane(
                    sidecar, upstream, store, access_log, sidecar.address.host, sidecar.address.port, workdir,
                    log_path, log_path.stat().st_size,
                )
            finally:
                await sidecar.drain()
        finally:
            await runner.cleanup()
            stream.close()


def _with_harness_defaults(config: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    raw = copy.deepcopy(dict(config))
    raw["listen"] = "127.0.0.1:0"
    raw["admin_listen"] = "127.0.0.1:0"
    raw.setdefault("shutdown_grace_seconds", 2)
    # The config must name a store; the one served is the DictStore handed to Sidecar.
    keys_file = workdir / "keys.yaml"
    keys_file.write_text("{}\n", encoding="utf-8")
    secrets = raw.setdefault("secrets", {})
    secrets.setdefault("backend", "file")
    secrets.setdefault("file", {"path": str(keys_file)})
    return raw


async def _start_tls(runner: web.AppRunner, upstream: Upstream, workdir: Path) -> dict[str, str]:
    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*TLS_NAMES).configure_cert(context)
    ca_file = workdir / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    upstream.tls_port = runner.addresses[-1][1]
    return {"ECHO_TLS_PORT": str(upstream.tls_port), "CA_FILE": str(ca_file)}


async def _until(condition: Callable[[], bool], message: str, timeout: float = READY_SECONDS) -> None:
    """Wait for ``condition`` (checked every few milliseconds), failing with ``message`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, message
        await asyncio.sleep(0.005)
