"""Reference servers that show how much of the sidecar's CPU per request aiohttp itself costs.

    python bench/support/floors.py server --port P
    python bench/support/floors.py passthrough --port P --upstream http://127.0.0.1:U

- ``server``: aiohttp's low-level server answering a fixed ~300-byte JSON body. The
  floor of aiohttp's HTTP server (parser, protocol, response writer) per request.
- ``passthrough``: the same server forwarding every request to the upstream with one
  pooled ``aiohttp.ClientSession`` (session options as in sidecar/upstream.py) and
  streaming the answer back with ``StreamResponse``: no identity, no secret cache, no
  injection, no access log, no metrics. The floor of "aiohttp server + aiohttp client".

The sidecar's CPU per request minus the passthrough's is what the sidecar's own code
(and its logging and metrics) adds. Both use uvloop when installed, like the sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web

BODY = b'{"ok":true,' + b'"pad":"' + b"x" * 280 + b'"}'
DROP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length"})


async def main(args: argparse.Namespace) -> None:
    session: aiohttp.ClientSession | None = None

    async def fixed(_request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=BODY, content_type="application/json")

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        assert session is not None
        async with session.request(
            request.method, args.upstream + request.raw_path, headers=request.headers,
            allow_redirects=False,
        ) as answer:
            response = web.StreamResponse(status=answer.status)
            for name, value in answer.headers.items():
                if name.lower() not in DROP:
                    response.headers.add(name, value)
            if answer.content_length is not None:
                response.content_length = answer.content_length
            await response.prepare(request)
            while True:
                chunk = await answer.content.readany()
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            return response

    if args.mode == "passthrough":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False,
        )
    server = web.Server(fixed if args.mode == "server" else forward, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024).start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    if session is not None:
        await session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["server", "passthrough"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    parsed = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(parsed))
    except ImportError:
        asyncio.run(main(parsed))
