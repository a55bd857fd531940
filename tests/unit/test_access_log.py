"""The canonical access line: valid JSON whatever the path holds, the contract's fields."""

from __future__ import annotations

import io
import json

import pytest

from sidecar import metrics
from sidecar.access_log import AccessLog
from sidecar.metrics import REGISTRY
from sidecar.record import FixedLine, Record


@pytest.mark.parametrize("path", ['/p/a"b', "/p/back\\slash", "/p/\x01ctl", "/p/é€", "/p/" + "x" * 2000])
def test_line_is_valid_json_with_contract_fields(path: str) -> None:
    out = io.StringIO()
    log = AccessLog("json", out)
    log.line(
        method="GET", path=path, mode="route", upstream="polygon", status=200, elapsed=0.0012345,
        client_id="alice@example.com", identity="header", cache="hit",
    )
    log.line(
        method="CONNECT", path="evil.example:443", mode="tunnel", upstream="-", status=403, elapsed=0.0,
        error="destination_not_allowed", reason='not "an" upstream', destination="evil.example:443",
    )
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "request"
    assert first["path"] == path[:512]
    assert first["client_id"] == "alice@example.com"
    assert first["status"] == 200 and first["duration_ms"] == 1.234 and first["cache"] == "hit"
    assert "error" not in first
    assert second["client_id"] is None and second["error"] == "destination_not_allowed"
    assert second["reason"] == 'not "an" upstream' and second["destination"] == "evil.example:443"


def test_text_format_for_local_runs() -> None:
    out = io.StringIO()
    AccessLog("text", out).line(
        method="GET", path="/p/x", mode="route", upstream="p", status=200, elapsed=0.001, client_id="a", cache="miss"
    )
    line = out.getvalue()
    assert "client_id=a" in line and "status=200" in line and "cache=miss" in line and "error=" not in line


def test_account_keeps_the_three_shapes_of_counting() -> None:
    """A data-plane request is in flight and timed; a CONNECT is in flight but gives no duration
    sample (a tunnel's lifetime is no latency); a head aiohttp could not parse is neither."""
    out = io.StringIO()
    log = AccessLog("json", out)

    def sample(name: str, **labels: str) -> float:
        metrics.apply_pending()
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def counts(upstream: str, status: str) -> tuple[float, float, float]:
        return (
            sample("sidecar_requests_total", upstream=upstream, status=status),
            sample("sidecar_request_duration_seconds_count", upstream=upstream),
            sample("sidecar_inflight_requests"),
        )

    plane, tunnel = Record(), Record()
    plane.upstream, plane.status, plane.path = "acct-plane", 200, "/acct-plane/x"
    tunnel.upstream, tunnel.status, tunnel.path, tunnel.mode = "acct-tunnel", 200, "h.example:443", "tunnel"
    before = counts("acct-plane", "200")
    metrics.bump(metrics.INFLIGHT)
    log.account(FixedLine("GET", "/acct-plane/x?q=1"), plane, 0.25)
    assert counts("acct-plane", "200") == (before[0] + 1, before[1] + 1, before[2])
    before = counts("acct-tunnel", "200")
    metrics.bump(metrics.INFLIGHT)
    log.account(FixedLine("CONNECT"), tunnel, 3.0, timed=False)
    assert counts("acct-tunnel", "200") == (before[0] + 1, before[1], before[2])

    unparsed = Record()
    unparsed.status, unparsed.error, unparsed.reason = 400, "bad_request", "malformed"
    before = counts("-", "400")
    log.account(FixedLine("-"), unparsed, 0.0, timed=False, inflight=False)
    assert counts("-", "400") == (before[0] + 1, before[1], before[2])

    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["method"], first["path"], first["duration_ms"]) == ("GET", "/acct-plane/x", 250.0)
    assert (second["method"], second["path"], second["mode"], second["duration_ms"]) == (
        "CONNECT", "h.example:443", "tunnel", 3000.0
    )
    assert (third["method"], third["path"], third["upstream"], third["status"], third["duration_ms"]) == (
        "-", "-", "-", 400, 0.0
    )
    assert (third["error"], third["reason"]) == ("bad_request", "malformed")
