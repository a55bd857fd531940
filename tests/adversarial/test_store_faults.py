"""A failing secret store, through the real CLI: moto behind a fault proxy, and a fake endpoint.

For each fault: the safe answer (403 no_credential or 503 secret_store_unavailable,
never an empty or malformed key injected), bounded time, the process alive, and no
secret, ARN or role name in any response or log line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.config import DEFAULT_LOOKUP_TIMEOUT_SECONDS
from sidecar.secrets.aws import MAX_ATTEMPTS
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
from tests.support.store_faults import FakeSecretsManager, FaultProxy, put_secret, secrets_manager
from tests.support.upstream import EchoUpstream

STORE_TIMEOUT = 1.0
#: aws.py makes at most MAX_ATTEMPTS (3) calls per lookup, each bounded by STORE_TIMEOUT, and the
#: cache ends every lookup within secrets.lookup_timeout_seconds (default 5 s).
STORE_CALLS = MAX_ATTEMPTS
STORE_BOUND = DEFAULT_LOOKUP_TIMEOUT_SECONDS + 2  # + slack for a busy machine
FETCHES = "sidecar_secret_fetch_duration_seconds_count"
SECRETS: list[str] = []


def _secret(label: str) -> str:
    value = make_secret(label)
    SECRETS.append(value)
    return value


def _config(endpoint: str, echo: EchoUpstream, ttl: float) -> dict[str, Any]:
    common: dict[str, Any] = {"allow_private": True, "timeout_seconds": 5}
    return {
        "secrets": {
            "backend": "aws",
            "aws": {"region": "us-east-1", "endpoint_url": endpoint, "timeout_seconds": STORE_TIMEOUT},
            "cache": {"ttl_seconds": ttl, "negative_ttl_seconds": 30, "stale_if_error_seconds": 3600},
        },
        "upstreams": {
            "polygon": {"url": echo.url + "/status/200", "secret": "adv-store/{client_id}",
                        "inject": {"query": "apiKey"}, **common},
            "internal": {"url": echo.url.replace("127.0.0.1", "localhost") + "/status/200", "secret": "adv-store-json/{client_id}",
                         "secret_field": "api_key", "inject": {"header": "X-API-Key"}, **common},
            "keyed": {"url": echo.url + "/keyed", "secret": "adv-store/{client_id}",
                      "inject": {"query": "apiKey"}, **common},
        },
    }


def _call(sc: SidecarProcess, path: str, client: str, timeout: float = STORE_BOUND + 5) -> Any:
    ex = exchange(sc.url, get(path, client), timeout=timeout)
    assert_no_secret([ex.raw], *SECRETS)
    return ex


# ================================================================== moto behind a fault proxy


@pytest.fixture(scope="module")
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(address(moto_endpoint)).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def moto_sc(
    tmp_path_factory: pytest.TempPathFactory, proxy: FaultProxy, _echo_server: EchoUpstream
) -> Iterator[SidecarProcess]:
    with running_sidecar(
        _config(proxy.url, _echo_server, ttl=1), tmp_path_factory.mktemp("store"), env=AWS_ENV, name="store-moto"
    ) as proc:
        yield proc


@pytest.fixture
def sm(moto_endpoint: str, proxy: FaultProxy) -> Any:
    proxy.mode = "pass"
    return secrets_manager(moto_endpoint)


def test_not_found_is_403_and_negative_cached(moto_sc: SidecarProcess, sm: Any) -> None:
    first = _call(moto_sc, "/polygon", "nobody-here").first
    assert first.status == 403 and first.sidecar_error == "no_credential"
    before = metric(moto_sc, FETCHES)
    again = _call(moto_sc, "/polygon", "nobody-here").first
    assert again.status == 403 and metric(moto_sc, FETCHES) == before, "a negative answer was not cached"


def test_secret_pending_deletion_is_no_credential(moto_sc: SidecarProcess, sm: Any) -> None:
    put_secret(sm, "adv-store/doomed", SecretString=_secret("doomed"))
    sm.delete_secret(SecretId="adv-store/doomed", RecoveryWindowInDays=7)
    r = _call(moto_sc, "/polygon", "doomed").first
    assert r.status == 403 and r.sidecar_error == "no_credential", r.text()


@pytest.mark.parametrize(
    ("client", "value", "upstream"),
    [
        ("crlf", {"SecretString": "{s}\r\nX-Injected: 1"}, "polygon"),
        ("lf", {"SecretString": "{s}\nX-Injected: 1"}, "polygon"),
        ("nul", {"SecretString": "{s}\x00tail"}, "polygon"),
        ("binary-not-utf8", {"SecretBinary": b"\xff\xfe\xfd{s}"}, "polygon"),
        ("json-no-field", {"SecretString": '{"other": "{s}"}'}, "internal"),
        ("json-field-object", {"SecretString": '{"api_key": {"v": "{s}"}}'}, "internal"),
        ("json-field-empty", {"SecretString": '{"api_key": "", "x": "{s}"}'}, "internal"),
        ("json-field-crlf", {"SecretString": '{"api_key": "{s}\\r\\nX-Injected: 1"}'}, "internal"),
        ("not-json", {"SecretString": "{s} is not json"}, "internal"),
    ],
)
def test_unusable_secrets_are_never_injected(
    moto_sc: SidecarProcess, sm: Any, _echo_server: EchoUpstream, client: str, value: dict[str, Any], upstream: str
) -> None:
    s = _secret(f"bad-{client}")
    stored = {k: (v.replace("{s}", s) if isinstance(v, str) else v.replace(b"{s}", s.encode())) for k, v in value.items()}
    name = ("adv-store-json/" if upstream == "internal" else "adv-store/") + client
    put_secret(sm, name, **stored)
    _echo_server.reset()
    r = _call(moto_sc, f"/{upstream}", client).first
    assert r.status in (403, 503), r.text()
    assert r.sidecar_error in ("no_credential", "secret_store_unavailable")
    assert _echo_server.received == [], "an unusable secret was injected"


def test_store_down_serves_stale_then_503(moto_sc: SidecarProcess, sm: Any, proxy: FaultProxy, _echo_server: EchoUpstream) -> None:
    key = _secret("stale-alice")
    put_secret(sm, "adv-store/stale-alice", SecretString=key)
    put_secret(sm, "adv-store/cold-bob", SecretString=_secret("cold-bob"))
    assert _call(moto_sc, "/polygon", "stale-alice").first.status == 200
    proxy.mode = "refuse"
    time.sleep(1.2)  # past the 1 s TTL
    _echo_server.reset()
    started = time.monotonic()
    warm = _call(moto_sc, "/polygon", "stale-alice").first
    assert warm.status == 200, warm.text()
    assert _echo_server.last().query == f"apiKey={key}"
    cold = _call(moto_sc, "/polygon", "cold-bob").first
    assert cold.status == 503 and cold.sidecar_error == "secret_store_unavailable", cold.text()
    assert time.monotonic() - started < 2 * STORE_BOUND
    assert_alive(moto_sc)
    proxy.mode = "pass"
    assert _call(moto_sc, "/polygon", "cold-bob").first.status == 200


@pytest.mark.parametrize("mode", ["blackhole", "delay"])
def test_hanging_or_slow_store_is_a_bounded_503(moto_sc: SidecarProcess, sm: Any, proxy: FaultProxy, mode: str) -> None:
    client = f"never-{mode}"
    put_secret(sm, f"adv-store/{client}", SecretString=_secret(client))
    proxy.mode = mode
    proxy.delay = 3.0
    ex = _call(moto_sc, "/polygon", client)
    assert ex.first.status == 503 and ex.first.sidecar_error == "secret_store_unavailable", ex.text()
    assert ex.elapsed < STORE_BOUND, f"the store call took {ex.elapsed:.1f}s"
    assert_alive(moto_sc)


def test_rotation_pending_then_current(moto_sc: SidecarProcess, sm: Any, _echo_server: EchoUpstream) -> None:
    v1, v2 = _secret("rot-v1"), _secret("rot-v2")
    put_secret(sm, "adv-store/rot", SecretString=v1)
    _echo_server.accepted_key = v1
    assert _call(moto_sc, "/keyed", "rot").first.status == 200
    pending = sm.put_secret_value(SecretId="adv-store/rot", SecretString=v2, VersionStages=["AWSPENDING"])
    time.sleep(1.2)  # TTL over: the sidecar asks again and must still get AWSCURRENT
    assert _call(moto_sc, "/keyed", "rot").first.status == 200
    assert _echo_server.last().query == f"apiKey={v1}", "AWSPENDING was injected before it became current"
    current = sm.describe_secret(SecretId="adv-store/rot")["VersionIdsToStages"]
    old = next(v for v, stages in current.items() if "AWSCURRENT" in stages)
    sm.update_secret_version_stage(
        SecretId="adv-store/rot", VersionStage="AWSCURRENT", MoveToVersionId=pending["VersionId"], RemoveFromVersionId=old
    )
    _echo_server.accepted_key = v2
    r = _call(moto_sc, "/keyed", "rot").first
    assert r.status == 200, r.text()
    assert _echo_server.last().query == f"apiKey={v2}"
    _echo_server.accepted_key = None


def test_moto_sidecar_log_is_clean(moto_sc: SidecarProcess) -> None:
    assert_alive(moto_sc)
    assert_no_secret([moto_sc.output()], *SECRETS)


# ================================================================== a fake Secrets Manager with chosen faults


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSecretsManager]:
    f = FakeSecretsManager().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def fake_sc(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeSecretsManager, _echo_server: EchoUpstream
) -> Iterator[SidecarProcess]:
    with running_sidecar(
        _config(fake.url, _echo_server, ttl=300), tmp_path_factory.mktemp("fake"), env=AWS_ENV, name="store-fake"
    ) as proc:
        yield proc


@pytest.mark.parametrize("fault", ["throttle", "denied", "decrypt", "internal", "garbage"])
def test_store_errors_are_bounded_503s_that_name_nothing(
    fake_sc: SidecarProcess, fake: FakeSecretsManager, _echo_server: EchoUpstream, fault: str
) -> None:
    client = f"tenant-{fault}"
    secret_id = f"adv-store/{client}"
    fake.values[secret_id] = _secret(client)
    fake.faults[secret_id] = fault
    _echo_server.reset()
    ex = _call(fake_sc, "/polygon", client)
    r = ex.first
    assert r.status == 503 and r.sidecar_error == "secret_store_unavailable", ex.text()
    assert ex.elapsed < STORE_BOUND
    assert 1 <= fake.hits[secret_id] <= STORE_CALLS, f"{fake.hits[secret_id]} store calls for one request"
    body = r.body.decode()
    for word in ("arn:aws", "assumed-role", secret_id, client, fault):
        assert word not in body, f"the refusal names {word!r}"
    assert _echo_server.received == []
    assert "assumed-role" not in fake_sc.output() and "arn:aws" not in fake_sc.output()


# Finding (fixed in e6c2a01): proxy.error_response never sets Retry-After; a throttled or failing store (503
# secret_store_unavailable) should tell the app when to come back (issue 9)
def test_throttled_store_503_has_retry_after(fake_sc: SidecarProcess, fake: FakeSecretsManager) -> None:
    secret_id = "adv-store/tenant-throttle-ra"
    fake.values[secret_id] = _secret("throttle-ra")
    fake.faults[secret_id] = "throttle"
    r = _call(fake_sc, "/polygon", "tenant-throttle-ra").first
    assert r.status == 503
    assert (r.header("Retry-After") or "").isdigit()


def test_partial_arn_match_of_another_secret_is_refused(
    fake_sc: SidecarProcess, fake: FakeSecretsManager, _echo_server: EchoUpstream
) -> None:
    """The store answers ``alice-AbCdEf`` with the secret named ``alice``: never inject it."""
    fake.values["adv-store/victim-AbCdEf"] = _secret("victim")
    fake.faults["adv-store/victim-AbCdEf"] = "other-name"
    _echo_server.reset()
    r = _call(fake_sc, "/polygon", "victim-AbCdEf").first
    assert r.status == 403 and r.sidecar_error == "no_credential", r.text()
    assert _echo_server.received == []


def test_slow_store_does_not_slow_cached_clients(
    fake_sc: SidecarProcess, fake: FakeSecretsManager, _echo_server: EchoUpstream
) -> None:
    fake.values["adv-store/warm"] = _secret("warm")
    assert _call(fake_sc, "/polygon", "warm").first.status == 200
    fake.values["adv-store/cold"] = _secret("cold")
    fake.faults["adv-store/cold"] = "slow"
    fake.delay = 5.0
    results: list[Any] = []
    cold = threading.Thread(target=lambda: results.append(_call(fake_sc, "/polygon", "cold")), daemon=True)
    cold.start()
    time.sleep(0.2)
    for _ in range(10):
        ex = _call(fake_sc, "/polygon", "warm")
        assert ex.first.status == 200 and ex.elapsed < 0.5, f"a cached client waited {ex.elapsed:.2f}s"
    cold.join(STORE_BOUND + 10)
    assert not cold.is_alive()
    assert results and results[0].first.status == 503, results[0].text() if results else "no answer"
    assert_alive(fake_sc)


def test_fake_sidecar_log_is_clean(fake_sc: SidecarProcess) -> None:
    assert_alive(fake_sc)
    out = fake_sc.output()
    assert_no_secret([out], *SECRETS)
    assert "assumed-role" not in out
    for line in out.splitlines():
        if line.startswith("{"):
            json.loads(line)  # every line stays one JSON object (no multi-line traceback)
