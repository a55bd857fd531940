"""Wiring: build the runtime from settings, serve both listeners, reload, drain.

Lifecycle::

    start ─▶ backend + identity + upstreams ─▶ listeners bound ─▶ prefetch ─┬─▶ ready
                      └─ JWT mode: signing keys loading in the background ─┘
    SIGHUP ─▶ load + validate ─▶ new Runtime swapped in (in-flight requests keep theirs)
    SIGTERM ─▶ not ready ─▶ listener closed ─▶ in-flight finish (≤ grace) ─▶ exit 0

Ready means: listening, prefetch done, the current runtime's identity resolver ready
(JWT mode: signing keys loaded, which a reload to another provider can undo until its
keys load), and not draining.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import ssl
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sidecar import metrics
from sidecar.access_log import AccessLog, configure_logging, flush_access_lines
from sidecar.admin import bound_address
from sidecar.buildinfo import build, stale_sources
from sidecar.config import ListenAddress, Settings, load_settings
from sidecar.credentials.base import CredentialProvider
from sidecar.credentials.factory import CredentialBuildError, build_provider
from sidecar.errors import ConfigError, NoCredential, SecretStoreUnavailable
from sidecar.identity.base import IdentityResolver
from sidecar.identity.factory import build_identity_resolver
from sidecar.lifecycle import StartupError, on_signals, open_authority, start_admin
from sidecar.listen.front import Front
from sidecar.pipeline import DataPlane, Runtime
from sidecar.policy import client_allowed
from sidecar.routing import Routes
from sidecar.secrets.base import SecretBackend
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.factory import BackendStartError, start_backend
from sidecar.tracing import Tracer, start_tracer
from sidecar.upstream import Upstream

if TYPE_CHECKING:
    from sidecar.mitm import CertificateAuthority
    from sidecar.workers import WorkerRole

log = logging.getLogger("sidecar.app")

#: Longest wait between prefetch attempts while the store is failing.
PREFETCH_MAX_BACKOFF = 30.0
#: Largest request line or header the data plane accepts (aiohttp default is 8190).
#: Entra ID tokens with many groups run past 8 KiB; identity/jwt_bearer.py refuses those over 16 KiB.
MAX_HEADER_BYTES = 32 * 1024
GIL_SWITCH_SECONDS = 0.0005


@dataclass
class _Parts:
    """The long-lived objects a Runtime is assembled from; kept across reloads when unchanged."""

    settings: Settings
    backend: SecretBackend
    cache: SecretCache
    identity: IdentityResolver
    upstreams: dict[str, Upstream]
    #: per upstream, built anew for each config (never kept: a kept upstream may meet a new cache)
    credentials: dict[str, CredentialProvider]


class Sidecar:
    """The running process: listeners, current runtime, readiness."""

    def __init__(
        self,
        settings: Settings,
        worker: WorkerRole | None = None,
        *,
        access_log: AccessLog | None = None,
        backend: SecretBackend | None = None,
    ) -> None:
        """``access_log`` and ``backend`` are for in-process tests (tests/support/plane.py): where
        access lines go instead of stdout, and a started store served instead of ``secrets.backend``'s."""
        self.settings = settings
        self.worker = worker
        self._access_log = access_log
        self._backend = backend
        #: The data-plane address once bound (with port 0 in the config, the port the system chose).
        self.address: ListenAddress | None = None
        self.draining = False
        self._prefetched = False
        self._published: bool | None = None  # the readiness last reported
        self._identity_watch: asyncio.Task[None] | None = None
        self._parts: _Parts | None = None
        self._plane: DataPlane | None = None
        self._front: Front | None = None
        self._authority: CertificateAuthority | None = None
        self._admin_runner: web.AppRunner | None = None
        self._prefetch_task: asyncio.Task[None] | None = None
        self._retire_tasks: set[asyncio.Task[None]] = set()
        self._tracer: Tracer | None = None

    @property
    def ready(self) -> bool:
        """What /readyz says: prefetch done, the identity resolver ready, not draining."""
        parts = self._parts
        return self._prefetched and not self.draining and parts is not None and parts.identity.ready

    def _publish(self) -> None:
        """Report readiness where it is read (sidecar_ready, or the supervisor) and the key-load gauge."""
        parts = self._parts
        if parts is not None:
            metrics.set_jwks_keys_loaded(parts.identity.ready if parts.settings.identity.jwt else None)
        ready = self.ready
        if ready == self._published:
            return
        self._published = ready
        if self.worker is None:
            metrics.READY.set(1 if ready else 0)
        else:
            self.worker.report("ready" if ready else "unready")

    def _watch_identity(self, identity: IdentityResolver) -> None:
        """Publish readiness once ``identity`` (the current runtime's) is ready."""
        if self._identity_watch is not None:
            self._identity_watch.cancel()
            self._identity_watch = None
        if identity.ready:
            return

        async def watch() -> None:
            await identity.wait_ready()
            self._publish()

        self._identity_watch = asyncio.get_running_loop().create_task(watch())

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Build everything and bind both listeners; raises StartupError."""
        s = self.settings
        worker = self.worker
        # A worker signs with its supervisor's CA, and the supervisor wrote ca_cert_out.
        self._authority = open_authority(
            s.forward_proxy.mitm, worker.ca if worker is not None else None, write_out=worker is None
        )
        parts = await self._build(self.settings, None)
        self._parts = parts
        access_log = self._access_log or AccessLog(self.settings.log.format, shared=self.worker is not None)
        self._plane = DataPlane(self._runtime(parts), access_log)
        if s.tracing.otlp_endpoint is not None:
            self._tracer = self._plane.tracer = start_tracer(s.tracing)
        self._front = Front(
            self._plane,
            {
                "access_log": None,
                "max_line_size": MAX_HEADER_BYTES,
                "max_field_size": MAX_HEADER_BYTES,
                # An app that hangs up cancels its upstream call instead of holding a
                # pooled connection until timeout_seconds.
                "handler_cancellation": True,
                # SO_KEEPALIVE finds dead peers across a network; the app is in the same pod
                # (loopback), and the setsockopt costs a few µs per accepted connection.
                "tcp_keepalive": False,
            },
            self._authority,
        )
        try:
            if self.worker is None:
                self._admin_runner = await start_admin(s.admin_listen, lambda: self.ready)
                host, port = await self._front.listen(s.listen.host, s.listen.port)
            else:
                # One of several processes on one port (SO_REUSEPORT); the supervisor owns admin.
                host, port = await self._front.listen(s.listen.host, self.worker.port, reuse_port=True)
        except OSError as exc:
            await self._close_parts(parts)
            if self._admin_runner is not None:
                await self._admin_runner.cleanup()
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
        self.address = ListenAddress(host, port)
        log.info(
            "listening" if self.worker is None else "worker listening",
            extra={
                "listen": str(self.address),
                "pid": os.getpid(),
                "admin_listen": bound_address(self._admin_runner),
                "upstreams": sorted(s.upstreams),
                "backend": s.secrets.backend,
                "identity": "jwt" if s.identity.jwt else "header",
                "build": build(),  # compiled (mypyc) or python: see setup.py
                **({"worker": self.worker.index} if self.worker is not None else {}),
            },
        )
        if self.worker is not None:
            self.worker.report("listening")
        self._publish()
        self._watch_identity(parts.identity)
        self._prefetch_task = asyncio.get_running_loop().create_task(self._prefetch_then_ready(parts))

    async def _build(self, settings: Settings, previous: _Parts | None) -> _Parts:
        """Build the parts for ``settings``, reusing unchanged ones from ``previous``."""
        if previous is not None and previous.settings.secrets == settings.secrets:
            backend, cache = previous.backend, previous.cache
        else:
            if previous is None and self._backend is not None:
                backend = self._backend
            else:
                try:
                    backend = await start_backend(settings.secrets)
                except BackendStartError as exc:
                    raise StartupError(str(exc)) from None
            cache = SecretCache(backend, settings.secrets.cache, lookup_timeout=settings.secrets.lookup_timeout_seconds)
            backend.on_change = cache.clear
        if previous is not None and previous.settings.identity == settings.identity:
            identity = previous.identity
        else:
            identity = build_identity_resolver(settings.identity)
            # At start the listeners must not wait for the provider (/readyz says 503 meanwhile);
            # a reload waits for one attempt, so a reachable provider means no unready moment.
            await identity.start(wait=previous is not None)
        upstreams: dict[str, Upstream] = {}
        started: list[Upstream] = []
        credentials: dict[str, CredentialProvider] = {}
        try:
            for name, up_settings in settings.upstreams.items():
                old = previous.upstreams.get(name) if previous is not None else None
                if old is not None and old.settings == up_settings:
                    upstream = old
                else:
                    upstream = Upstream(up_settings)
                    try:
                        await upstream.start()
                    except (ssl.SSLError, OSError):
                        # check read the ca_file; it changed since (or cannot be read now).
                        raise StartupError(f"upstreams.{name}.ca_file: no PEM certificate could be loaded") from None
                    started.append(upstream)
                upstreams[name] = upstream
                # Every provider is new: over this config's cache, handed the one it replaces
                # for what outlives a reload (OAuth tokens).
                replaced = previous.credentials.get(name) if previous is not None else None
                try:
                    credentials[name] = build_provider(up_settings, cache, upstream.key_wait, replaced)
                except CredentialBuildError as exc:
                    raise StartupError(str(exc)) from None
        except BaseException:
            # A reload that fails here keeps the running parts: close only what was built for it.
            for provider in credentials.values():
                await provider.close()
            for upstream in started:
                await upstream.close()
            if previous is None or identity is not previous.identity:
                await identity.close()
            if previous is None or backend is not previous.backend:
                await backend.close()
            raise
        return _Parts(settings, backend, cache, identity, upstreams, credentials)

    @staticmethod
    def _runtime(parts: _Parts) -> Runtime:
        return Runtime(
            routes=Routes.build(
                parts.upstreams, parts.settings.forward_proxy, parts.identity.strip_headers, parts.credentials
            ),
            identity=parts.identity,
        )

    async def _prefetch_then_ready(self, parts: _Parts) -> None:
        pending = [
            (client, up, parts.credentials[name])
            for client in parts.settings.secrets.prefetch
            for name, up in parts.upstreams.items()
            if client_allowed(up.client_matcher, client)
        ]
        delay = 0.5
        while pending:
            retry = []
            for client, up, credential in pending:
                try:
                    await credential.prefetch(client)  # the OAuth types log their own failures
                except NoCredential:
                    log.warning("prefetch: no credential", extra={"client_id": client, "upstream": up.name})
                except SecretStoreUnavailable:
                    retry.append((client, up, credential))
            pending = retry
            if pending:
                log.warning("prefetch: secret store unavailable; retrying", extra={"remaining": len(pending)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, PREFETCH_MAX_BACKOFF)
        if parts.settings.secrets.prefetch:
            log.info("prefetch done", extra={"clients": len(parts.settings.secrets.prefetch)})
        self._prefetched = True
        self._publish()

    # ------------------------------------------------------------------ reload

    async def reload(self, path: Path) -> bool:
        """SIGHUP: apply a valid new config; keep the old one on any problem."""
        try:
            settings = await asyncio.get_running_loop().run_in_executor(None, load_settings, path)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("invalid").inc()
            log.error("config reload refused; the running config stays", extra={"problems": exc.problems})
            return False
        old = self._parts
        assert old is not None and self._plane is not None
        if settings.forward_proxy.mitm != old.settings.forward_proxy.mitm and (
            settings.forward_proxy.mitm.enabled and self._authority is None
        ):
            log.warning("config reload: turning TLS interception on needs a restart; not applied")
        for key in ("listen", "admin_listen", "workers", "tracing"):
            if getattr(settings, key) != getattr(old.settings, key):
                log.warning("config reload: %s changes need a restart; not applied", key)
        try:
            parts = await self._build(settings, old)
        except StartupError as exc:
            metrics.CONFIG_RELOADS.labels("invalid").inc()
            log.error("config reload refused; the running config stays", extra={"problems": [str(exc)]})
            return False
        self._parts = parts
        self._plane.runtime = self._runtime(parts)
        if parts.identity is not old.identity:
            self._watch_identity(parts.identity)
        self._publish()
        if settings.log != old.settings.log:
            configure_logging(settings.log.level, settings.log.format)
            self._plane.access_log = AccessLog(settings.log.format, shared=self.worker is not None)
        self.settings = settings
        metrics.CONFIG_RELOADS.labels("ok").inc()
        log.info("config reloaded", extra={"upstreams": sorted(settings.upstreams)})
        if self.worker is None or self.worker.index == 0:
            log_config_warnings(settings)
        self._retire(old, parts)
        return True

    def _retire(self, old: _Parts, new: _Parts) -> None:
        """Close what the new runtime dropped, after in-flight requests had time to finish."""
        upstreams = [u for n, u in old.upstreams.items() if new.upstreams.get(n) is not u]
        # Every provider is replaced; the new ones took over what outlives a reload.
        credentials = [c for n, c in old.credentials.items() if new.credentials.get(n) is not c]
        for credential in credentials:
            credential.retire()  # no more background token requests; requests in flight still call it
        identity = old.identity if old.identity is not new.identity else None
        backend = old.backend if old.backend is not new.backend else None
        cache = old.cache if old.cache is not new.cache else None
        if identity is not None:
            identity.retire()  # no more key fetches for it; requests in flight keep its keys

        async def later() -> None:
            await asyncio.sleep(self.settings.shutdown_grace_seconds)
            # Together: each waits for its own token requests in flight (credentials/oauth.py close).
            await asyncio.gather(*(credential.close() for credential in credentials))
            for up in upstreams:
                await up.close()
            if identity is not None:
                await identity.close()
            if cache is not None:
                cache.close()
            if backend is not None:
                await backend.close()

        task = asyncio.get_running_loop().create_task(later())
        self._retire_tasks.add(task)
        task.add_done_callback(self._retire_tasks.discard)
        task.add_done_callback(refreeze_heap)

    # ------------------------------------------------------------------ stop

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace, close everything."""
        self.draining = True
        self._publish()
        metrics.DRAINING.set(1)
        log.info("draining", extra={"grace_seconds": self.settings.shutdown_grace_seconds})
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
        if self._identity_watch is not None:
            self._identity_watch.cancel()
        if self._front is not None:
            await self._front.drain(self.settings.shutdown_grace_seconds)
        for task in list(self._retire_tasks):
            task.cancel()
        if self._parts is not None:
            await self._close_parts(self._parts)
        if self._tracer is not None:
            await self._tracer.close()  # the last spans, within tracing.timeout_seconds
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._authority is not None:
            self._authority.close()
        log.info("stopped")

    @staticmethod
    async def _close_parts(parts: _Parts) -> None:
        # Together: each waits for its own token requests in flight (credentials/oauth.py close).
        await asyncio.gather(*(credential.close() for credential in parts.credentials.values()))
        for up in parts.upstreams.values():
            await up.close()
        await parts.identity.close()
        parts.cache.close()
        await parts.backend.close()


