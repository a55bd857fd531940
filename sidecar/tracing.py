"""Traces across the hop: one span per proxied request, exported over OTLP/HTTP.

Off unless ``tracing.otlp_endpoint`` is set. Off, nothing here runs and nothing of
OpenTelemetry is imported: ``DataPlane.serve`` tests ``self.tracer is not None``
and goes on, and the app's incoming ``traceparent``/``tracestate`` reach the
upstream unchanged with the rest of its headers. On, ``start_tracer`` imports the
SDK (the ``tracing`` extra) and ``serve`` asks for a ``RequestSpan`` per request:

- the span is a child of the incoming ``traceparent`` (a new trace without one);
- ``inject`` writes a ``traceparent`` naming this span into the upstream request's
  headers, so the upstream's own spans join below it;
- ``end`` reads the request's ``Record`` (what the access line says) into
  attributes and ends the span: upstream name, method, status, cache outcome,
  refusal code and reason, credential type, mode, identity source; the client ID
  only with ``tracing.client_id: true``. Never the path, a query, a URL, a header
  value or a secret.

Kind SERVER: the span is the sidecar serving the app's call (a refused request,
which never reaches an upstream, is one too), and it pairs with the app's CLIENT
span in service graphs. Spans go through a BatchSpanProcessor (a bounded queue,
a background thread): a slow or dead collector costs requests nothing; spans past
the queue are dropped, and a failing export is logged once, with its recovery.
This module is left out of the compiled build (setup.py): it runs only when
tracing is on, and OpenTelemetry is Python anyway.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

from sidecar import __version__
from sidecar.config import TracingSettings
from sidecar.net import loggable_url
from sidecar.record import Record

if TYPE_CHECKING:
    from multidict import CIMultiDict
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Span

log = logging.getLogger("sidecar.tracing")

#: The OTLP/HTTP path for traces, added to ``otlp_endpoint`` (the collector's base URL).
TRACES_PATH = "/v1/traces"
#: Spans held while the collector is slow; more are dropped, never waited for.
MAX_QUEUE = 2048
#: Methods named as they are; any other method token is ``_OTHER`` (OpenTelemetry's HTTP
#: conventions): an app could otherwise put any text in a span name.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class RequestSpan(Protocol):
    """One request's span, as ``DataPlane.serve`` uses it."""

    def inject(self, headers: CIMultiDict[str]) -> None:
        """Put a ``traceparent`` naming this span (and the ``tracestate``) into the upstream request's headers."""

    def end(self, rec: Record) -> None:
        """Set the attributes from what the request did and end the span."""


class RequestTracer(Protocol):
    """What ``DataPlane.tracer`` is when tracing is on."""

    def start(self, method: str, headers: Mapping[str, str]) -> RequestSpan:
        """A span for a request that just arrived, child of its ``traceparent`` if any."""


def traces_url(endpoint: str) -> str:
    """The URL spans are posted to: the base URL plus /v1/traces (kept when it is there already)."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class Tracer:
    """The OpenTelemetry side: a provider, a batch processor, an OTLP/HTTP exporter. One per process."""

    def __init__(self, settings: TracingSettings) -> None:
        # Imported here, and only here: a sidecar without tracing never loads them.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert settings.otlp_endpoint is not None
        self.settings = settings
        self.url = traces_url(settings.otlp_endpoint)
        # The exporter's own lines repeat on every failed batch; _Reporting says it once.
        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
        self._exporter = _Reporting(
            OTLPSpanExporter(endpoint=self.url, timeout=settings.timeout_seconds), loggable_url(self.url)
        )
        self._processor = BatchSpanProcessor(cast("SpanExporter", self._exporter), max_queue_size=MAX_QUEUE)
        # OTEL_RESOURCE_ATTRIBUTES (pod name, namespace) and OTEL_TRACES_SAMPLER are read
        # from the environment, as every OpenTelemetry SDK does; the service name is ours.
        resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
        # No exit hook: drain flushes within timeout_seconds; the SDK's own would wait up to 30 s.
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("sidecar", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.SERVER
        self._error = StatusCode.ERROR
        self._in_context = set_span_in_context
        self._closed = False

    def start(self, method: str, headers: Mapping[str, str]) -> RequestSpan:
        name = method if method in KNOWN_METHODS else "_OTHER"
        try:
            parent = self._propagator.extract(headers)
            span = self._tracer.start_span(
                name, context=parent, kind=self._kind, attributes={"http.request.method": name}
            )
        except Exception:  # a tracing bug must never refuse a request
            log.exception("cannot start a span")
            return _NO_SPAN
        return _Span(self, span, name)

    async def close(self) -> None:
        """Export what is queued, waiting at most ``timeout_seconds``; then stop. Called once, at drain."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                self._provider.shutdown()  # flushes the queue, then stops the worker thread
            except Exception:
                log.exception("trace export shutdown failed")
            finally:
                try:
                    loop.call_soon_threadsafe(finished)
                except RuntimeError:
                    pass  # the loop is gone: nobody waits any more

        # A daemon thread: a collector that never answers cannot hold the process at exit.
        threading.Thread(target=shutdown, name="trace-flush", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), self.settings.timeout_seconds)
        except TimeoutError:
            self._exporter.abandon()
            log.warning(
                "traces not all exported before exit: the collector did not answer in time",
                extra={"endpoint": self._exporter.endpoint, "timeout_seconds": self.settings.timeout_seconds},
            )


