"""A local HTTPS upstream with trustme certificates, in its own thread."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

import trustme
from aiohttp import web

from tests.support.upstream import EchoUpstream


class TlsEchoUpstream(EchoUpstream):
    """The echo upstream behind TLS, for ``localhost`` and 127.0.0.1."""

    def __init__(self, ca: trustme.CA, workdir: Path) -> None:
        super().__init__(host="127.0.0.1")
        self.ca = ca
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.ca_file = workdir / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


class Canary:
    """A listener that only counts connections: proof that nothing was sent somewhere."""

    def __init__(self) -> None:
        self.connections = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = self._loop.run_until_complete(asyncio.start_server(accepted, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        assert self._server is not None
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
