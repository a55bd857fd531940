"""Issue 17, the store half: a hanging secret store never stalls a client whose key is cached.

Through the real CLI, against moto's Secrets Manager behind a fault proxy that can
black-hole (accept, never answer):

- a client whose key is past its TTL is answered at once from the cached value for
  the whole outage (stale-while-revalidate), while one background refresh at a time
  fails; the metrics and the access log say so; when the store comes back the refresh
  lands and the new value is used;
- a client with nothing cached gets 503 secret_store_unavailable with Retry-After
  within secrets.lookup_timeout_seconds, also when every store thread is stuck;
- a request that arrives just before the stale window ends is served, not made to
  wait until the window has closed and then refused;
- a secret scheduled for deletion is refused with its own reason and not remembered:
  its restore is seen by the next request.

The AWS per-attempt timeout is 2 s here, so the code before issue 17 (four botocore
calls per lookup, each 2 s, plus backoff) takes 8-15 s where a lookup now ends in 5.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.aws import AWS_ENV
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.raw_http import (
    address,
    assert_alive,
    assert_no_secret,
    exchange,
    get,
    metric,
    running_sidecar,
)
from tests.support.store_faults import FaultProxy, put_secret, secrets_manager
from tests.support.upstream import EchoUpstream

#: secrets.aws.timeout_seconds: one attempt's connect and read timeout.
ATTEMPT_TIMEOUT = 2.0
#: secrets.lookup_timeout_seconds, left at its default.
LOOKUP_TIMEOUT = 5.0
#: What a busy machine may add to a bound: scheduling, the request's own round trip.
SLACK = 1.5
#: How long requests are measured during a black-hole outage: two refresh cycles (a refresh
#: hangs for LOOKUP_TIMEOUT, the next starts STALE_RETRY_SECONDS after it failed).
OUTAGE_SECONDS = 20.0
#: Threads asking for the cached client during the outage.
CALLERS = 2
#: A request served from the cache: far below any store timeout, generous for a busy machine.
FAST = 1.0
TTL = 1.0
SECRETS: list[str] = []


def _secret(label: str) -> str:
    value = make_secret(label)
    SECRETS.append(value)
    return value


def _config(endpoint: str, echo: EchoUpstream, *, stale_if_error: float = 3600) -> dict[str, Any]:
    return {
        "secrets": {
            "backend": "aws",
            "aws": {"region": "us-east-1", "endpoint_url": endpoint, "timeout_seconds": ATTEMPT_TIMEOUT},
            "cache": {"ttl_seconds": TTL, "negative_ttl_seconds": 30, "stale_if_error_seconds": stale_if_error},
        },
        "upstreams": {
            "api": {"url": echo.url + "/status/200", "secret": "adv-outage/{client_id}",
                    "inject": {"query": "apiKey"}, "allow_private": True, "timeout_seconds": 5},
        },
    }


def _call(sc: SidecarProcess, client: str, timeout: float = 60.0) -> Any:
    ex = exchange(sc.url, get("/api", client), timeout=timeout)
    assert_no_secret([ex.raw], *SECRETS)
    return ex


@pytest.fixture(scope="module")
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(address(moto_endpoint)).start()
    yield p
    p.stop()


@pytest.fixture
def sm(moto_endpoint: str, proxy: FaultProxy) -> Iterator[Any]:
    """Seeds moto directly (never through the proxy); the proxy passes again after each test."""
    proxy.mode = "pass"
    yield secrets_manager(moto_endpoint)
    proxy.mode = "pass"


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory, proxy: FaultProxy, _echo_server: EchoUpstream) -> Iterator[SidecarProcess]:
    with running_sidecar(
        _config(proxy.url, _echo_server), tmp_path_factory.mktemp("outage"), env=AWS_ENV, name="store-outage"
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def short_window_sc(
    tmp_path_factory: pytest.TempPathFactory, proxy: FaultProxy, _echo_server: EchoUpstream
) -> Iterator[SidecarProcess]:
    """Values are served at most 4 s past their 1 s TTL."""
    with running_sidecar(
        _config(proxy.url, _echo_server, stale_if_error=4), tmp_path_factory.mktemp("window"), env=AWS_ENV,
        name="store-window",
    ) as proc:
        yield proc


def test_black_hole_store_never_stalls_a_cached_client_and_its_return_is_seen(
    sc: SidecarProcess, sm: Any, proxy: FaultProxy, _echo_server: EchoUpstream
) -> None:
    key = _secret("outage-cached")
    put_secret(sm, "adv-outage/cached", SecretString=key)
    assert _call(sc, "cached").first.status == 200
    time.sleep(TTL + 0.2)  # past its TTL: every request below finds it expired
    stale_before = metric(sc, "sidecar_secret_lookups_total", {"result": "stale"})
    errors_before = metric(sc, "sidecar_secret_refreshes_total", {"result": "error"})
    durations_before = metric(sc, "sidecar_secret_refresh_duration_seconds_count")
    proxy.mode = "blackhole"
    _echo_server.reset()

    latencies: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + OUTAGE_SECONDS

    def caller() -> None:
        while time.monotonic() < end:
            ex = _call(sc, "cached")
            with lock:
                latencies.append(ex.elapsed)
                if not ex.responses or ex.first.status != 200:
                    problems.append(ex.text()[:300])
            time.sleep(0.02)

    with ThreadPoolExecutor(CALLERS) as pool:
        # .result(): a caller that raised (a leak found in _call, a socket error) fails the test.
        for done in [pool.submit(caller) for _ in range(CALLERS)]:
            done.result(timeout=OUTAGE_SECONDS + 120)
    p50, p99, worst = statistics.median(latencies), statistics.quantiles(latencies, n=100, method="inclusive")[98], max(latencies)
    summary = f"{len(latencies)} requests in a {OUTAGE_SECONDS:g} s outage: p50 {p50:.3f} s, p99 {p99:.3f} s, max {worst:.3f} s"
    print(summary)
    assert not problems, problems[:3]
    assert worst < FAST, f"a cached client waited for the hanging store: {summary}"
    assert {r.query for r in _echo_server.received} == {f"apiKey={key}"}

    # The metrics tell the story: every one of them served stale, background refreshes fail,
    # each within the lookup bound.
    assert metric(sc, "sidecar_secret_lookups_total", {"result": "stale"}) - stale_before >= len(latencies)
    failed = metric(sc, "sidecar_secret_refreshes_total", {"result": "error"}) - errors_before
    assert failed >= 1, "no failed background refresh was counted"
    refreshed = metric(sc, "sidecar_secret_refresh_duration_seconds_count") - durations_before
    assert refreshed >= failed
    assert metric(sc, "sidecar_secret_refresh_duration_seconds_bucket", {"le": "10.0"}) == metric(
        sc, "sidecar_secret_refresh_duration_seconds_count"
    ), "a background refresh outlived the lookup bound"
    assert metric(sc, "sidecar_secret_store_errors_total", {"backend": "aws", "kind": "timeout"}) >= 1
    line = sc.wait_for_line(lambda line: line.get("event") == "request" and line.get("client_id") == "cached"
                            and line.get("cache") == "stale")
    assert line["status"] == 200

    # The store comes back with a new value: a background refresh lands it, and no request waited.
    rotated = _secret("outage-rotated")
    put_secret(sm, "adv-outage/cached", SecretString=rotated)
    ok_before = metric(sc, "sidecar_secret_refreshes_total", {"result": "ok"})
    proxy.mode = "pass"
    deadline = time.monotonic() + 3 * LOOKUP_TIMEOUT + 10  # a refresh in flight, the retry pause, the next one
    while True:
        ex = _call(sc, "cached")
        assert ex.first.status == 200 and ex.elapsed < FAST, ex.text()
        if _echo_server.last().query == f"apiKey={rotated}":
            break
        assert time.monotonic() < deadline, "the store came back but the new value was never used"
        time.sleep(0.1)
    assert metric(sc, "sidecar_secret_refreshes_total", {"result": "ok"}) >= ok_before + 1
    assert_alive(sc)


def test_cold_clients_get_a_503_with_retry_after_within_the_lookup_timeout(
    sc: SidecarProcess, sm: Any, proxy: FaultProxy
) -> None:
    """Twelve cold clients at once: more than the eight store threads, so four wait for a
    thread that a hung call holds. Each still has its answer within the bound, and so has
    one more right after, while every thread is still stuck."""
    clients = [f"cold-{i}" for i in range(12)]
    for client in clients:
        put_secret(sm, f"adv-outage/{client}", SecretString=_secret(client))
    proxy.mode = "blackhole"
    with ThreadPoolExecutor(len(clients)) as pool:
        asked = {client: pool.submit(_call, sc, client) for client in clients}
        results: dict[str, Any] = {client: done.result(timeout=60) for client, done in asked.items()}
    results["cold-after"] = _call(sc, "cold-after")
    assert set(results) == {*clients, "cold-after"}
    for client, ex in results.items():
        r = ex.first
        assert r.status == 503 and r.sidecar_error == "secret_store_unavailable", f"{client}: {ex.text()}"
        assert (r.header("Retry-After") or "").isdigit(), f"{client}: no Retry-After"
        assert ex.elapsed < LOOKUP_TIMEOUT + SLACK, f"{client} waited {ex.elapsed:.1f} s for its 503"
    assert_alive(sc)


def test_a_request_near_the_end_of_the_stale_window_is_served(
    short_window_sc: SidecarProcess, sm: Any, proxy: FaultProxy, _echo_server: EchoUpstream
) -> None:
    """Before issue 17 the first request after the TTL waited for the store and, with the
    window closing during that wait, got 503 although it arrived inside the window."""
    sc = short_window_sc
    key = _secret("window")
    put_secret(sm, "adv-outage/window", SecretString=key)
    started = time.monotonic()
    assert _call(sc, "window").first.status == 200  # fetched at or after `started`: served until started + 5 s
    proxy.mode = "blackhole"
    time.sleep(max(0.0, started + TTL + 4 - 1.5 - time.monotonic()))  # 1.5 s before the window ends
    _echo_server.reset()
    near_end = _call(sc, "window")
    assert near_end.first.status == 200, near_end.text()
    assert near_end.elapsed < FAST, f"waited {near_end.elapsed:.1f} s"
    assert _echo_server.last().query == f"apiKey={key}"
    # Once the window is over the value is not served any more: a bounded 503, never later.
    time.sleep(max(0.0, started + TTL + 4 + 0.5 - time.monotonic()))
    late = _call(sc, "window")
    assert late.first.status == 503 and late.first.sidecar_error == "secret_store_unavailable", late.text()
    assert late.elapsed < LOOKUP_TIMEOUT + SLACK


def _refusal_reason(sc: SidecarProcess, client: str) -> Any:
    """The access log's reason on the first refused request of ``client``."""
    line = sc.wait_for_line(
        lambda line: line.get("event") == "request" and line.get("client_id") == client and line.get("status") == 403
    )
    return line.get("reason")


