"""The data-plane listener: owns the socket and hands each connection to whoever reads it.

aiohttp's server has no public way to take over a connection after CONNECT, so the
first bytes of each connection are looked at before anyone parses them:

    lean server on (default) ─▶ fast.py reads every new connection; plain HTTP/1.1 it serves,
                                 a CONNECT goes to connect.py, anything else to aiohttp's server
    SIDECAR_SERVER=aiohttp   ─▶ connect.py's sniffer reads the first bytes; a CONNECT stays
                                 there, anything else goes to aiohttp's server (aio_server.py)
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from importlib.util import find_spec
from typing import TYPE_CHECKING

from sidecar.listen import aio_server
from sidecar.listen.aio_exchange import serve_request
from sidecar.listen.aio_server import AioServer
from sidecar.listen.connect import ConnectHandler

#: The lean server (sidecar/listen/fast.py) takes plain HTTP connections and hands
#: aiohttp anything it does not serve itself; SIDECAR_SERVER=aiohttp gives aiohttp
#: every connection (a comparison and an escape hatch).
FAST_SERVER = os.environ.get("SIDECAR_SERVER", "fast") != "aiohttp" and find_spec("httptools") is not None

if TYPE_CHECKING:
    from sidecar.listen.fast import FastServer
    from sidecar.mitm import CertificateAuthority
    from sidecar.pipeline import DataPlane


class Front:
    """Owns the data-plane socket; see the module docstring."""

    def __init__(
        self,
        plane: DataPlane,
        http_server_kwargs: dict[str, object],
        authority: CertificateAuthority | None,
    ) -> None:
        self.plane = plane
        self.loop = asyncio.get_running_loop()
        # Read when the listener is made, so a test may shorten it (aio_server.HTTP_WAIT_SECONDS).
        self.server_kwargs = {"keepalive_timeout": aio_server.HTTP_WAIT_SECONDS, **http_server_kwargs}
        self.http = AioServer(plane, self.loop, functools.partial(serve_request, plane), **self.server_kwargs)
        self.connect = ConnectHandler(plane, self.loop, authority, self.server_kwargs, self.hand_to_http)
        self.fast: FastServer | None = None
        if FAST_SERVER:
            from sidecar.listen.fast import FastServer

            self.fast = FastServer(plane, self.hand_to_http, self.connect.take_over)
        self._listener: asyncio.Server | None = None

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        """Bind; returns the bound address."""
        loop = asyncio.get_running_loop()
        # The lean server reads the first bytes itself and passes a CONNECT on to connect.py.
        factory: Callable[[], asyncio.BaseProtocol] = (
            self.fast.protocol if self.fast is not None else self.connect.sniffer
        )
        self._listener = await loop.create_server(
            factory, host, port, reuse_address=True, reuse_port=reuse_port or None, backlog=1024
        )
        sockname = self._listener.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def hand_to_http(self, transport: asyncio.Transport, first: bytes) -> None:
        """A connection the lean server (or the sniffer) does not serve: aiohttp's server reads it from here."""
        handler = self.http()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(first)

    async def drain(self, grace: float) -> None:
        """Stop accepting; let HTTP requests finish within ``grace``; close tunnels."""
        if self._listener is not None:
            self._listener.close()
        await asyncio.sleep(0)
        servers = [self.http, *self.connect.intercept_servers.values()]
        for server in servers:
            server.pre_shutdown()
        waits = [server.shutdown(grace) for server in servers]
        if self.fast is not None:
            waits.append(self.fast.drain(grace))
        await asyncio.gather(*waits)
        self.connect.close()
        if self._listener is not None:
            await self._listener.wait_closed()
