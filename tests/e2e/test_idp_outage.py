"""JWT mode with the identity provider down, through the real CLI (issue 17, identity-provider half).

The provider is down in two ways: a black hole (a listener that accepts and never
answers, what a dead route or a broken load balancer looks like) and a closed port
(connection refused). Until signing keys are loaded the sidecar is not ready and a
token it cannot check is a retryable 503, not a 401; keys are retried in the
background, so it becomes ready on its own once the provider is back, with no
request needed. A hanging JWKS refetch never holds up tokens whose key is known.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.identity import jwt_bearer
from tests.support.idp import BlackHole, IdentityProvider, ThreadedIdP, make_key
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess, metric, metrics_text
from tests.support.upstream import EchoUpstream

Start = Callable[..., SidecarProcess]

KEYS_LOADED = "sidecar_jwks_keys_loaded"
UNAVAILABLE = "identity_provider_unavailable"
#: Each attempt against the black hole ends after this (identity.jwt.jwks_timeout_seconds).
FETCH_TIMEOUT = 2.0
#: Slack on every bound: two cores shared with other test runs.
SLACK = 5.0


def back_within() -> float:
    """Longest wait from the provider's return to /readyz 200: one backoff wait at its cap
    after an attempt that was still hanging on the black hole, plus slack."""
    return jwt_bearer.JWKS_RETRY_MAX_SECONDS + FETCH_TIMEOUT + SLACK


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"alice": make_secret("idp-outage")}), encoding="utf-8")
    return path


def config(echo: EchoUpstream, keys_file: Path, **jwt: Any) -> dict[str, Any]:
    return {
        "shutdown_grace_seconds": 2,
        "identity": {"jwt": {"jwks_timeout_seconds": FETCH_TIMEOUT, "client_id_claims": ["client_id"], **jwt}},
        "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
        "upstreams": {
            "polygon": {"url": echo.url + "/echo", "secret": "{client_id}", "inject": {"query": "apiKey"},
                        "allow_private": True},
        },
    }


def call(sc: SidecarProcess, token: str, timeout: float = 15) -> requests.Response:
    return requests.get(sc.url + "/polygon/v2/x", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def gauge(sc: SidecarProcess, name: str) -> float | None:
    """The value of an unlabelled gauge, or None when /metrics does not have it."""
    for family in text_string_to_metric_families(metrics_text(sc)):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def wait_until(condition: Callable[[], bool], timeout: float, what: str, sc: SidecarProcess) -> float:
    """Seconds it took for ``condition`` to hold; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g}s\n{sc.output()[-4000:]}")
        time.sleep(0.1)
    return time.monotonic() - started


def messages(sc: SidecarProcess, level: str, text: str) -> list[dict[str, Any]]:
    return [line for line in sc.lines() if line.get("level") == level and text in str(line.get("message"))]


def assert_unavailable(resp: requests.Response) -> None:
    """The contract's retryable refusal: 503 identity_provider_unavailable with Retry-After."""
    assert resp.status_code == 503, resp.text
    assert resp.headers["X-Sidecar-Error"] == UNAVAILABLE
    assert int(resp.headers["Retry-After"]) > 0
    assert json.loads(resp.text)["error"] == UNAVAILABLE
    assert "WWW-Authenticate" not in resp.headers  # not an authentication failure


@pytest.fixture
def provider() -> Iterator[ThreadedIdP]:
    """A provider that is down until the test brings it up (``come_back``)."""
    threaded = ThreadedIdP(IdentityProvider([make_key("key-1")], issuer_path="/realms/corp"), start=False)
    yield threaded
    threaded.close()


