"""The egress perimeter: forward-proxy mode, CONNECT, TLS interception and the address guard."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import ssl
import struct
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import yaml

from tests.support.idp import IdentityProvider, ThreadedIdP
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.tls import Canary, TlsEchoUpstream
from tests.support.upstream import EchoUpstream

Start = Callable[..., SidecarProcess]


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


@pytest.fixture
def key() -> str:
    return make_secret("perimeter")


def config(
    tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str, *, mitm: bool = True, **fp: Any
) -> dict[str, Any]:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"alice": key}), encoding="utf-8")
    return {
        "secrets": {"backend": "file", "file": {"path": str(keys)}},
        "upstreams": {
            "secure": {
                "url": tls.url,
                "secret": "{client_id}",
                "inject": {"query": "apiKey"},
                "allow_private": True,
                "ca_file": str(tls.ca_file),
            },
            "plain": {
                "url": f"http://localhost:{echo.port}/echo",
                "secret": "{client_id}",
                "inject": {"header": "X-API-Key"},
                "allow_private": True,
            },
        },
        "forward_proxy": {
            "mitm": {"enabled": mitm, "ca_cert_out": str(tmp_path / "mitm-ca.pem")},
            **fp,
        },
    }


# ---------------------------------------------------------------- forward proxy, unchanged app code


def test_requests_with_http_proxy_reaches_https_upstream_with_key(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    resp = requests.get(
        f"http://localhost:{tls.port}/v2/aggs?ticker=AAPL",
        proxies={"http": sc.url},
        headers={"X-Client-Id": "alice"},
        timeout=10,
    )
    assert resp.status_code == 200
    assert tls.last().raw_path == f"/v2/aggs?ticker=AAPL&apiKey={key}"
    assert "x-client-id" not in tls.last().header_names()
    line = sc.wait_for_line(lambda line: line.get("event") == "request" and line.get("mode") == "proxy")
    assert line["path"] == "/v2/aggs" and line["destination"] == f"localhost:{tls.port}"


def test_httpx_and_aiohttp_with_proxy(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    with httpx.Client(proxy=sc.url) as client:
        resp = client.get(f"http://localhost:{echo.port}/echo/h", headers={"X-Client-Id": "alice"})
    assert resp.status_code == 200
    assert echo.last().header("X-API-Key") == key

    async def via_aiohttp() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://localhost:{tls.port}/a", proxy=sc.url, headers={"X-Client-Id": "alice"}
            ) as r:
                return r.status

    assert asyncio.run(via_aiohttp()) == 200
    assert tls.last().query == f"apiKey={key}"


def test_mitm_lets_https_proxy_clients_work_unchanged(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    ca = str(tmp_path / "mitm-ca.pem")
    # Our CA first, then the platform's roots: SSL_CERT_FILE replaces the app's trust store.
    bundle = Path(ca).read_text()
    assert bundle.startswith("-----BEGIN CERTIFICATE-----")
    assert bundle.count("BEGIN CERTIFICATE") > 10
    resp = requests.get(
        f"https://localhost:{tls.port}/v2/x?y=1",
        proxies={"https": sc.url},
        headers={"X-Client-Id": "alice", "Host": "evil.example"},
        verify=ca,
        timeout=10,
    )
    assert resp.status_code == 200
    assert tls.last().raw_path == f"/v2/x?y=1&apiKey={key}"
    with httpx.Client(proxy=sc.url, verify=ssl.create_default_context(cafile=ca)) as client:
        for _ in range(3):  # several requests over one intercepted connection
            assert client.get(f"https://localhost:{tls.port}/z", headers={"X-Client-Id": "alice"}).status_code == 200
    assert tls.last().query == f"apiKey={key}"
    line = sc.wait_for_line(lambda line: line.get("mode") == "mitm" and line.get("method") == "GET")
    assert line["upstream"] == "secure" and line["client_id"] == "alice"


def test_mitm_refused_by_an_app_that_does_not_trust_the_ca(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(
            f"https://localhost:{tls.port}/x", proxies={"https": sc.url}, headers={"X-Client-Id": "alice"}, timeout=10
        )
    assert tls.received == []


def test_connect_to_upstream_without_mitm_is_refused(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key, mitm=False))
    out = sc.raw(f"CONNECT localhost:{tls.port} HTTP/1.1\r\nHost: localhost:{tls.port}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 403")
    assert b"X-Sidecar-Error: destination_not_allowed" in out
    assert b"connect_not_intercepted" not in out  # the reason goes to the log, the app gets the message
    sc.wait_for_line(lambda line: line.get("reason") == "connect_not_intercepted")


def test_passthrough_tunnel_carries_tls_untouched(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(
        config(
            tmp_path, tls, echo, key,
            passthrough_hosts=[f"127.0.0.1:{tls.port}"], passthrough_allow_private=True,
        )
    )
    resp = requests.get(
        f"https://127.0.0.1:{tls.port}/pt?q=1",
        proxies={"https": sc.url},
        headers={"X-Client-Id": "alice"},
        verify=str(tls.ca_file),
        timeout=10,
    )
    assert resp.status_code == 200
    assert tls.last().raw_path == "/pt?q=1"  # no injection through a tunnel
    assert tls.last().header("X-Client-Id") == "alice"


def test_tunnels_close_on_shutdown(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(
        config(
            tmp_path, tls, echo, key,
            passthrough_hosts=[f"127.0.0.1:{tls.port}"], passthrough_allow_private=True,
        )
        | {"shutdown_grace_seconds": 2}
    )
    with sc.connect() as s:
        s.sendall(f"CONNECT 127.0.0.1:{tls.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        sc.signal(signal.SIGTERM)
        s.settimeout(8)
        assert s.recv(1024) == b""  # closed by the sidecar
    assert sc.proc is not None and sc.proc.wait(10) == 0


# ---------------------------------------------------------------- refusals an app can read

#: The lean server hands CONNECT and what it does not serve to aiohttp; SIDECAR_SERVER=aiohttp gives aiohttp all.
SERVERS = {"fast": {}, "aiohttp": {"SIDECAR_SERVER": "aiohttp"}}


def split_response(out: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, headers (lower-case names) and body of one raw response."""
    head, _, body = out.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.decode().partition(":") for line in lines)}
    return status, headers, body


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(
    ("target", "mitm", "status_line", "code"),
    [
        ("evil.example:443", True, b"HTTP/1.1 403 destination_not_allowed", "destination_not_allowed"),
        ("localhost:{tls}", False, b"HTTP/1.1 403 destination_not_allowed", "destination_not_allowed"),
        ("nonsense", True, b"HTTP/1.1 400 bad_request", "bad_request"),
    ],
    ids=["not_an_upstream", "not_intercepted", "bad_authority"],
)
def test_refused_connect_names_its_code_in_the_status_line(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str,
    server: str, target: str, mitm: bool, status_line: bytes, code: str,
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key, mitm=mitm), env=SERVERS[server])
    target = target.format(tls=tls.port)
    out = sc.raw(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status, headers, body = split_response(out)
    assert status == status_line, out
    assert headers["x-sidecar-error"] == code
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == code
    assert tls.received == []


def test_https_proxy_clients_show_the_refusal_code(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    with pytest.raises(requests.exceptions.ProxyError) as info:
        requests.get("https://evil.example/x", proxies={"https": sc.url}, timeout=10)
    assert "403 destination_not_allowed" in str(info.value)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": sc.url}))
    with pytest.raises(OSError) as raised:
        opener.open("https://evil.example/x", timeout=10)
    assert "403 destination_not_allowed" in str(raised.value)


@pytest.mark.parametrize("server", SERVERS)
def test_proxy_mode_refusals_name_their_code_route_mode_keeps_standard_phrases(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str, server: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key), env=SERVERS[server])
    cases = [
        # absolute form (HTTP_PROXY): the code, as on a CONNECT
        (b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nX-Client-Id: alice\r\n",
         b"HTTP/1.1 403 destination_not_allowed", "destination_not_allowed"),
        (f"GET http://localhost:{echo.port}/echo/x HTTP/1.1\r\nHost: x\r\nX-Client-Id: ../x\r\n".encode(),
         b"HTTP/1.1 400 invalid_client_id", "invalid_client_id"),
        # route mode: an app that names the sidecar reads X-Sidecar-Error; the phrase stays standard
        (b"GET /nowhere/x HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n", b"HTTP/1.1 404 Not Found", "unknown_upstream"),
        (b"GET /plain/x HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.1 401 Unauthorized", "missing_identity"),
    ]
    for request, status_line, code in cases:
        status, headers, body = split_response(sc.raw(request + b"Connection: close\r\n\r\n"))
        assert (status, headers["x-sidecar-error"], json.loads(body)["error"]) == (status_line, code, code)
    with requests.Session() as session:
        resp = session.get("http://evil.example/x", proxies={"http": sc.url}, headers={"X-Client-Id": "alice"})
        with pytest.raises(requests.HTTPError, match="403 Client Error: destination_not_allowed"):
            resp.raise_for_status()
    assert echo.received == []


# ---------------------------------------------------------------- an identity given to the proxy itself


def proxy_url(sc: SidecarProcess, user: str) -> str:
    """The sidecar as a proxy URL with a user name (HTTPS_PROXY=http://alice:@127.0.0.1:8080).

    With an empty password: requests sends no Proxy-Authorization for ``alice@`` alone.
    """
    return sc.url.replace("http://", f"http://{user}:@")


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_connect_identity_applies_to_the_intercepted_tunnel(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    ca = str(tmp_path / "mitm-ca.pem")  # the generated CA, as written to ca_cert_out
    url = f"https://localhost:{tls.port}/v2/x?y=1"
    with requests.Session() as session:
        session.proxies = {"https": proxy_url(sc, "alice")}  # Proxy-Authorization: Basic alice:
        assert session.get(url, verify=ca, timeout=10).status_code == 200  # no X-Client-Id of its own
        assert tls.last().raw_path == f"/v2/x?y=1&apiKey={key}"
        assert {"proxy-authorization", "x-client-id"}.isdisjoint(tls.last().header_names())
        equal = session.get(url, headers={"X-Client-Id": "alice"}, verify=ca, timeout=10)
        assert equal.status_code == 200
        refused = session.get(url, headers={"X-Client-Id": "bob"}, verify=ca, timeout=10)
    assert (refused.status_code, refused.reason) == (400, "bad_request")
    assert refused.headers["X-Sidecar-Error"] == "bad_request" and "differ" in refused.json()["message"]
    assert len(tls.received) == 2
    line = sc.wait_for_line(lambda line: line.get("method") == "CONNECT" and line.get("mode") == "mitm")
    assert (line["client_id"], line["identity"]) == ("alice", "proxy")
    line = sc.wait_for_line(lambda line: line.get("reason") == "conflicting_identity")
    assert line["mode"] == "mitm" and line["status"] == 400
    # The identity header sent as a proxy header on the CONNECT does the same.
    with httpx.Client(
        proxy=httpx.Proxy(sc.url, headers={"X-Client-Id": "alice"}), verify=ssl.create_default_context(cafile=ca)
    ) as client:
        assert client.get(url).status_code == 200
    assert tls.last().query == f"y=1&apiKey={key}"


@pytest.mark.parametrize(
    ("extra", "status_line", "code"),
    [
        ("X-Client-Id: ../etc\r\n", b"HTTP/1.1 400 invalid_client_id", "invalid_client_id"),
        (f"Proxy-Authorization: {basic('al/ice')}\r\n", b"HTTP/1.1 400 invalid_client_id", "invalid_client_id"),
        (f"X-Client-Id: alice\r\nProxy-Authorization: {basic('bob')}\r\n", b"HTTP/1.1 400 bad_request", "bad_request"),
        ("Proxy-Authorization: Bearer abc.def.ghi\r\n", b"HTTP/1.1 400 bad_request", "bad_request"),
        ("Proxy-Authorization: Basic !!!\r\n", b"HTTP/1.1 400 bad_request", "bad_request"),
    ],
    ids=["invalid-header", "invalid-user", "two-identities", "not-basic", "not-base64"],
)
def test_connect_identity_is_checked_before_the_tunnel(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str,
    extra: str, status_line: bytes, code: str,
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    target = f"localhost:{tls.port}"
    status, headers, body = split_response(sc.raw(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n".encode()))
    assert (status, headers["x-sidecar-error"], json.loads(body)["error"]) == (status_line, code, code)
    assert tls.received == []


def test_passthrough_tunnel_logs_the_connect_identity(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(
        config(tmp_path, tls, echo, key, passthrough_hosts=[f"127.0.0.1:{tls.port}"], passthrough_allow_private=True)
    )
    # Nothing is injected into a byte tunnel: the identity is checked and logged, not refused, so
    # one HTTPS_PROXY with a user name serves intercepted and passthrough hosts alike.
    resp = requests.get(
        f"https://127.0.0.1:{tls.port}/pt", proxies={"https": proxy_url(sc, "alice")}, verify=str(tls.ca_file),
        timeout=10,
    )
    assert resp.status_code == 200 and tls.last().raw_path == "/pt"
    # A tunnel's line is written when it ends: a reset ends it at once (a close only half-closes it).
    with sc.connect() as s:
        s.sendall(f"CONNECT 127.0.0.1:{tls.port} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    line = sc.wait_for_line(lambda line: line.get("method") == "CONNECT" and line.get("status") == 200)
    assert (line["mode"], line["client_id"], line["identity"]) == ("tunnel", "alice", "proxy")
    out = sc.raw(f"CONNECT 127.0.0.1:{tls.port} HTTP/1.1\r\nHost: x\r\nX-Client-Id: ../x\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 invalid_client_id\r\n")


@pytest.mark.parametrize("server", SERVERS)
def test_absolute_form_takes_the_proxy_user_as_identity(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str, server: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key), env=SERVERS[server])
    url = f"http://localhost:{echo.port}/echo/a"
    proxies = {"http": proxy_url(sc, "alice")}
    assert requests.get(url, proxies=proxies, timeout=10).status_code == 200
    assert echo.last().header("X-API-Key") == key
    assert {"proxy-authorization", "x-client-id"}.isdisjoint(n.lower() for n in echo.last().header_names())
    refused = requests.get(url, proxies=proxies, headers={"X-Client-Id": "bob"}, timeout=10)
    assert (refused.status_code, refused.reason, refused.headers["X-Sidecar-Error"]) == (400, "bad_request", "bad_request")
    assert len(echo.received) == 1
    line = sc.wait_for_line(lambda line: line.get("mode") == "proxy" and line.get("status") == 200)
    assert (line["client_id"], line["identity"]) == ("alice", "proxy")


def jwt_config(tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, idp: IdentityProvider, key: str) -> dict[str, Any]:
    cfg = config(tmp_path, tls, echo, key)
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"reporting-agent": key}), encoding="utf-8")
    cfg["identity"] = {"jwt": {"issuer": idp.issuer, "algorithms": ["RS256"], "client_id_claims": ["client_id"]}}
    return cfg


def test_jwt_mode_refuses_an_identity_given_to_the_proxy(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    threaded = ThreadedIdP()
    try:
        idp = threaded.idp
        sc = start_sidecar(jwt_config(tmp_path, tls, echo, idp, key))
        ca = str(tmp_path / "mitm-ca.pem")
        target = f"localhost:{tls.port}"
        for extra in ("X-Client-Id: reporting-agent\r\n", f"Proxy-Authorization: {basic('reporting-agent')}\r\n"):
            out = sc.raw(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n".encode())
            status, headers, body = split_response(out)
            assert (status, headers["x-sidecar-error"]) == (b"HTTP/1.1 400 bad_request", "bad_request")
            assert "send the token in Authorization on each request" in json.loads(body)["message"]
        with pytest.raises(requests.exceptions.ProxyError, match="400 bad_request"):
            requests.get(f"https://{target}/x", proxies={"https": proxy_url(sc, "reporting-agent")}, verify=ca, timeout=10)
        refused = requests.get(
            f"http://localhost:{echo.port}/echo/a", proxies={"http": proxy_url(sc, "reporting-agent")}, timeout=10
        )
        assert (refused.status_code, refused.reason) == (400, "bad_request")
        assert tls.received == [] and echo.received == []
        # The token on each request inside a tunnel opened without one is the way.
        token = idp.mint(client_id="reporting-agent")
        resp = requests.get(
            f"https://{target}/x", proxies={"https": sc.url}, headers={"Authorization": f"Bearer {token}"},
            verify=ca, timeout=10,
        )
        assert resp.status_code == 200 and tls.last().query == f"apiKey={key}"
    finally:
        threaded.close()


# ---------------------------------------------------------------- refusals before any connection


@pytest.mark.parametrize(
    "target",
    [
        "evil.example:443",
        "169.254.169.254:80",
        "[fd00:ec2::254]:80",
        "[::ffff:169.254.169.254]:80",
        "2130706433:80",
        "0x7f.0.0.1:{canary}",
        "127.0.0.1:{canary}",
        "localhost:{canary}",
        "localhost.evil.example:443",
        "localhost:{canary}@evil.example:443",
        "nonsense",
        "[::1]:{canary}",
        "localhost:\u00b2",  # '²'.isdigit() is True, int('²') raises
    ],
)
def test_connect_refused_and_nothing_sent(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str, canary: Canary,
    target: str,
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key, passthrough_hosts=[f"127.0.0.1:{canary.port}"]))
    target = target.format(canary=canary.port)
    out = sc.raw(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert out.split(b" ")[1] in (b"400", b"403"), out
    assert b"X-Sidecar-Error: " in out
    assert canary.connections == 0


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("http://LOCALHOST.:{echo}/echo/ok", True),  # case and trailing dot normalised
        ("http://localhost:{echo}/echo/ok", True),
        ("http://localhost.evil.example:{echo}/echo/x", False),
        ("http://evil.example/?@localhost:{echo}/echo/x", False),
        ("http://%6c%6fcalhost:{echo}/echo/x", False),
        ("http://127.0.0.1:{echo}/echo/x", False),  # a different spelling is a different destination
        ("http://[::ffff:127.0.0.1]:{echo}/echo/x", False),
        ("http://2130706433:{echo}/echo/x", False),
        ("http://localhost:{canary}/echo/x", False),  # unlisted port
        ("http://localhost:{echo}/other", False),  # outside the upstream's base path
        ("ftp://localhost:{echo}/echo/x", False),
        ("http://user@localhost:{echo}/echo/x", False),
    ],
)
def test_absolute_form_confusions(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str, canary: Canary,
    target: str, allowed: bool,
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    target = target.format(echo=echo.port, canary=canary.port)
    out = sc.raw(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\nConnection: close\r\n\r\n".encode())
    if allowed:
        assert out.startswith(b"HTTP/1.1 200"), out
        assert echo.last().header("X-API-Key") == key
    else:
        assert out.split(b" ")[1] in (b"400", b"403"), out
        assert echo.received == []
    assert canary.connections == 0


@pytest.mark.parametrize("client", ["fast", "aiohttp"])
def test_guard_refuses_upstream_resolving_to_loopback(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str, canary: Canary,
    client: str,
) -> None:
    cfg = config(tmp_path, tls, echo, key)
    cfg["upstreams"]["sneaky"] = {
        "url": f"http://localhost:{canary.port}",
        "secret": "{client_id}",
        "inject": {"query": "k"},
    }
    sc = start_sidecar(cfg, env={"SIDECAR_UPSTREAM_CLIENT": client})
    resp = requests.get(sc.url + "/sneaky/x", headers={"X-Client-Id": "alice"}, timeout=10)
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "destination_not_allowed"
    # The way out for an internal API, on the upstream the operator configured.
    assert "set allow_private: true on upstreams.sneaky" in resp.json()["message"]
    assert canary.connections == 0


def test_connect_userinfo_never_reaches_the_log(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    out = sc.raw(b"CONNECT alice:hunter2-pw@evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.split(b" ")[1] == b"400"
    sc.wait_for_line(lambda line: line.get("method") == "CONNECT")
    assert "hunter2-pw" not in sc.output()


def test_passthrough_to_private_address_needs_opt_in(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str, canary: Canary
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key, passthrough_hosts=[f"localhost:{canary.port}"]))
    out = sc.raw(f"CONNECT localhost:{canary.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 403")
    message = json.loads(split_response(out)[2])["message"]
    assert "set forward_proxy.passthrough_allow_private: true" in message and "upstreams." not in message
    assert canary.connections == 0


def test_route_escapes_stay_on_the_upstream(
    start_sidecar: Start, tmp_path: Path, tls: TlsEchoUpstream, echo: EchoUpstream, key: str
) -> None:
    sc = start_sidecar(config(tmp_path, tls, echo, key))
    out = sc.raw(b"GET /plain//evil.example/x HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert echo.last().raw_path == "/echo//evil.example/x"