async def serve(settings: Settings, config_path: Path | None, worker: WorkerRole | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads ``config_path``. Returns the exit code."""
    loop = asyncio.get_running_loop()
    sidecar = Sidecar(settings, worker)
    try:
        await sidecar.start()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    freeze_startup_heap()
    stop = asyncio.Event()

    def draining() -> None:
        sidecar.draining = True

    def second(signame: str) -> None:
        log.warning("second %s: exiting now", signame)

    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        if config_path is None:
            log.warning("SIGHUP ignored: no config file to reload")
            return
        task = loop.create_task(sidecar.reload(config_path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    on_signals(loop, stop, log=log, draining=draining, second=second, hup=on_hup)
    await stop.wait()
    await sidecar.drain()
    return 0


def freeze_startup_heap() -> None:
    """Move everything alive after startup out of the cyclic collector's reach.

    Imported modules, the settings and, with the AWS backend, botocore's service model and
    session (about 50,000 objects) live as long as the process. A full collection re-scans
    every tracked object: with them in the heap it took ~30 ms, and a burst of new
    connections triggers one, stalling every request in flight. Frozen, they are skipped;
    a collection first, so startup garbage is freed rather than frozen.
    """
    gc.collect()
    gc.freeze()


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one, as Go programs and nginx's
    ``worker_rlimit_nofile`` do.

    Container runtimes now often start processes with a soft limit of 1024 (and a hard
    one far above). Each app connection and each pooled upstream connection (up to 256
    per upstream, kept while idle) holds a descriptor, so 1024 can run out in a burst.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = open_files_target(soft, hard)
    if target is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-files limit", extra={"soft": soft, "hard": hard})


def open_files_target(soft: int, hard: int) -> int | None:
    """The soft limit to set, or None when it cannot go higher.

    An unlimited hard limit gives 2**20, Linux's default ceiling (``fs.nr_open``): the
    kernel refuses an unlimited soft limit for open files. An unlimited soft limit is
    never touched.
    """
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    return target


def refreeze_heap(_retired: object = None) -> None:
    """After a reload has closed what it replaced: thaw, collect, freeze again.

    The retired runtime (upstream clients, the identity provider's keys, a store
    client) was frozen with everything else at startup, and frozen objects in
    reference cycles are never collected. One full collection per reload (~30 ms)
    frees them.
    """
    gc.unfreeze()
    freeze_startup_heap()


def log_config_warnings(settings: Settings) -> None:
    """The config's warnings (what ``check`` prints to stderr), one log line each."""
    for warning in settings.warnings:
        log.warning("config: %s", warning)


def warn_if_stale_build() -> None:
    """An in-place compiled build (scripts/compile.sh) older than its sources runs the old code: say so."""
    changed = stale_sources()
    if changed:
        log.warning(
            "compiled modules are older than their sources: the old code is running",
            extra={"changed": changed[:10], "fix": "bash scripts/compile.sh, or scripts/compile.sh --clean"},
        )


def run(settings: Settings, config_path: Path | None, worker: WorkerRole | None = None) -> int:
    """Blocking entry point: logging, event loop (uvloop when installed), serve."""
    configure_logging(settings.log.level, settings.log.format)
    if worker is None or worker.index == 0:
        warn_if_stale_build()
        log_config_warnings(settings)
    # The store call (botocore) and file reads run in threads. While the event loop is
    # busy (a burst of requests waiting for that very key), a thread waits up to the
    # switch interval each time it needs the GIL back: 5 ms by default, several times
    # per store call. 0.5 ms bounds that; it changes nothing while no thread waits.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    raise_open_files_limit()
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    try:
        return runner(serve(settings, config_path, worker))
    finally:
        flush_access_lines()
        metrics.apply_pending()
