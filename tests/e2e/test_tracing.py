"""Traces across the hop: the real CLI exporting to a real OTLP/HTTP receiver, an echo upstream between.

The receiver is an aiohttp server on 127.0.0.1 taking ``POST /v1/traces`` as
OpenTelemetry's exporter sends it (protobuf), decoded with ``opentelemetry-proto``
(the exporter's own dependency). Each payload is also written to the output
folder, so the suite's leak check reads every byte that left for the collector.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from sidecar.config import parse_settings
from sidecar.summary import describe
from sidecar.tracing import traces_url
from tests.support.leaks import make_secret, output_file
from tests.support.plane import data_plane
from tests.support.process import SidecarProcess
from tests.support.upstream import EchoUpstream, closed_port

Start = Callable[..., SidecarProcess]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{APP_SPAN_ID}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
#: OpenTelemetry's SpanKind SERVER and StatusCode ERROR in OTLP.
KIND_SERVER = 2
STATUS_ERROR = 2
WAIT_SECONDS = 20.0


# --------------------------------------------------------------------------- the receiver


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    resource: dict[str, Any]


def _value(v: AnyValue) -> Any:
    return getattr(v, v.WhichOneof("value") or "string_value")


@dataclass
class Collector:
    """An OTLP/HTTP traces endpoint in its own thread: records every span it is sent."""

    spans: list[Span] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    #: Take requests but never answer (a collector that hangs).
    hang: bool = False
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _release: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.hang:
            assert self._release is not None
            await self._release.wait()  # until stop()
            return web.Response(status=503)
        assert request.headers.get("Content-Type") == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        spans = []
        for rs in message.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(
                        s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                        {a.key: _value(a.value) for a in s.attributes}, s.status.code, resource,
                    ))
        with self._lock:
            self.payloads.append(body)
            self.spans.extend(spans)
        with output_file(f"otlp-{os.getpid()}.bin").open("ab") as f:
            f.write(body)  # for the leak check, with everything else the suite wrote
        return web.Response(body=b"", content_type="application/x-protobuf")

    def start(self) -> Collector:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self._release = asyncio.Event()
            app = web.Application()
            app.router.add_post("/v1/traces", self._traces)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        def run() -> None:
            assert self._loop is not None
            self._loop.run_until_complete(serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="otlp-collector", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the OTLP receiver did not start"
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._runner is not None and self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()

    def wait_for(self, predicate: Callable[[Span], bool], what: str) -> Span:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            with self._lock:
                found = next((s for s in self.spans if predicate(s)), None)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no span {what} within {WAIT_SECONDS}s; got {self.spans}")

    def raw(self) -> bytes:
        with self._lock:
            return b"".join(self.payloads)


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector().start()
    yield c
    c.stop()


# --------------------------------------------------------------------------- the sidecar


@pytest.fixture
def keys() -> dict[str, str]:
    return {"alice": make_secret("trace-alice"), "bob": make_secret("trace-bob")}


def config(tmp_path: Path, echo: EchoUpstream, keys: dict[str, str], tracing: dict[str, Any]) -> dict[str, Any]:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({f"mcp/polygon/{c}": v for c, v in keys.items()}), encoding="utf-8")
    upstream = {"secret": "mcp/polygon/{client_id}", "inject": {"query": "apiKey"}, "allow_private": True}
    return {
        "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
        "tracing": tracing,
        "upstreams": {
            "polygon": {**upstream, "url": echo.url + "/echo", "clients": ["alice", "bob"]},
            "onlybob": {**upstream, "url": echo.url + "/echo/onlybob", "clients": ["bob"]},
            "dead": {**upstream, "url": f"http://127.0.0.1:{closed_port()}", "timeout_seconds": 2},
        },
    }


def get(sc: SidecarProcess, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(sc.url + path, headers={"X-Client-Id": "alice", **(headers or {})}, timeout=10)


def parse_traceparent(value: str | None) -> tuple[str, str, str, str]:
    assert value is not None, "the upstream got no traceparent"
    version, trace_id, parent_id, flags = value.split("-")
    return version, trace_id, parent_id, flags


@pytest.mark.parametrize("server", ["fast", "aiohttp"])
def test_the_span_joins_the_app_and_the_upstream(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream, keys: dict[str, str], collector: Collector,
    server: str,
) -> None:
    sc = start_sidecar(
        config(tmp_path, echo, keys, {"otlp_endpoint": collector.url}), env={"SIDECAR_SERVER": server}
    )
    for _ in range(2):  # a miss, then a hit
        resp = get(sc, "/polygon/v2/aggs?adjusted=true", {"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
        assert resp.status_code == 200, resp.text
    seen = echo.received[0]
    assert seen.query == f"adjusted=true&apiKey={keys['alice']}"
    version, trace_id, parent_id, flags = parse_traceparent(seen.header("traceparent"))
    # The upstream's request names the sidecar's span as its parent, in the app's trace.
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent_id != APP_SPAN_ID
    assert seen.header("tracestate") == TRACESTATE
    assert len({r.header("traceparent") for r in echo.received}) == 2  # a span per request

    span = collector.wait_for(lambda s: s.span_id == parent_id, "named by the upstream's traceparent")
    assert span.trace_id == TRACE_ID
    assert span.parent_span_id == APP_SPAN_ID  # the app's span is its parent
    assert span.kind == KIND_SERVER
    assert span.name == "GET polygon"
    assert span.resource["service.name"] == "credential-sidecar"
    assert span.attributes == {
        "http.request.method": "GET",
        "http.response.status_code": 200,
        "sidecar.upstream": "polygon",
        "sidecar.mode": "route",
        "sidecar.cache": "miss",
        "sidecar.identity": "header",
    }
    second = collector.wait_for(lambda s: s.parent_span_id == APP_SPAN_ID and s.span_id != parent_id, "for the hit")
    assert second.attributes["sidecar.cache"] == "hit"

    # What went to the collector holds no key, no query and no client ID (off by default).
    raw = collector.raw()
    for value in (*keys.values(), "apiKey", "adjusted", "alice"):
        assert value.encode() not in raw
    assert sc.stop(timeout=20) == 0


def test_refused_requests_have_spans_with_their_error(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream, keys: dict[str, str], collector: Collector
) -> None:
    sc = start_sidecar(config(tmp_path, echo, keys, {"otlp_endpoint": collector.url}))
    refused = {
        "/onlybob/x": (403, "client_not_allowed"),
        "/nowhere/x": (404, "unknown_upstream"),
        "/dead/x": (502, "upstream_unreachable"),
    }
    for path, (status, code) in refused.items():
        resp = get(sc, path, {"traceparent": TRACEPARENT})
        assert (resp.status_code, resp.headers["X-Sidecar-Error"]) == (status, code)
    assert echo.received == []  # none reached the echo upstream
    for status, code in refused.values():
        span = collector.wait_for(lambda s, code=code: s.attributes.get("sidecar.error") == code, f"for {code}")
        assert (span.trace_id, span.parent_span_id) == (TRACE_ID, APP_SPAN_ID)
        assert span.attributes["http.response.status_code"] == status
        assert "sidecar.reason" in span.attributes
        # A refusal is the caller's (4xx, status unset); a 5xx is an error of this span.
        assert (span.status_code == STATUS_ERROR) == (status >= 500)
        if status >= 500:
            assert span.attributes["error.type"] == code
    assert collector.wait_for(lambda s: s.attributes.get("sidecar.error") == "unknown_upstream", "").name == "GET"


def test_a_request_without_traceparent_starts_a_trace(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream, keys: dict[str, str], collector: Collector
) -> None:
    sc = start_sidecar(config(tmp_path, echo, keys, {"otlp_endpoint": collector.url, "service_name": "fininfo-sc"}))
    assert get(sc, "/polygon/x").status_code == 200
    _, trace_id, parent_id, _ = parse_traceparent(echo.last().header("traceparent"))
    span = collector.wait_for(lambda s: s.span_id == parent_id, "for the new trace")
    assert (span.trace_id, span.parent_span_id) == (trace_id, "")
    assert span.resource["service.name"] == "fininfo-sc"


@pytest.mark.parametrize("fault", ["refused", "hanging"])
def test_a_dead_collector_never_fails_or_slows_requests(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream, keys: dict[str, str], collector: Collector, fault: str
) -> None:
    timeout = 2.0
    if fault == "hanging":
        collector.hang = True
        endpoint = collector.url
    else:
        endpoint = f"http://127.0.0.1:{closed_port()}"
    sc = start_sidecar(config(tmp_path, echo, keys, {"otlp_endpoint": endpoint, "timeout_seconds": timeout}))
    # More spans than one batch (512), so exports are attempted while requests go on.
    with requests.Session() as session:
        for i in range(600):
            started = time.monotonic()
            resp = session.get(sc.url + "/polygon/x", headers={"X-Client-Id": "alice"}, timeout=10)
            assert resp.status_code == 200, resp.text
            # A request that waited for the collector would take the export timeout at least.
            assert time.monotonic() - started < timeout, f"request {i} waited"
    failing = "traces cannot be exported: spans are dropped until the collector answers"
    sc.wait_for_line(lambda line: line.get("message") == failing, timeout=WAIT_SECONDS)
    assert get(sc, "/polygon/x").status_code == 200
    started = time.monotonic()
    assert sc.stop(timeout=30) == 0
    # The drain waits for the last spans at most timeout_seconds (plus the process's own exit).
    assert time.monotonic() - started < timeout + 8
    assert [line.get("message") for line in sc.lines()].count(failing) == 1
    assert collector.spans == []


# --------------------------------------------------------------------------- in process


async def test_the_client_id_is_an_attribute_only_when_asked(collector: Collector, keys: dict[str, str]) -> None:
    for opt_in in (False, True):
        cfg = {
            "tracing": {"otlp_endpoint": collector.url, "client_id": opt_in},
            "upstreams": {"echo": {"url": "${ECHO}", "secret": "k/{client_id}", "inject": {"query": "apiKey"},
                                   "allow_private": True}},
        }
        async with data_plane(cfg, {"k/alice": keys["alice"]}) as p:
            resp = await p.request("GET", "/echo/x", {"traceparent": TRACEPARENT})
            assert resp.status == 200
            _, _, parent_id, _ = parse_traceparent(p.upstream.last().header("traceparent"))
        # The drain (leaving data_plane) flushed the span.
        span = await asyncio.to_thread(collector.wait_for, lambda s, p=parent_id: s.span_id == p, "from the plane")
        assert span.attributes.get("sidecar.client_id") == ("alice" if opt_in else None)


OFF_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from tests.support.plane import data_plane

    async def main():
        cfg = {"upstreams": {"echo": {"url": "${ECHO}", "secret": "k/{client_id}", "inject": {"query": "apiKey"},
                                      "allow_private": True}}}
        async with data_plane(cfg, {"k/alice": sys.argv[2]}) as p:
            resp = await p.request("GET", "/echo/x", {"traceparent": sys.argv[1], "tracestate": "a=b"})
            seen = p.upstream.last()
            print(json.dumps({
                "status": resp.status,
                "traceparent": seen.header("traceparent"),
                "tracestate": seen.header("tracestate"),
                "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
            }))

    asyncio.run(main())
    """
)


