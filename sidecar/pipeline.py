"""The data plane: identity -> policy -> credential -> inject -> forward -> stream back.

One pipeline, ``DataPlane.serve``, over an ``Exchange`` (exchange.py) from either
server: the lean one (fastserver.py) or aiohttp's low-level server (aio_exchange.py;
no router, no middlewares). ``Routes.route`` (routing.py) picks the upstream: the
first path segment or the absolute-form host, one dict look-up. Every refusal is a
SidecarError the exchange turns into its answer (``Exchange.refuse``); every request
ends in one access-log line (``AccessLog.account``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import StreamReader
from multidict import CIMultiDict

from sidecar import metrics
from sidecar.errors import (
    BadRequest,
    ClientNotAllowed,
    NoCredential,
    SecretStoreUnavailable,
    SidecarError,
)
from sidecar.exchange import Exchange, ResponseHead
from sidecar.identity.base import Identity, IdentityResolver
from sidecar.policy import client_allowed, scopes_allowed
from sidecar.record import Record
from sidecar.refusal import reason_phrase
from sidecar.routing import Route, Routes
from sidecar.secrets.base import Secret
from sidecar.transport.base import UpstreamAnswer
from sidecar.upstream import Upstream

if TYPE_CHECKING:
    from sidecar.access_log import AccessLog
    from sidecar.tracing import RequestTracer

log = logging.getLogger("sidecar.proxy")  # the name operators filter on, kept from before the module was renamed


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything compiled from one config. A request keeps the Runtime it started with.

    Its field types are imported at run time, not only for the type checker: mypyc
    (see setup.py) compiles this dataclass and needs them.
    """

    routes: Routes  # the upstreams, and each one's credential provider
    identity: IdentityResolver


@dataclass(slots=True)
class Admitted:
    """A request that passed routing, identity, policy and the credential lookup."""

    route: Route
    upstream: Upstream  # route.upstream, at hand
    path: str
    query: str
    identity: Identity
    secret: Secret


def _check_path(path: str) -> None:
    """Refuse dot segments (also percent-encoded) and other paths an upstream could reinterpret."""
    if "#" in path or "\\" in path:
        raise BadRequest("The request path contains characters the sidecar will not forward.", reason="bad_path")
    if "." in path or "%" in path:
        decoded = unquote(path)
        for segment in decoded.replace("\\", "/").split("/"):
            # "..;x" too: Tomcat, Jetty and Spring drop ";params" and then walk up a level.
            if segment.partition(";")[0] in (".", ".."):
                raise BadRequest("Dot segments are not allowed in the path.", reason="dot_segment")