def test_secret_pending_deletion_is_refused_with_its_reason_and_its_restore_seen_at_once(
    sc: SidecarProcess, sm: Any, _echo_server: EchoUpstream
) -> None:
    key = _secret("doomed-cold")
    put_secret(sm, "adv-outage/doomed-cold", SecretString=key)
    sm.delete_secret(SecretId="adv-outage/doomed-cold", RecoveryWindowInDays=7)
    r = _call(sc, "doomed-cold").first
    assert r.status == 403 and r.sidecar_error == "no_credential", r.text()
    assert _refusal_reason(sc, "doomed-cold") == "pending_deletion"
    sm.restore_secret(SecretId="adv-outage/doomed-cold")
    restored = _call(sc, "doomed-cold").first  # no negative_ttl_seconds (30 s) to wait out
    assert restored.status == 200, restored.text()
    assert _echo_server.last().query == f"apiKey={key}"

    # A never-existing secret keeps its own reason, and stays negatively cached.
    assert _call(sc, "never-was").first.status == 403
    assert _refusal_reason(sc, "never-was") == "not_found"


def test_a_cached_secret_scheduled_for_deletion_stops_and_comes_back_on_restore(
    sc: SidecarProcess, sm: Any, _echo_server: EchoUpstream
) -> None:
    key = _secret("doomed-cached")
    put_secret(sm, "adv-outage/doomed-cached", SecretString=key)
    assert _call(sc, "doomed-cached").first.status == 200
    sm.delete_secret(SecretId="adv-outage/doomed-cached", RecoveryWindowInDays=7)
    deadline = time.monotonic() + TTL + LOOKUP_TIMEOUT + 10
    while True:  # after its TTL, one request may still get the old value while the refresh asks
        r = _call(sc, "doomed-cached").first
        if r.status == 403:
            break
        assert r.status == 200 and time.monotonic() < deadline, r.text()
        time.sleep(0.1)
    assert r.sidecar_error == "no_credential"
    assert _refusal_reason(sc, "doomed-cached") == "pending_deletion"
    sm.restore_secret(SecretId="adv-outage/doomed-cached")
    restored = _call(sc, "doomed-cached").first
    assert restored.status == 200, restored.text()
    assert _echo_server.last().query == f"apiKey={key}"