@pytest.mark.parametrize("down", ["black-hole", "refused"])
def test_provider_down_at_start_then_back(
    start_sidecar: Start, provider: ThreadedIdP, echo: EchoUpstream, keys_file: Path, down: str
) -> None:
    idp = provider.idp
    hole: BlackHole | None = None
    if down == "black-hole":
        # Discovery itself hangs: the issuer's port accepts and never answers.
        hole = BlackHole()
        idp.port = hole.port
        jwt: dict[str, Any] = {"issuer": idp.issuer}
    else:
        provider.come_back()  # only to get a port; connections to it are refused from now on
        provider.go_down()
        jwt = {"issuer": idp.issuer, "jwks_url": idp.jwks_url}
    sc = start_sidecar(config(echo, keys_file, **jwt), wait_ready=False)
    try:
        assert sc.readyz() == 503
        assert gauge(sc, KEYS_LOADED) == 0

        token = idp.mint(client_id="alice")
        started = time.monotonic()
        resp = call(sc, token)
        assert time.monotonic() - started < FETCH_TIMEOUT + SLACK
        assert_unavailable(resp)
        assert echo.received == []
        line = sc.wait_for_line(lambda line: line.get("event") == "request" and line.get("status") == 503)
        assert line["error"] == UNAVAILABLE

        # Retried in the background with no request arriving; one warning for the whole outage.
        wait_until(lambda: metric(sc, "sidecar_jwks_refreshes_total", {"result": "error"}) >= 3, 30, "3 attempts", sc)
        assert sc.readyz() == 503
        assert len(messages(sc, "warning", "signing keys")) == 1, sc.output()
        requests_before = len(sc.access_lines())

        if hole is not None:
            hole.close()  # what it accepted stays hanging, as the sidecar's last attempt may be
        provider.come_back()
        took = wait_until(lambda: sc.readyz() == 200, back_within(), "/readyz 200 after the provider came back", sc)
        print(f"\n[measure] {down}: ready {took:.1f}s after the provider came back")
        assert len(sc.access_lines()) == requests_before  # no request was needed
        assert gauge(sc, KEYS_LOADED) == 1
        assert len(messages(sc, "info", "signing keys")) == 1, sc.output()

        resp = call(sc, token)
        assert resp.status_code == 200, resp.text
        assert echo.last().query.startswith("apiKey=")
    finally:
        sc.stop()
        if hole is not None:
            hole.release()


def test_a_hanging_refetch_does_not_stall_known_kids(
    start_sidecar: Start, provider: ThreadedIdP, echo: EchoUpstream, keys_file: Path
) -> None:
    idp = provider.idp
    provider.come_back()
    # No cooldown: the unknown kid below makes a refetch at once; it hangs far longer than the test.
    sc = start_sidecar(
        config(echo, keys_file, issuer=idp.issuer, jwks_url=idp.jwks_url, jwks_cooldown_seconds=0,
               jwks_timeout_seconds=60)
    )
    try:
        assert call(sc, idp.mint(client_id="alice", jti="warm")).status_code == 200
        provider.call(lambda: setattr(idp, "hang", True))
        fetches = provider.call(lambda: idp.hits["jwks"])
        unknown = idp.mint(key=make_key("key-2", serial=2), client_id="alice")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, sc, unknown, 60)
            wait_until(lambda: provider.call(lambda: idp.hits["jwks"]) > fetches, 10, "the refetch reached the IdP", sc)
            latencies = []
            for i in range(20):
                token = idp.mint(client_id="alice", jti=f"known-{i}")  # a new token: no cache hit
                started = time.monotonic()
                resp = call(sc, token)
                latencies.append(time.monotonic() - started)
                assert resp.status_code == 200, resp.text
            assert not pending.done(), "the refetch should still be hanging"
            print(f"\n[measure] known-kid latency during a hanging refetch: max {max(latencies) * 1000:.0f} ms,"
                  f" median {sorted(latencies)[10] * 1000:.0f} ms")
            assert max(latencies) < 1.0
            provider.call(idp.release_hang)
            resp = pending.result(30)
        # Keys are loaded, the kid is still not published: a bad token, not an outage.
        assert resp.status_code == 401 and resp.headers["X-Sidecar-Error"] == "invalid_token"
        assert sc.readyz() == 200
    finally:
        sc.stop()


