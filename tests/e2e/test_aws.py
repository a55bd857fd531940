"""The real CLI with the AWS Secrets Manager backend against moto's server mode."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.upstream import EchoUpstream, closed_port

Start = Callable[..., SidecarProcess]


def sm(endpoint: str) -> Any:
    return boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=endpoint)


def upstreams(echo: EchoUpstream) -> dict[str, Any]:
    return {
        "polygon": {
            "url": echo.url + "/echo/polygon",
            "secret": "e2e/polygon/{client_id}",
            "inject": {"query": "apiKey"},
            "allow_private": True,
        },
        "internal": {
            "url": echo.url + "/echo/internal",
            "secret": "e2e/internal/{client_id}",
            "secret_field": "api_key",
            "inject": {"header": "X-API-Key"},
            "allow_private": True,
        },
    }


def aws_config(endpoint: str, echo: EchoUpstream, **secrets_extra: Any) -> dict[str, Any]:
    return {
        "secrets": {
            "backend": "aws",
            "aws": {"region": "us-east-1", "endpoint_url": endpoint, "timeout_seconds": 2},
            **secrets_extra,
        },
        "upstreams": upstreams(echo),
    }


def metric(sc: SidecarProcess, name: str, labels: dict[str, str] | None = None) -> float:
    text = requests.get(sc.admin_url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


def call(sc: SidecarProcess, path: str, client: str) -> requests.Response:
    return requests.get(sc.url + path, headers={"X-Client-Id": client}, timeout=15)


@pytest.fixture
def keys() -> dict[str, str]:
    return {"alice": make_secret("aws-alice"), "bob": make_secret("aws-bob"), "carol": make_secret("aws-carol")}


def stored(keys: dict[str, str]) -> dict[str, str | dict[str, str]]:
    """alice's and bob's polygon keys as plain text, carol's internal one in a JSON secret."""
    return {
        "e2e/polygon/alice": keys["alice"],
        "e2e/polygon/bob": keys["bob"],
        "e2e/internal/carol": {"api_key": keys["carol"], "owner": "carol"},
    }


def test_plain_and_json_secrets_injected(configured_sidecar: Start, echo: EchoUpstream, keys: dict[str, str]) -> None:
    sc = configured_sidecar(upstreams(echo), stored(keys), backend="aws")
    assert call(sc, "/polygon/v2/x?a=1", "alice").status_code == 200
    assert echo.last().query == f"a=1&apiKey={keys['alice']}"
    assert call(sc, "/internal/v1/y", "carol").status_code == 200
    assert echo.last().header("X-API-Key") == keys["carol"]
    resp = call(sc, "/polygon/x", "nobody")
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "no_credential"
    # Not found is remembered: the second ask does not reach the store.
    before = metric(sc, "sidecar_secret_fetch_duration_seconds_count")
    assert call(sc, "/polygon/x", "nobody").status_code == 403
    assert metric(sc, "sidecar_secret_fetch_duration_seconds_count") == before
    assert metric(sc, "sidecar_secret_lookups_total", {"result": "negative"}) >= 1


def test_fifty_concurrent_first_requests_make_one_store_call(
    configured_sidecar: Start, echo: EchoUpstream, keys: dict[str, str]
) -> None:
    sc = configured_sidecar(upstreams(echo), stored(keys), backend="aws")
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: call(sc, "/polygon/x", "bob").status_code, range(50)))
    assert results == [200] * 50
    assert metric(sc, "sidecar_secret_fetch_duration_seconds_count", {"backend": "aws"}) == 1


def test_store_down_with_nothing_cached_is_503(start_sidecar: Start, aws_env: dict[str, str], echo: EchoUpstream) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    sc = start_sidecar(aws_config(dead, echo), env=aws_env)
    resp = call(sc, "/polygon/x", "alice")
    assert resp.status_code == 503
    assert resp.headers["X-Sidecar-Error"] == "secret_store_unavailable"
    assert metric(sc, "sidecar_secret_store_errors_total", {"backend": "aws"}) >= 1


def test_stale_value_served_while_store_is_down(
    start_sidecar: Start, aws_env: dict[str, str], echo: EchoUpstream
) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    key = make_secret("stale")
    sm(endpoint).create_secret(Name="e2e/polygon/dave", SecretString=key)
    config = aws_config(endpoint, echo, cache={"ttl_seconds": 0.2, "stale_if_error_seconds": 600})
    sc = start_sidecar(config, env=aws_env)
    try:
        assert call(sc, "/polygon/x", "dave").status_code == 200
    finally:
        server.stop()
    import time

    time.sleep(0.3)  # let the TTL pass
    resp = call(sc, "/polygon/x", "dave")
    assert resp.status_code == 200
    assert echo.last().query == f"apiKey={key}"
    assert metric(sc, "sidecar_secret_lookups_total", {"result": "stale"}) >= 1
    sc.wait_for_line(lambda line: "serving cached values" in str(line.get("message")))


def test_prefetch_loads_before_ready(configured_sidecar: Start, echo: EchoUpstream, keys: dict[str, str]) -> None:
    sc = configured_sidecar(upstreams(echo), stored(keys), backend="aws", store={"prefetch": ["alice", "bob"]})
    # Ready means loaded: both secrets were fetched before the first request.
    assert metric(sc, "sidecar_secret_fetch_duration_seconds_count", {"backend": "aws"}) >= 2
    assert call(sc, "/polygon/x", "alice").status_code == 200
    line = sc.wait_for_line(lambda line: line.get("event") == "request")
    assert line["cache"] == "hit"
