"""The admin listener: /healthz, /readyz and /metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.config import ListenAddress
from sidecar.metrics import exposition


def bound_address(runner: web.BaseRunner | None) -> str | None:
    """``host:port`` a runner listens on (port 0 in the config becomes the real one)."""
    if runner is None or not runner.addresses:
        return None
    return str(ListenAddress(*runner.addresses[0][:2]))


def build_admin_app(is_ready: Callable[[], bool]) -> web.Application:
    """Health is the process being alive; readiness is config loaded, prefetch done, not draining."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