class _Span:
    """A started span and the propagator that writes its ``traceparent``."""

    __slots__ = ("_name", "_span", "_tracer")

    def __init__(self, tracer: Tracer, span: Span, name: str) -> None:
        self._tracer = tracer
        self._span = span
        self._name = name

    def inject(self, headers: CIMultiDict[str]) -> None:
        try:
            # Replaces the app's traceparent (this span is now the parent); the tracestate
            # the app sent goes on with it. A span that is not sampled still propagates.
            self._tracer._propagator.inject(headers, context=self._tracer._in_context(self._span))
        except Exception:
            log.exception("cannot propagate the trace context")

    def end(self, rec: Record) -> None:
        span = self._span
        try:
            if span.is_recording():
                attributes: dict[str, str | int] = {"sidecar.upstream": rec.upstream, "sidecar.mode": rec.mode}
                if rec.status:
                    attributes["http.response.status_code"] = rec.status
                if rec.cache is not None:
                    attributes["sidecar.cache"] = rec.cache
                if rec.error is not None:
                    attributes["sidecar.error"] = rec.error
                if rec.reason is not None:
                    attributes["sidecar.reason"] = rec.reason
                if rec.credential is not None:
                    attributes["sidecar.credential"] = rec.credential
                if rec.identity is not None:
                    attributes["sidecar.identity"] = rec.identity
                if rec.client_id is not None and self._tracer.settings.client_id:
                    attributes["sidecar.client_id"] = rec.client_id
                span.set_attributes(attributes)
                if rec.upstream != "-":
                    span.update_name(f"{self._name} {rec.upstream}")
                if rec.status >= 500:
                    # OpenTelemetry's HTTP server rule: 5xx is an error of this span, 4xx the caller's.
                    error = rec.error or str(rec.status)
                    span.set_attribute("error.type", error)
                    span.set_status(self._tracer._error, error)
            span.end()
        except Exception:
            log.exception("cannot end a span")


class _NoSpan:
    """What ``start`` returns when it failed: the request goes on untraced."""

    __slots__ = ()

    def inject(self, headers: CIMultiDict[str]) -> None:
        return None

    def end(self, rec: Record) -> None:
        return None


_NO_SPAN = _NoSpan()


class _Reporting:
    """The OTLP exporter, saying once that export fails and once that it works again.

    Runs in the batch processor's thread; the lines are logged from the event loop's
    (the access log's writer is not for other threads).
    """

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.inner = inner
        self.endpoint = endpoint
        self.failing = False
        self._ok = SpanExportResult.SUCCESS
        self._failed = SpanExportResult.FAILURE
        self._loop = asyncio.get_running_loop()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            result = self._failed
        if result is not self._ok and not self.failing:
            self.failing = True
            self._say(
                logging.WARNING,
                "traces cannot be exported: spans are dropped until the collector answers",
                {"endpoint": self.endpoint, "spans": len(spans)},
            )
        elif result is self._ok and self.failing:
            self.failing = False
            self._say(logging.INFO, "trace export works again", {"endpoint": self.endpoint})
        return result

    def abandon(self) -> None:
        """Stop waiting for the collector: an export in progress gives up its retries."""
        self.inner.shutdown()

    def shutdown(self) -> None:
        self.inner.shutdown()  # a second call (after abandon) only logs, to a logger silenced above

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def _say(self, level: int, message: str, extra: dict[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(lambda: log.log(level, message, extra=extra))
        except RuntimeError:
            pass  # the loop has closed: the process is exiting


def start_tracer(settings: TracingSettings) -> Tracer:
    """The process's tracer (call from the event loop's thread, at start)."""
    tracer = Tracer(settings)
    log.info(
        "tracing on: one span per request",
        extra={"endpoint": loggable_url(tracer.url), "service_name": settings.service_name},
    )
    return tracer
