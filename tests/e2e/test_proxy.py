"""The real CLI in route and forward-proxy mode against a real upstream on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from sidecar.exchange import MAX_REASON
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.upstream import REASON_ECHO_PREFIX, EchoUpstream, closed_port

Start = Callable[..., SidecarProcess]


def write_keys(path: Path, keys: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(keys), encoding="utf-8")
    return path


def base_config(keys_file: Path, upstreams: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
        "upstreams": upstreams,
        **extra,
    }


def polygon(echo: EchoUpstream, **over: Any) -> dict[str, Any]:
    return {
        "url": echo.url + "/echo",
        "secret": "mcp/polygon/{client_id}",
        "inject": {"query": "apiKey"},
        "allow_private": True,
        **over,
    }


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    return {"alice": make_secret("alice"), "bob": make_secret("bob"), "svc": make_secret("svc")}


#: (server, upstream client): the lean ones (default), and aiohttp's in each place.
STACKS = {"fast": ("fast", "fast"), "aiohttp-client": ("fast", "aiohttp"), "aiohttp-server": ("aiohttp", "fast")}


@pytest.fixture(params=list(STACKS))
def sidecar(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream, keys: dict[str, str], request: pytest.FixtureRequest
) -> SidecarProcess:
    """The sidecar with the lean server and client (default), and with aiohttp's in each place: same behaviour."""
    server, client = STACKS[request.param]
    keys_file = write_keys(
        tmp_path / "keys.yaml",
        {
            "mcp/polygon/alice": keys["alice"],
            "mcp/polygon/bob": keys["bob"],
            "internal/svc": {"token": keys["svc"], "note": "json object secret"},
        },
    )
    return start_sidecar(
        base_config(
            keys_file,
            {
                "polygon": polygon(echo, clients=["alice", "bob", "agent-*"]),
                "internal": {
                    "url": echo.url + "/echo/internal",
                    "secret": "internal/svc",
                    "secret_field": "token",
                    "inject": {"header": "Authorization", "format": "Bearer {secret}"},
                    "clients": ["alice"],
                    "allow_private": True,
                },
                "onlybob": polygon(echo, url=echo.url + "/echo/onlybob", clients=["bob"]),
                "dead": polygon(echo, url=f"http://127.0.0.1:{closed_port()}", timeout_seconds=2),
                "slow": polygon(echo, url=echo.url, timeout_seconds=0.5),
            },
        ),
        env={"SIDECAR_SERVER": server, "SIDECAR_UPSTREAM_CLIENT": client},
    )


def get(sc: SidecarProcess, path: str, client: str | None = "alice", **kw: Any) -> requests.Response:
    headers = dict(kw.pop("headers", {}))
    if client is not None:
        headers["X-Client-Id"] = client
    return requests.get(sc.url + path, headers=headers, timeout=10, allow_redirects=False, **kw)


def assert_error(resp: requests.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["X-Sidecar-Error"] == code
    body = resp.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]


# ---------------------------------------------------------------- injection


def test_query_key_injected_for_each_client(sidecar: SidecarProcess, echo: EchoUpstream, keys: dict[str, str]) -> None:
    for client in ("alice", "bob"):
        resp = get(sidecar, "/polygon/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05?adjusted=true", client)
        assert resp.status_code == 200
        got = echo.last()
        assert got.raw_path == (
            f"/echo/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05?adjusted=true&apiKey={keys[client]}"
        )
        assert "x-client-id" not in got.header_names()


def test_app_supplied_key_is_replaced(sidecar: SidecarProcess, echo: EchoUpstream, keys: dict[str, str]) -> None:
    resp = get(sidecar, "/polygon/x?apiKey=stolen&APIKEY=stolen2&a=1&api%4Bey=stolen3")
    assert resp.status_code == 200
    assert echo.last().query == f"a=1&apiKey={keys['alice']}"


def test_header_injection_with_format_and_json_field(
    sidecar: SidecarProcess, echo: EchoUpstream, keys: dict[str, str]
) -> None:
    resp = get(sidecar, "/internal/v1/report", headers={"Authorization": "Bearer app-tried-this"})
    assert resp.status_code == 200
    got = echo.last()
    assert got.path == "/echo/internal/v1/report"
    assert [v for k, v in got.headers if k.lower() == "authorization"] == [f"Bearer {keys['svc']}"]
    assert got.query == ""


