"""The examples: the Polygon stub in process, and the whole demo as CI runs it."""

from __future__ import annotations

import importlib.util
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from sidecar.config import load_settings
from tests.support.leaks import output_file, register_secret

REPO = Path(__file__).resolve().parents[2]
RUN_DEMO = REPO / "examples" / "demo" / "run_demo.py"
ZERO_CHANGE_APP = REPO / "examples" / "demo" / "zero_change_app.py"
ZERO_CHANGE_CONFIG = REPO / "examples" / "demo" / "sidecar-zero-change.yaml"
DEMO_KEYS = REPO / "examples" / "demo" / "keys.yaml"
DEMO_STUB_KEYS = REPO / "examples" / "demo" / "stub-keys.yaml"
DEMO_TIMEOUT_SECONDS = 240

AGGS = "/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-12"
BAR_FIELDS = {"v", "vw", "o", "c", "h", "l", "t", "n"}


def load_example(name: str, path: Path) -> ModuleType:
    # The examples are runnable scripts, not packages (examples/polygon-stub has a hyphen).
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def require_mcp() -> None:
    try:
        import mcp.client.streamable_http  # noqa: F401
    except ImportError:
        pytest.skip("the fininfo example and the demo need the mcp SDK: pip install -e '.[demo]'")


stub = load_example("polygon_stub", REPO / "examples" / "polygon-stub" / "stub.py")
STUB_KEYS = {"team-a": register_secret("stub-test-key-a-3c9f"), "team-b": register_secret("stub-test-key-b-81d2")}


@pytest.fixture
async def stub_client() -> AsyncIterator[TestClient]:
    server = TestServer(stub.make_app(STUB_KEYS), host="127.0.0.1")
    await server.start_server(**stub.SERVER_OPTIONS)  # as the stub runs itself: no aiohttp access log
    async with TestClient(server) as client:
        yield client


async def test_stub_accepts_a_given_key_and_names_its_label_not_the_key(stub_client: TestClient) -> None:
    response = await stub_client.get(AGGS, params={"apiKey": STUB_KEYS["team-b"], "adjusted": "true"})
    text = await response.text()
    body = await response.json()

    assert response.status == 200
    assert response.headers["X-Stub-Paid-By"] == "team-b"
    assert body["paid_by"] == "team-b"
    assert STUB_KEYS["team-b"] not in text
    assert body["ticker"] == "AAPL" and body["status"] == "OK" and body["adjusted"] is True
    assert body["resultsCount"] == body["count"] == body["queryCount"] == len(body["results"]) == 9  # weekdays
    assert all(set(bar) == BAR_FIELDS for bar in body["results"])
    assert all(bar["l"] <= min(bar["o"], bar["c"]) <= max(bar["o"], bar["c"]) <= bar["h"] for bar in body["results"])


async def test_stub_accepts_the_key_as_a_bearer_token(stub_client: TestClient) -> None:
    response = await stub_client.get(AGGS, headers={"Authorization": f"Bearer {STUB_KEYS['team-a']}"})

    assert response.status == 200
    assert response.headers["X-Stub-Paid-By"] == "team-a"


@pytest.mark.parametrize(
    ("params", "error"),
    [({"apiKey": "not-a-key-it-issued"}, "Unknown API Key"), ({}, "API Key was not provided")],
)
async def test_stub_refuses_other_keys_like_polygon(
    stub_client: TestClient, params: dict[str, str], error: str
) -> None:
    response = await stub_client.get(AGGS, params=params)
    body = await response.json()

    assert response.status == 401
    assert body["status"] == "ERROR" and body["error"] == error
    assert "X-Stub-Paid-By" not in response.headers


async def test_stub_answers_deterministically_and_honours_sort_and_limit(stub_client: TestClient) -> None:
    key = {"apiKey": STUB_KEYS["team-a"]}
    first = await (await stub_client.get(AGGS, params=key)).json()
    again = await (await stub_client.get(AGGS, params=key)).json()
    latest = await (await stub_client.get(AGGS, params={**key, "sort": "desc", "limit": "2"})).json()

    assert first["results"] == again["results"]
    assert latest["results"] == first["results"][::-1][:2]
    assert latest["queryCount"] == 9 and latest["resultsCount"] == 2


async def test_stub_rejects_an_unknown_timespan(stub_client: TestClient) -> None:
    response = await stub_client.get(AGGS.replace("/day/", "/fortnight/"), params={"apiKey": STUB_KEYS["team-a"]})

    assert response.status == 400
    assert "timespan" in (await response.json())["error"]