def test_off_the_traceparent_passes_unchanged_and_nothing_is_loaded(keys: dict[str, str]) -> None:
    # A fresh interpreter: this one has imported OpenTelemetry for the receiver.
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", OFF_SCRIPT, TRACEPARENT, keys["alice"]],
        capture_output=True, text=True, timeout=60, cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "traceparent": TRACEPARENT, "tracestate": "a=b", "loaded": []}


# --------------------------------------------------------------------------- config


def settings(tracing: Any, tmp_path: Path) -> Any:
    return parse_settings({"tracing": tracing, "upstreams": {}}, base_dir=tmp_path)


def test_tracing_keys_and_summary(tmp_path: Path) -> None:
    s = settings({"otlp_endpoint": "http://otel-collector:4318", "timeout_seconds": 3}, tmp_path)
    assert (s.tracing.otlp_endpoint, s.tracing.service_name, s.tracing.client_id) == (
        "http://otel-collector:4318", "credential-sidecar", False,
    )
    assert "tracing:       OTLP/HTTP http://otel-collector:4318 service=credential-sidecar timeout=3s" in describe(s)
    assert "tracing:" not in describe(settings(None, tmp_path))
    assert settings({"otlp_endpoint": None}, tmp_path).tracing.otlp_endpoint is None


@pytest.mark.parametrize(
    ("tracing", "problem"),
    [
        ({"otlp_endpoint": "otel:4318"}, "tracing.otlp_endpoint: expected an http:// or https:// URL"),
        ({"otlp_endpoint": "http://u:p@otel:4318"}, "tracing.otlp_endpoint: must not contain user information"),
        ({"otlp_endpoint": "http://otel:4318?k=v"}, "tracing.otlp_endpoint: must not contain a query or fragment"),
        ({"otlp_endpoint": "http://otel:4318", "timeout_seconds": 0}, "tracing.timeout_seconds: must be greater"),
        ({"endpoint": "http://otel:4318"}, "tracing.endpoint: unknown key"),
        ({"client_id": "yes"}, "tracing.client_id: expected true or false"),
    ],
)
def test_tracing_config_problems_name_the_field(tracing: dict[str, Any], problem: str, tmp_path: Path) -> None:
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        settings(tracing, tmp_path)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://otel-collector:4318", "http://otel-collector:4318/v1/traces"),
        ("https://otel.example/", "https://otel.example/v1/traces"),
        ("https://gw.example/otlp", "https://gw.example/otlp/v1/traces"),
        ("http://otel:4318/v1/traces", "http://otel:4318/v1/traces"),
    ],
)
def test_spans_go_to_the_base_url_plus_v1_traces(endpoint: str, url: str) -> None:
    assert traces_url(endpoint) == url
