"""The canonical access line: valid JSON whatever the path holds, the contract's fields."""

from __future__ import annotations

import io
import json

import pytest

from sidecar.access_log import AccessLog


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