async def test_stub_refuses_two_keys_rather_than_pick_one(stub_client: TestClient) -> None:
    # What the demo relies on: a placeholder the sidecar failed to strip cannot go unnoticed.
    response = await stub_client.get(f"{AGGS}?apiKey=placeholder&apiKey={STUB_KEYS['team-a']}")
    body = await response.json()

    assert response.status == 400
    assert body["error"] == "apiKey given 2 times"
    assert "X-Stub-Paid-By" not in response.headers


async def test_stub_logs_no_key(stub_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="polygon-stub")
    await stub_client.get(AGGS, params={"apiKey": STUB_KEYS["team-a"]})
    await stub_client.get(AGGS, params={"apiKey": "not-a-key-it-issued"})

    assert "paid_by=team-a" in caplog.text
    assert STUB_KEYS["team-a"] not in caplog.text
    assert "not-a-key-it-issued" not in caplog.text


async def test_stub_serves_https_with_the_given_certificate_and_logs_the_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("api.polygon.io")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    caplog.set_level("INFO", logger="polygon-stub")

    server = TestServer(stub.make_app(STUB_KEYS), host="127.0.0.1")
    await server.start_server(ssl=stub.server_tls(tmp_path / "cert.pem", tmp_path / "key.pem"), **stub.SERVER_OPTIONS)
    try:
        # Dialled by address, verified and named as api.polygon.io: what the sidecar's connect_to does.
        async with aiohttp.ClientSession() as http:
            response = await http.get(
                f"https://127.0.0.1:{server.port}{AGGS}",
                params={"apiKey": STUB_KEYS["team-a"]},
                headers={"Host": "api.polygon.io"},
                ssl=client_tls,
                server_hostname="api.polygon.io",
            )
            assert response.status == 200
            assert response.headers["X-Stub-Paid-By"] == "team-a"
    finally:
        await server.close()
    assert "paid_by=team-a host=api.polygon.io" in caplog.text


@pytest.fixture
def fininfo() -> ModuleType:
    require_mcp()
    return load_example("fininfo_server", REPO / "examples" / "fininfo" / "server.py")


BEARER = "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"


@pytest.mark.parametrize(
    ("identity_mode", "incoming", "passed_on"),
    [
        ("auto", {"X-Client-Id": "alice"}, {"X-Client-Id": "alice"}),
        ("auto", {"Authorization": BEARER}, {"Authorization": BEARER}),
        # Only one identity travels: a token sent to a sidecar in header mode would reach Polygon.
        ("auto", {"X-Client-Id": "alice", "Authorization": BEARER}, {"X-Client-Id": "alice"}),
        ("jwt", {"X-Client-Id": "alice", "Authorization": BEARER}, {"Authorization": BEARER}),
        ("header", {"Authorization": BEARER}, {}),
        ("auto", {"Authorization": "Basic YWxpY2U6cHc="}, {}),
        ("auto", None, {}),  # stdio: no HTTP request at all
    ],
)
def test_fininfo_passes_on_one_identity_of_the_incoming_request(
    fininfo: ModuleType, identity_mode: str, incoming: dict[str, str] | None, passed_on: dict[str, str]
) -> None:
    settings = fininfo.Settings.from_env({"IDENTITY_MODE": identity_mode})
    headers = None if incoming is None else CIMultiDict(incoming)

    assert fininfo.identity_headers(headers, settings) == passed_on


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"POLYGON_API_KEY": "pk-live"}, "POLYGON_API_KEY is set"),
        ({"SIDECAR_MODE": "proxy"}, "needs HTTP_PROXY"),
        ({"SIDECAR_MODE": "direct"}, "route or proxy"),
    ],
)
def test_fininfo_refuses_to_start_with_a_key_or_without_the_sidecar(
    fininfo: ModuleType, env: dict[str, str], complaint: str
) -> None:
    with pytest.raises(SystemExit, match=complaint):
        fininfo.Settings.from_env(env)


def test_fininfo_defaults_to_the_sidecar_route(fininfo: ModuleType) -> None:
    route = fininfo.Settings.from_env({})
    proxy = fininfo.Settings.from_env({"SIDECAR_MODE": "proxy", "HTTP_PROXY": "http://127.0.0.1:8080"})

    assert route.base_url == "http://127.0.0.1:8080/polygon"
    assert proxy.base_url == "http://api.polygon.io"


def test_zero_change_app_will_not_start_without_a_key_like_the_upstream_server() -> None:
    # Why the zero-change path needs a placeholder at all.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(ZERO_CHANGE_APP)], env=env, capture_output=True, text=True, timeout=60)

    assert proc.returncode != 0
    assert "POLYGON_API_KEY environment variable is not set." in proc.stderr