def test_percent_encoding_in_path_and_query_preserved(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    resp = get(sidecar, "/polygon/a%2Fb/c%20d/%E2%82%AC?q=x%2By&r=a+b&empty=&flag")
    assert resp.status_code == 200
    got = echo.last()
    assert got.raw_path.startswith("/echo/a%2Fb/c%20d/%E2%82%AC?q=x%2By&r=a+b&empty=&flag&apiKey=")


def test_hop_by_hop_and_connection_listed_headers_dropped(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    resp = get(
        sidecar,
        "/polygon/h",
        headers={
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "secret-ish",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "TE": "trailers",
            "X-Custom": "kept",
        },
    )
    assert resp.status_code == 200
    names = echo.last().header_names()
    assert {"x-private-hop", "keep-alive", "proxy-authorization", "te"}.isdisjoint(names)
    assert echo.last().header("X-Custom") == "kept"


def test_post_body_streams_with_content_length(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    body = b"z" * (3 * 1024 * 1024 + 7)
    resp = requests.post(
        sidecar.url + "/polygon/upload", data=body, headers={"X-Client-Id": "alice"}, timeout=30
    )
    assert resp.status_code == 200
    assert resp.json()["size"] == len(body)
    assert echo.last().header("Content-Length") == str(len(body))


def test_chunked_upload(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    def gen() -> Any:
        for _ in range(50):
            yield b"a" * 10000

    resp = requests.post(sidecar.url + "/polygon/upload", data=gen(), headers={"X-Client-Id": "alice"}, timeout=30)
    assert resp.json()["size"] == 500000


def test_streaming_response_arrives_before_upstream_finishes(sidecar: SidecarProcess) -> None:
    started = time.monotonic()
    with requests.get(
        sidecar.url + "/polygon/stream?chunks=4&delay=0.4", headers={"X-Client-Id": "alice"}, stream=True, timeout=10
    ) as resp:
        lines = resp.iter_lines(chunk_size=1)
        first = next(lines)
        first_at = time.monotonic() - started
        rest = list(lines)
    assert first == b"chunk-0"
    assert rest == [b"chunk-1", b"chunk-2", b"chunk-3"]
    # The whole answer takes 1.6 s upstream; the first chunk must not wait for it.
    assert first_at < 1.2


def test_server_sent_events_flow_through(sidecar: SidecarProcess) -> None:
    with requests.get(
        sidecar.url + "/polygon/sse?events=3&delay=0.05", headers={"X-Client-Id": "alice"}, stream=True, timeout=10
    ) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events == [b"data: event-0", b"data: event-1", b"data: event-2"]


def test_redirect_not_followed_and_key_scrubbed_from_location(
    sidecar: SidecarProcess, echo: EchoUpstream, keys: dict[str, str]
) -> None:
    resp = get(sidecar, "/polygon/redirect?to=https://elsewhere.example/next")
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert keys["alice"] not in location
    assert location.startswith("https://elsewhere.example/next?")
    assert "[redacted]" in location
    assert len(echo.received) == 1  # not followed


def test_key_echoed_in_the_reason_phrase_is_scrubbed(sidecar: SidecarProcess, keys: dict[str, str]) -> None:
    out = sidecar.raw(b"GET /polygon/reason-echo HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\nConnection: close\r\n\r\n"
    )
    status_line = out.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 401 Bad key "), status_line
    assert keys["alice"].encode() not in out
    assert b"[redacted]" in status_line


@pytest.mark.parametrize("inside", [8, 20])
def test_key_crossing_the_reason_phrase_limit_leaves_no_piece(
    sidecar: SidecarProcess, keys: dict[str, str], inside: int
) -> None:
    """The phrase is shortened to MAX_REASON characters only after the scrub: no cut-off part of the key leaks.

    The echo puts ``inside`` characters of the key before the limit, so a cut before the
    scrub would leave at least one 8-byte piece the window below finds.
    """
    pad = MAX_REASON - len(REASON_ECHO_PREFIX) - inside
    out = sidecar.raw(f"GET /polygon/reason-echo?pad={pad} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    status_line = out.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 401 " + b"x" * pad), status_line[:80]
    key = keys["alice"].encode()
    assert not any(key[i : i + 8] in out for i in range(len(key) - 7)), "a piece of the key reached the app"


def test_head_and_upstream_status_pass_through(sidecar: SidecarProcess) -> None:
    resp = requests.head(sidecar.url + "/polygon/x", headers={"X-Client-Id": "alice"}, timeout=10)
    assert resp.status_code == 200
    resp = get(sidecar, "/polygon/status/429")
    assert resp.status_code == 429
    assert "X-Sidecar-Error" not in resp.headers  # an upstream error is not ours


def test_truncated_upstream_body_is_not_a_clean_response(sidecar: SidecarProcess) -> None:
    with pytest.raises(requests.exceptions.RequestException):
        resp = get(sidecar, "/polygon/truncate")
        resp.raise_for_status()
        assert len(resp.content) == 100


# ---------------------------------------------------------------- refusals


def test_missing_identity(sidecar: SidecarProcess) -> None:
    assert_error(get(sidecar, "/polygon/x", client=None), 401, "missing_identity")


@pytest.mark.parametrize("client", ["a/../b", "../alice", "a b", "x" * 129, "-alice", "é", "arn:aws:secretsmanager:x"])
def test_invalid_client_ids_refused_before_the_store(sidecar: SidecarProcess, echo: EchoUpstream, client: str) -> None:
    resp = requests.get(
        sidecar.url + "/polygon/x", headers={"X-Client-Id": client.encode("utf-8")}, timeout=10  # type: ignore[dict-item]
    )
    assert_error(resp, 400, "invalid_client_id")
    assert echo.received == []


def test_unknown_upstream(sidecar: SidecarProcess) -> None:
    assert_error(get(sidecar, "/nowhere/x"), 404, "unknown_upstream")
    assert_error(get(sidecar, "/"), 404, "unknown_upstream")


def test_client_not_allowed_by_glob(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    assert_error(get(sidecar, "/onlybob/x", "alice"), 403, "client_not_allowed")
    assert get(sidecar, "/onlybob/x", "bob").status_code == 200
    assert_error(get(sidecar, "/internal/x", "bob"), 403, "client_not_allowed")


def test_glob_allows_but_no_credential(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    assert_error(get(sidecar, "/polygon/x", "agent-reporting"), 403, "no_credential")
    assert echo.received == []


def test_upstream_unreachable_and_timeout(sidecar: SidecarProcess) -> None:
    assert_error(get(sidecar, "/dead/x"), 502, "upstream_unreachable")
    started = time.monotonic()
    assert_error(get(sidecar, "/slow/slow?delay=3"), 504, "upstream_timeout")
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("path", ["/polygon/../admin", "/polygon/a/%2e%2e/b", "/polygon/..%2f..%2fadmin", "/polygon/./x"])
def test_dot_segments_refused(sidecar: SidecarProcess, echo: EchoUpstream, path: str) -> None:
    data = sidecar.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\nConnection: close\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 400"), data
    assert b"X-Sidecar-Error: bad_request" in data
    assert echo.received == []


def test_duplicate_identity_headers_refused(sidecar: SidecarProcess) -> None:
    data = sidecar.raw(b"GET /polygon/x HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\nX-Client-Id: bob\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 400")
    assert b"X-Sidecar-Error: bad_request" in data


def test_access_log_has_contract_fields_and_no_query(sidecar: SidecarProcess, keys: dict[str, str]) -> None:
    get(sidecar, "/polygon/v2/x?apiKey=fromapp&ticker=AAPL")
    get(sidecar, "/polygon/x", "agent-mallory")
    line = sidecar.wait_for_line(lambda line: line.get("event") == "request" and line.get("client_id") == "agent-mallory")
    assert line["status"] == 403 and line["error"] == "no_credential" and line["upstream"] == "polygon"
    ok = sidecar.wait_for_line(lambda line: line.get("event") == "request" and line.get("path") == "/polygon/v2/x")
    for field in ("client_id", "upstream", "method", "path", "status", "duration_ms", "cache"):
        assert field in ok
    assert ok["cache"] in ("hit", "miss")
    assert "AAPL" not in sidecar.output()


# ---------------------------------------------------------------- forward proxy


def test_forward_proxy_absolute_form_matches_upstream_by_host_and_port(
    sidecar: SidecarProcess, echo: EchoUpstream, keys: dict[str, str]
) -> None:
    proxies = {"http": sidecar.url}
    resp = requests.get(
        f"{echo.url}/echo/v2/x?a=1", proxies=proxies, headers={"X-Client-Id": "bob"}, timeout=10
    )
    assert resp.status_code == 200
    assert echo.last().raw_path == f"/echo/v2/x?a=1&apiKey={keys['bob']}"


def test_forward_proxy_refuses_other_hosts(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    proxies = {"http": sidecar.url}
    for url in ("http://example.com/", f"http://127.0.0.1:{closed_port()}/", f"http://localhost:{echo.port}/echo"):
        resp = requests.get(url, proxies=proxies, headers={"X-Client-Id": "alice"}, timeout=10)
        assert_error(resp, 403, "destination_not_allowed")
    assert echo.received == []


# ---------------------------------------------------------------- file backend


def test_keys_file_change_is_picked_up(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    first, second = make_secret("first"), make_secret("second")
    keys_file = write_keys(tmp_path / "k.yaml", {"alice": first})
    sc = start_sidecar(base_config(keys_file, {"p": polygon(echo, secret="{client_id}")}))
    assert get(sc, "/p/x").status_code == 200
    assert echo.last().query == f"apiKey={first}"
    write_keys(keys_file, {"alice": second, "carol": first})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        get(sc, "/p/x")
        if echo.last().query == f"apiKey={second}":
            break
        time.sleep(0.2)
    assert echo.last().query == f"apiKey={second}"
    assert get(sc, "/p/x", "carol").status_code == 200


def test_default_client_id(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    key = make_secret("shared")
    keys_file = write_keys(tmp_path / "k.yaml", {"local-dev": key})
    sc = start_sidecar(
        base_config(keys_file, {"p": polygon(echo, secret="{client_id}")}, identity={"default_client_id": "local-dev"})
    )
    assert get(sc, "/p/x", client=None).status_code == 200
    assert echo.last().query == f"apiKey={key}"


def test_unparseable_requests_get_the_contract_error_without_echo(sidecar: SidecarProcess, echo: EchoUpstream) -> None:
    token = "eyJ" + "t" * 40000
    out = sidecar.raw(f"GET /polygon/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    assert out.split(b" ")[1] == b"400"
    assert b"X-Sidecar-Error: bad_request" in out
    assert b"ttttttttttttttttt" not in out  # aiohttp's own error page would quote the header
    out = sidecar.raw(b"POST /polygon/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert out.split(b" ")[1] == b"400" and b'"error": "bad_request"' in out
    assert echo.received == []
