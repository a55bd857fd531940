"""Helper servers for bench/run.py, all on 127.0.0.1 in one aiohttp process.

    python bench/support/servers.py --jwks-port J --jwks-file F --sink-port K --sm-port E [--sm-delay 0.05]

- JWKS (``GET /jwks.json`` on J): the public key set read from ``--jwks-file``.
- Upload sink (K): reads any request body to the end, answers ``{"received": N}``.
- Fake AWS Secrets Manager (E): ``GetSecretValue`` after ``--sm-delay`` seconds,
  answering ``key-for-<last path segment>`` for any secret id; ``GET /__calls``
  returns the number of calls per secret id (what the cold-burst phase counts).

It prints ``ready`` on stdout once every listener is bound, and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter

from aiohttp import web

SINK_READ = 1024 * 1024


def jwks_app(jwks_file: str) -> web.Application:
    with open(jwks_file, encoding="utf-8") as f:
        body = f.read().encode()

    async def jwks(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    return app


def sink_app() -> web.Application:
    async def sink(request: web.Request) -> web.Response:
        received = 0
        while True:
            chunk = await request.content.read(SINK_READ)
            if not chunk:
                break
            received += len(chunk)
        return web.json_response({"received": received, "query_has_key": "apiKey=" in request.query_string})

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", sink)
    return app


def secrets_manager_app(delay: float) -> web.Application:
    calls: Counter[str] = Counter()

    async def api(request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        payload = json.loads(await request.read() or b"{}")
        if target != "secretsmanager.GetSecretValue":
            return web.json_response(
                {"__type": "InvalidRequestException", "message": f"unsupported {target}"},
                status=400,
                content_type="application/x-amz-json-1.1",
            )
        secret_id = str(payload.get("SecretId", ""))
        calls[secret_id] += 1
        await asyncio.sleep(delay)
        answer = {
            "ARN": f"arn:aws:secretsmanager:us-east-1:123456789012:secret:{secret_id}-AbCdEf",
            "Name": secret_id,
            "VersionId": "00000000-0000-0000-0000-000000000001",
            "SecretString": "key-for-" + secret_id.rsplit("/", 1)[-1],
            "VersionStages": [payload.get("VersionStage") or "AWSCURRENT"],
            "CreatedDate": time.time(),
        }
        return web.Response(
            body=json.dumps(answer).encode(),
            content_type="application/x-amz-json-1.1",
            headers={"x-amzn-RequestId": "bench"},
        )

    async def count(_request: web.Request) -> web.Response:
        return web.json_response(dict(calls))

    app = web.Application()
    app.router.add_post("/", api)
    app.router.add_get("/__calls", count)
    return app


async def main(args: argparse.Namespace) -> None:
    runners = []
    for app, port in (
        (jwks_app(args.jwks_file), args.jwks_port),
        (sink_app(), args.sink_port),
        (secrets_manager_app(args.sm_delay), args.sm_port),
    ):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        runners.append(runner)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jwks-port", type=int, required=True)
    parser.add_argument("--jwks-file", required=True)
    parser.add_argument("--sink-port", type=int, required=True)
    parser.add_argument("--sm-port", type=int, required=True)
    parser.add_argument("--sm-delay", type=float, default=0.05)
    asyncio.run(main(parser.parse_args()))
