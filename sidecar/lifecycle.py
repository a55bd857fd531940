"""Start and stop steps shared by the two kinds of process: one serving (app.py) and the supervisor (workers.py).

Both load the interception CA, start the admin listener, and handle SIGTERM/SIGINT
(drain; a second one exits at once) and SIGHUP (reload). Each keeps its own log lines
and decides what draining and reloading mean for it.

Nothing heavy is imported at module level: workers.py imports this before the
multiprocess metrics folder is set, and prometheus_client (imported by the admin app)
must not load before that. aiohttp, the admin app and the CA's cryptography are
imported where they are used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from sidecar.config import ListenAddress, MitmSettings
    from sidecar.mitm import CertificateAuthority


class StartupError(Exception):
    """The sidecar cannot start (a port in use, an unreadable secrets file, no AWS region)."""


def open_authority(
    mitm: MitmSettings, ca: tuple[Path, Path] | None = None, *, write_out: bool = True
) -> CertificateAuthority | None:
    """The interception CA when ``forward_proxy.mitm`` is on, else None; raises StartupError.

    ``ca``: the (certificate, key) files to load instead of the configured ones (a
    worker's, exported by the supervisor that generated the CA). ``write_out``: whether
    this process writes ``ca_cert_out`` (not a worker: its supervisor did).
    """
    if not mitm.enabled:
        return None
    from sidecar.mitm import CertificateAuthority, MitmError

    ca_cert, ca_key = ca if ca is not None else (mitm.ca_cert, mitm.ca_key)
    try:
        return CertificateAuthority(ca_cert, ca_key, mitm.ca_cert_out if write_out else None)
    except MitmError as exc:
        raise StartupError(f"forward_proxy.mitm: {exc}") from None


async def start_admin(address: ListenAddress, is_ready: Callable[[], bool]) -> web.AppRunner:
    """/healthz, /readyz and /metrics on ``address``; raises OSError when it cannot listen (leaving nothing open)."""
    from aiohttp import web

    from sidecar.admin import build_admin_app

    runner = web.AppRunner(build_admin_app(is_ready), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, address.host, address.port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


def on_signals(
    loop: asyncio.AbstractEventLoop,
    stop: asyncio.Event,
    *,
    log: logging.Logger,
    draining: Callable[[], None],
    second: Callable[[str], None],
    hup: Callable[[], None],
) -> None:
    """Install the signal handlers of a sidecar process.

    SIGTERM or SIGINT: logged on ``log``, then ``draining()``, then ``stop`` is set. One
    that comes while ``stop`` is set (a second signal, or the process already stopping):
    ``second(signame)``, then the process exits with 1 at once. SIGHUP: ``hup()``.
    """

    def on_stop(signame: str) -> None:
        if stop.is_set():
            second(signame)
            os._exit(1)
        log.info("%s received", signame)
        draining()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, hup)