def test_zero_change_sidecar_config_is_the_guides_with_connect_to_the_stand_in(tmp_path: Path) -> None:
    import trustme

    ca_file = tmp_path / "stand-in-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    settings = load_settings(
        ZERO_CHANGE_CONFIG, env={"DEMO_STUB_CA": str(ca_file), "DEMO_STUB_TLS_PORT": "9443", "DEMO_CA_OUT": "ca.pem"}
    )
    polygon = settings.upstreams["polygon"]

    assert settings.identity.default_client_id == "fininfo-shared"
    assert polygon.url == "https://api.polygon.io"
    assert polygon.connect_to == ("127.0.0.1", 9443)
    assert polygon.ca_file == ca_file
    assert settings.forward_proxy.enabled and settings.forward_proxy.mitm.enabled
    assert settings.forward_proxy.mitm.ca_cert_out is not None
    # The shared key is on file under that client ID, and the stand-in knows it.
    keys = yaml.safe_load(DEMO_KEYS.read_text(encoding="utf-8"))
    assert keys["mcp/polygon/fininfo-shared"] in yaml.safe_load(DEMO_STUB_KEYS.read_text(encoding="utf-8")).values()


@pytest.mark.timeout(DEMO_TIMEOUT_SECONDS + 30)
def test_demo_runs_every_path_end_to_end_and_shows_no_key() -> None:
    require_mcp()
    sidecar_keys = yaml.safe_load(DEMO_KEYS.read_text(encoding="utf-8"))
    label_of_key = {key: label for label, key in yaml.safe_load(DEMO_STUB_KEYS.read_text(encoding="utf-8")).items()}
    for key in sidecar_keys.values():
        register_secret(key)  # the suite's final leak check looks for them everywhere too

    proc = subprocess.run(
        [sys.executable, str(RUN_DEMO), "--mode", "all", "--show-logs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
    )
    output = proc.stdout + proc.stderr
    output_file("demo.out").write_text(output, encoding="utf-8")

    assert proc.returncode == 0, output
    for key in [*sidecar_keys.values(), *label_of_key]:
        assert key not in output, "a demo key appears in the demo's output"
    sections = dict(re.findall(r"^--- SIDECAR_MODE=(\w+): (.*?)(?=^--- |\Z)", output, re.M | re.S))
    assert set(sections) == {"route", "proxy"}, output
    for mode, section in sections.items():
        paid = dict(re.findall(r"as (\S+):\n +data: +\S+ .*\d+ daily bars.*\n +key the stub saw: +(\S+)", section))
        # The label the stub reports is the one under which it holds that client's key.
        assert paid == {
            "alice": label_of_key[sidecar_keys["mcp/polygon/alice"]],
            "agent-reporting": label_of_key[sidecar_keys["mcp/polygon/agent-reporting"]],
        }, f"{mode} mode:\n{section}"
        assert paid["alice"] != paid["agent-reporting"]
        refused = re.search(r"as mallory:\n +refused: +(.*)", section)
        assert refused and "no_credential" in refused.group(1), f"{mode} mode:\n{section}"

    zero_change = re.search(r"^--- zero change: (.*?)(?=^--- |\Z)", output, re.M | re.S)
    assert zero_change, output
    section = zero_change.group(1)
    paid = re.search(r"as the app .*:\n +data: +AAPL .*9 daily bars.*\n +key the stub saw: +(\S+)", section)
    # Paid by the key stored for default_client_id: the placeholder never reached the stand-in.
    assert paid and paid.group(1) == label_of_key[sidecar_keys["mcp/polygon/fininfo-shared"]], section
    assert "POLYGON_API_KEY=injected-by-sidecar" in section
    assert re.search(r"HTTPS_PROXY=http://127\.0\.0\.1:\d+ ", section), section
    checks = re.findall(r"^  (ok  |FAIL) (.*)$", section.split("checks (zero-change mode):")[1], re.M)
    assert [status for status, _ in checks[:4]] == ["ok  "] * 4, section
    # What the stand-in and the sidecar logged for that call (--show-logs prints them).
    assert re.search(r"GET /v2/aggs/\S+ -> 200 paid_by=shared-fininfo host=api\.polygon\.io$", output, re.M), output
    assert re.search(r'"mode": "mitm", "client_id": "fininfo-shared", "identity": "default"', output), output

    assert "ok   no key value appears in any log" in output
    assert re.search(r"^Demo complete: all \d+ checks passed\.$", output, re.M), output
