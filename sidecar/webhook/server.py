"""The webhook's HTTPS server: ``POST /mutate``, ``GET /healthz`` and ``GET /readyz``.

The certificate and key are read again whenever their content changes
(cert-manager renews them in place): every TLS handshake compares the files with
what was loaded and switches new connections to a fresh context. A pair that does
not load (half written, or a key that does not match) is logged and the last good
pair stays in use, so a renewal never takes the webhook down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar import __version__
from sidecar.webhook.mutate import review
from sidecar.webhook.settings import WebhookSettings

#: The API server sends at most 3 MiB of object; the review around it adds little.
MAX_BODY_BYTES = 4 * 1024 * 1024


def log_line(level: str, message: str, **fields: Any) -> None:
    """One JSON object a line on stdout, as the sidecar logs."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    line = {"ts": stamp, "level": level, "logger": "sidecar.webhook", "message": message, **fields}
    sys.stdout.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


class ReloadingCertificate:
    """A server SSLContext whose certificate follows the files on disk."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self._digest = b""
        self._failed = b""
        loaded = self._load()
        if isinstance(loaded, str):
            raise OSError(loaded)
        self.context = loaded
        # The listening context: its callback runs at every ClientHello, SNI or not.
        self.context.sni_callback = self._on_hello
        self._current = loaded

    def _read(self) -> tuple[bytes, bytes] | str:
        try:
            return self.cert.read_bytes(), self.key.read_bytes()
        except OSError as exc:
            return f"cannot read {exc.filename}: {exc.strerror}"

    def _load(self) -> ssl.SSLContext | str:
        files = self._read()
        if isinstance(files, str):
            return files
        digest = hashlib.sha256(files[0] + b"\0" + files[1]).digest()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            # The message names the file's problem (PEM, key mismatch), never key material.
            return f"cannot load {self.cert} and {self.key}: {getattr(exc, 'reason', None) or exc}"
        self._digest = digest
        return context

    def refresh(self) -> ssl.SSLContext:
        """The context for a new connection: reloaded first when the files changed."""
        files = self._read()
        if isinstance(files, str):
            return self._current
        digest = hashlib.sha256(files[0] + b"\0" + files[1]).digest()
        if digest == self._digest or digest == self._failed:
            return self._current
        loaded = self._load()
        if isinstance(loaded, str):
            self._failed = digest
            log_line("warning", "certificate not reloaded; the previous one stays in use", event="tls", problem=loaded)
            return self._current
        self._current = loaded
        log_line("info", "certificate reloaded", event="tls", cert=str(self.cert))
        return loaded

    def _on_hello(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.refresh()
        if current is not context:
            sslobj.context = current


class Webhook:
    """The aiohttp application and its readiness."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.draining = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/mutate", self.mutate)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def mutate(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        body = await request.read()
        try:
            outcome = review(self.settings, body)
        except Exception as exc:  # the webhook keeps serving whatever a review holds
            log_line("error", "admission", event="admission", decision="error", reason=type(exc).__name__)
            return web.json_response({"error": "internal", "message": "the review could not be answered"}, status=500)
        log_line(
            "info" if outcome.status == 200 else "warning",
            "admission",
            event="admission",
            decision=outcome.decision,
            reason=outcome.reason,
            **outcome.log,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return web.json_response(outcome.body, status=outcome.status)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ready\n")


async def serve(settings: WebhookSettings, certificate: ReloadingCertificate) -> None:
    """Serve until SIGTERM/SIGINT; then unready for ``shutdown_grace_seconds`` (or until a second signal), and stop."""
    webhook = Webhook(settings)
    runner = web.AppRunner(webhook.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, ssl_context=certificate.context)
    await site.start()
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log_line("info", "listening", event="start", listen=shown, version=__version__, image=settings.image)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    # Unready first, still serving: the endpoints controller takes this pod out of the
    # Service before the port closes, so the API server's calls never hit a closed port.
    webhook.draining = True
    log_line("info", "draining", event="stop", grace_seconds=settings.shutdown_grace_seconds)
    stop.clear()  # a second signal ends the grace at once
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), settings.shutdown_grace_seconds)
    await runner.cleanup()
    log_line("info", "stopped", event="stop")


def run(settings: WebhookSettings) -> int:
    """Load the certificate, serve, return the exit code (2: the certificate does not load)."""
    try:
        certificate = ReloadingCertificate(settings.tls_cert, settings.tls_key)
    except OSError as exc:
        print(f"error: tls_cert/tls_key: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings, certificate))
    except OSError as exc:
        print(f"error: listen: cannot bind {settings.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
