"""``workers: N``: one supervisor, N data-plane processes sharing the port with SO_REUSEPORT.

The supervisor binds the port first (so ``listen: host:0`` still means one
port), serves the admin listener, and starts each worker as the same CLI with
``SIDECAR_WORKER_*`` in its environment. Each worker has its own event loop,
upstream pools and secret cache; the kernel spreads new connections across
them. Metrics from all processes are summed through prometheus_client's
multiprocess mode. Signals go to the supervisor, which passes them on:

    SIGTERM ─▶ not ready ─▶ SIGTERM to workers ─▶ they drain ─▶ exit 0
    SIGHUP  ─▶ config validated here (errors logged) ─▶ SIGHUP to workers
    a worker dies ─▶ restarted after a back-off (not while draining)

Each worker reports over a pipe, one line each: ``listening`` once its listener is
bound, then ``ready`` or ``unready`` whenever its readiness changes (prefetch done;
in JWT mode signing keys loaded, which a reload to another provider can undo). The
supervisor is ready while every worker last said ``ready``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.buildinfo import build
from sidecar.config import ListenAddress, Settings
from sidecar.lifecycle import StartupError, on_signals, open_authority, start_admin

if TYPE_CHECKING:
    from sidecar.mitm import CertificateAuthority

ENV_INDEX = "SIDECAR_WORKER_INDEX"
ENV_PORT = "SIDECAR_WORKER_PORT"
ENV_READY_FD = "SIDECAR_WORKER_READY_FD"
ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
ENV_CA_CERT = "SIDECAR_WORKER_CA_CERT"
ENV_CA_KEY = "SIDECAR_WORKER_CA_KEY"
#: Longest wait before restarting a worker that keeps dying.
MAX_RESTART_BACKOFF = 30.0

log = logging.getLogger("sidecar.workers")


@dataclass
class WorkerRole:
    """What a worker process knows about itself (from its environment)."""

    index: int
    port: int
    ready_fd: int
    #: the supervisor's interception CA, when it generated one (all workers must sign with it)
    ca: tuple[Path, Path] | None = None

    @classmethod
    def from_env(cls) -> WorkerRole | None:
        if ENV_INDEX not in os.environ:
            return None
        ca = (Path(os.environ[ENV_CA_CERT]), Path(os.environ[ENV_CA_KEY])) if ENV_CA_CERT in os.environ else None
        return cls(int(os.environ[ENV_INDEX]), int(os.environ[ENV_PORT]), int(os.environ[ENV_READY_FD]), ca)

    def report(self, state: str) -> None:
        """Tell the supervisor ``listening`` (once), ``ready`` or ``unready``."""
        try:
            os.write(self.ready_fd, state.encode("ascii") + b"\n")
        except OSError:
            pass  # the supervisor is gone; it will not ask again


def prepare_multiprocess_metrics() -> Path:
    """Create the shared metrics folder; must run before prometheus_client is imported."""
    folder = Path(tempfile.mkdtemp(prefix="sidecar-metrics-"))
    os.environ[ENV_METRICS_DIR] = str(folder)
    return folder


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.restarts = 0
        self.started_once = False  # listening at least once: a later exit is not a start-up problem


class Supervisor:
    """Starts, watches and signals the workers; serves /healthz, /readyz, /metrics."""

    def __init__(self, settings: Settings, config_path: Path, metrics_dir: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self.metrics_dir = metrics_dir
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.draining = False
        self.port = 0
        self._placeholder: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ca_env: dict[str, str] = {}
        self._authority: CertificateAuthority | None = None
        self.failed = False
        self._stop = asyncio.Event()

    def ready(self) -> bool:
        return not self.draining and all(w.ready for w in self.workers)

    def _reserve_port(self) -> None:
        host, port = self.settings.listen.host, self.settings.listen.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        # Bound but not listening: it holds the port number for the workers and
        # receives no connections (the kernel balances only over listening sockets).
        self._placeholder = sock
        self.port = sock.getsockname()[1]

    async def _spawn(self, worker: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            ENV_INDEX: str(worker.index),
            ENV_PORT: str(self.port),
            ENV_READY_FD: str(write_fd),
            ENV_METRICS_DIR: str(self.metrics_dir),
            **self._ca_env,
        }
        worker.ready = False
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "--config", str(self.config_path),
            env=env, pass_fds=(write_fd,),
            # Own session: a terminal's Ctrl+C reaches the supervisor only, which then
            # drains the workers once instead of each getting the signal twice.
            start_new_session=True,
        )
        os.close(write_fd)
        self._track(self._follow(worker, worker.proc, read_fd))
        self._track(self._watch(worker, worker.proc))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, worker: _Worker, proc: asyncio.subprocess.Process, read_fd: int) -> None:
        """Apply the worker's reports until it exits (the pipe's end)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            raise
        try:
            while line := await reader.readline():
                state = line.strip()
                if state == b"listening":
                    worker.started_once = True  # a fact even if it has exited since
                elif worker.proc is not proc or proc.returncode is not None:
                    return  # readiness from a worker that has exited since
                elif state in (b"ready", b"unready"):
                    was_ready = self.ready()
                    worker.ready = state == b"ready"
                    self._publish_ready()
                    if self.ready() and not was_ready:
                        log.info("all workers ready", extra={"workers": len(self.workers)})
        finally:
            transport.close()

    def _publish_ready(self) -> None:
        from sidecar import metrics

        metrics.READY.set(1 if self.ready() else 0)
        metrics.DRAINING.set(1 if self.draining else 0)

    async def _watch(self, worker: _Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        worker.ready = False
        self._publish_ready()
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        if self.draining:
            return
        if not worker.started_once:
            # It never became ready: a config or start-up problem (a port in use, an
            # unreadable keys file) that a restart will not fix. Stop like a single process would.
            log.error("worker failed to start; stopping", extra={"worker": worker.index, "code": code})
            self.failed = True
            self.draining = True
            self._stop.set()
            return
        worker.restarts += 1
        delay = min(0.5 * 2 ** min(worker.restarts, 6), MAX_RESTART_BACKOFF)
        log.error("worker exited; restarting", extra={"worker": worker.index, "code": code, "in_seconds": delay})
        await asyncio.sleep(delay)
        if not self.draining:
            await self._spawn(worker)

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                try:
                    worker.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def run(self) -> int:
        from sidecar.admin import bound_address
        from sidecar.config import load_settings
        from sidecar.errors import ConfigError

        s = self.settings
        # The supervisor writes ca_cert_out (the app's trust bundle) once, and every
        # worker presents leaves from that one CA: generated here, or the configured one.
        try:
            authority = open_authority(s.forward_proxy.mitm)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1
        self._authority = authority
        if authority is not None and authority.generated:
            cert_path, key_path = authority.export()
            self._ca_env = {ENV_CA_CERT: str(cert_path), ENV_CA_KEY: str(key_path)}
        try:
            self._reserve_port()
        except OSError as exc:
            log.error("cannot start: cannot listen: %s", exc.strerror or exc)
            return 1
        try:
            admin = await start_admin(s.admin_listen, self.ready)
        except OSError as exc:
            log.error("cannot start: cannot listen: %s", exc.strerror or exc)
            return 1
        for worker in self.workers:
            await self._spawn(worker)
        log.info(
            "listening",
            extra={
                "listen": str(ListenAddress(s.listen.host, self.port)),
                "admin_listen": bound_address(admin),
                "workers": len(self.workers),
                "upstreams": sorted(s.upstreams),
                "build": build(),  # the workers run the same code
            },
        )
        loop = asyncio.get_running_loop()
        stop = self._stop

        def draining() -> None:
            self.draining = True
            self._publish_ready()

        def second(signame: str) -> None:
            log.warning("second %s: stopping workers now", signame)
            self._signal_all(signal.SIGKILL)

        def on_hup() -> None:
            from sidecar import metrics

            try:
                load_settings(self.config_path)
            except ConfigError as exc:
                metrics.CONFIG_RELOADS.labels("invalid").inc()
                log.error("config reload refused; the running config stays", extra={"problems": exc.problems})
                return
            self._signal_all(signal.SIGHUP)

        on_signals(loop, stop, log=log, draining=draining, second=second, hup=on_hup)
        await stop.wait()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + s.shutdown_grace_seconds + 5
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                await asyncio.wait_for(worker.proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
        for task in list(self._tasks):
            task.cancel()
        await admin.cleanup()
        if self._placeholder is not None:
            self._placeholder.close()
        if self._authority is not None:
            self._authority.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("stopped")
        return 1 if self.failed else 0


def supervise(settings: Settings, config_path: Path) -> int:
    """Blocking entry point of the supervisor process."""
    from sidecar.access_log import configure_logging

    metrics_dir = Path(os.environ[ENV_METRICS_DIR])
    configure_logging(settings.log.level, settings.log.format)
    return asyncio.run(Supervisor(settings, config_path, metrics_dir).run())