class DataPlane:
    """The request pipeline: ``serve`` runs one exchange from either server."""

    def __init__(self, runtime: Runtime, access_log: AccessLog) -> None:
        self.runtime = runtime
        self.access_log = access_log
        self.tracer: RequestTracer | None = None  # tracing.otlp_endpoint set: sidecar/tracing.py

    async def serve(self, ex: Exchange) -> None:
        """Take one request from its head to its answer; the exchange writes what goes back."""
        rt = self.runtime
        started = time.perf_counter()
        rec = Record()
        metrics.bump(metrics.INFLIGHT)
        span = None if self.tracer is None else self.tracer.start(ex.method, ex.headers)
        try:
            if ex.refusal is not None:
                raise ex.refusal
            admitted = await self._admit(rt, ex, rec)
            headers = ex.outgoing()
            self._drop_hop_headers(admitted.route.drop, headers)
            if span is not None:
                span.inject(headers)
            data: bytes | StreamReader | None
            if ex.body_ready:
                data = ex.body
                replayable = True
            else:
                data, replayable = await ex.read_body()
            answer, secret = await self._exchange(ex.method, admitted, headers, data, replayable, rec)
            upstream = admitted.upstream
            head = ResponseHead(answer, upstream.injection.scrubber(secret), upstream.settings.timeout_seconds)
            rec.status = head.status
            if not await ex.relay(answer, head):
                rec.reason = "stream_interrupted"
        except SidecarError as err:
            ex.refuse(self._refuse(err, rec), reason_phrase(err, rec.mode))
        except asyncio.CancelledError:
            # The app hung up: the upstream call is abandoned with it.
            rec.status = rec.status or 499
            rec.reason = "client_closed"
            raise
        except Exception as exc:
            bug = self._refuse(self._bug(exc, rec), rec)
            ex.refuse(bug, reason_phrase(bug, rec.mode))
        finally:
            self.access_log.account(ex, rec, time.perf_counter() - started)
            if span is not None:
                span.end(rec)

    @staticmethod
    def _bug(exc: Exception, rec: Record) -> SidecarError:
        # A bug, not a refusal. The exception text could hold a URL with a key in it,
        # so only its type is logged.
        log.error(
            "unexpected failure handling a request",
            extra={"upstream": rec.upstream, "exception": type(exc).__name__},
        )
        return SidecarError(reason="internal_error")

    @staticmethod
    def _refuse(err: SidecarError, rec: Record) -> SidecarError:
        rec.status = err.status
        rec.error = err.code
        rec.reason = err.reason
        metrics.count_refusal(err.code)
        return err

    async def _admit(self, rt: Runtime, ex: Exchange, rec: Record) -> Admitted:
        """Route, identify, check policy and get the credential; every refusal raises."""
        route, path, query = rt.routes.route(ex.method, ex.raw_path, ex.origin, rec)
        upstream = route.upstream
        rec.upstream = route.name
        _check_path(path)
        # An absolute-form request may name its client to the proxy (a Proxy-Authorization user);
        # a request in an intercepted tunnel has whatever its CONNECT named.
        headers = ex.headers
        proxy_client_id = (
            rt.identity.proxy_client_id(headers, connect=False) if rec.mode == "proxy" else ex.tunnel_client_id
        )
        identity = await rt.identity.resolve(headers, proxy_client_id)
        rec.client_id = identity.client_id
        rec.identity = identity.source
        if not client_allowed(upstream.client_matcher, identity.client_id):
            raise ClientNotAllowed(reason="client_glob")
        if upstream.scopes and not scopes_allowed(upstream.scopes, identity.scopes):
            raise ClientNotAllowed("The caller holds none of the scopes this upstream needs.", reason="scope")
        rec.credential = route.logged_type  # the OAuth types are named on the access line
        try:
            # api_key: the secret cache (credentials/static.py); OAuth: an access token, a
            # dict look-up when one is cached (credentials/oauth.py).
            secret, rec.cache = await route.credential.get(identity)
        except (NoCredential, SecretStoreUnavailable) as err:
            rec.cache = err.lookup  # the cache's outcome word, set where it was decided
            raise
        return Admitted(route, upstream, path, query, identity, secret)

    @staticmethod
    def _drop_hop_headers(drop: frozenset[str], headers: CIMultiDict[str]) -> None:
        """Remove identity, hop-by-hop and app-supplied key headers (the route's ``drop``) from the outgoing copy."""
        connection = headers.getall("Connection", None)
        for name in drop:
            headers.popall(name, None)
        if connection:
            # RFC 9110 7.6.1: fields named in Connection are for this hop only, on every
            # Connection line (a second line is as valid as a list in one).
            for line in connection:
                for token in line.split(","):
                    headers.popall(token.strip(), None)

    async def _exchange(
        self,
        method: str,
        admitted: Admitted,
        headers: CIMultiDict[str],
        data: bytes | StreamReader | None,
        replayable: bool,
        rec: Record,
    ) -> tuple[UpstreamAnswer, Secret]:
        """Inject, send; on 401/403 with a new credential to be had, send once more.

        The provider decides (``rejected``): a stored key rotated in the store, on 401 or
        403; a new OAuth token, on 401 only.
        """
        upstream = admitted.upstream
        secret = admitted.secret
        client = admitted.identity.client_id
        target = upstream.injection.target(admitted.path, admitted.query, headers, secret)
        answer = await upstream.send(method, target, headers, data, client)
        status = answer.status
        if status == 401 or status == 403:
            fresh = await admitted.route.credential.rejected(admitted.identity, secret, status)
            if fresh is None:
                metrics.ROTATIONS.labels(upstream.name, "unchanged").inc()
            elif not replayable:
                metrics.ROTATIONS.labels(upstream.name, "not_replayable").inc()
                rec.reason = "credential_refreshed_not_replayed"
            else:
                # The key was rotated in the store: the refused answer is dropped and the
                # request is sent once more with the new value.
                answer.close()
                metrics.ROTATIONS.labels(upstream.name, "replayed").inc()
                log.info("upstream refused a credential that has since changed; replaying once",
                         extra={"upstream": upstream.name, "client_id": client})
                rec.reason = "credential_rotated"
                secret = fresh
                target = upstream.injection.target(admitted.path, admitted.query, headers, secret)
                answer = await upstream.send(method, target, headers, data, client)
        return answer, secret