def test_workers_are_ready_only_with_signing_keys(
    start_sidecar: Start, provider: ThreadedIdP, echo: EchoUpstream, keys_file: Path
) -> None:
    idp = provider.idp
    provider.come_back()
    provider.go_down()
    sc = start_sidecar(
        {"workers": 2, **config(echo, keys_file, issuer=idp.issuer, jwks_url=idp.jwks_url)}, wait_ready=False
    )
    try:
        wait_until(lambda: len(messages(sc, "info", "worker listening")) == 2, 20, "both workers listening", sc)
        wait_until(lambda: metric(sc, "sidecar_jwks_refreshes_total", {"result": "error"}) >= 2, 20, "attempts", sc)
        assert sc.readyz() == 503
        assert gauge(sc, KEYS_LOADED) == 0
        assert gauge(sc, "sidecar_ready") == 0
        assert_unavailable(call(sc, idp.mint(client_id="alice")))

        provider.come_back()
        took = wait_until(lambda: sc.readyz() == 200, back_within(), "/readyz 200 with workers", sc)
        print(f"\n[measure] workers: ready {took:.1f}s after the provider came back")
        assert gauge(sc, KEYS_LOADED) == 1  # the lowest over the workers: every one has keys
        assert gauge(sc, "sidecar_ready") == 1
        for i in range(6):  # new connections, spread over both workers
            resp = requests.get(sc.url + "/polygon/x", timeout=10, headers={
                "Authorization": f"Bearer {idp.mint(client_id='alice', jti=str(i))}", "Connection": "close"})
            assert resp.status_code == 200, resp.text
    finally:
        sc.stop()


def test_sigterm_with_a_black_hole_provider_exits_at_once(
    start_sidecar: Start, echo: EchoUpstream, keys_file: Path
) -> None:
    hole = BlackHole()
    base = f"http://127.0.0.1:{hole.port}"
    sc = start_sidecar(
        config(echo, keys_file, issuer=base + "/realms/x", jwks_url=base + "/jwks.json", jwks_timeout_seconds=60),
        wait_ready=False,
    )
    try:
        wait_until(lambda: hole.accepted >= 1, 10, "a fetch hanging in the black hole", sc)
        assert sc.readyz() == 503
        started = time.monotonic()
        assert sc.stop(timeout=20) == 0
        assert time.monotonic() - started < SLACK
    finally:
        sc.kill()
        hole.release()


def test_reload_follows_the_new_provider_and_drops_the_old_retry(
    start_sidecar: Start, provider: ThreadedIdP, echo: EchoUpstream, keys_file: Path
) -> None:
    idp = provider.idp
    provider.come_back()
    hole = BlackHole()
    base = f"http://127.0.0.1:{hole.port}"
    dead = config(echo, keys_file, issuer=base + "/realms/x", jwks_url=base + "/jwks.json", jwks_timeout_seconds=1)
    sc = start_sidecar(dead, wait_ready=False)
    addresses = {"listen": sc.url.split("//")[1], "admin_listen": sc.admin_url.split("//")[1]}
    try:
        wait_until(lambda: hole.accepted >= 2, 15, "background retries into the black hole", sc)
        assert sc.readyz() == 503

        # SIGHUP to a provider that answers: ready without a request, and the old retry stops.
        sc.write_config({**config(echo, keys_file, issuer=idp.issuer, jwks_url=idp.jwks_url), **addresses})
        sc.signal(signal.SIGHUP)
        wait_until(lambda: sc.readyz() == 200, FETCH_TIMEOUT + SLACK, "/readyz 200 after the reload", sc)
        assert gauge(sc, KEYS_LOADED) == 1
        assert call(sc, idp.mint(client_id="alice")).status_code == 200
        accepted = hole.accepted
        time.sleep(4)  # several of the old backoff's waits (1 s timeouts, waits from 0.5 s)
        assert hole.accepted <= accepted + 1, "the retired provider is still being retried"

        # SIGHUP back to the dead provider: its keys are not loaded, so not ready again.
        sc.write_config({**dead, **addresses})
        sc.signal(signal.SIGHUP)
        wait_until(lambda: sc.readyz() == 503, 10, "/readyz 503 after reloading to a dead provider", sc)
        assert gauge(sc, KEYS_LOADED) == 0
        assert_unavailable(call(sc, idp.mint(client_id="alice", iss=base + "/realms/x")))
    finally:
        sc.stop()
        hole.release()
