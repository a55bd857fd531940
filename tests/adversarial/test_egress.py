"""The egress perimeter through the real CLI: absolute-form requests and CONNECT, watched by a canary.

The canary listens on 127.0.0.1; every loopback spelling below points at its port,
so a single byte the sidecar sends there shows up in its connection count. Private,
link-local, CGNAT and other non-loopback addresses are refused by the sidecar before
any connection, which the tests check by status and by the upstream's silence (they
cannot host a canary: every packet in this suite stays on 127.0.0.1, and the address
classification itself is covered in-process by tests/unit/test_policy.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.raw_http import (
    address,
    assert_alive,
    assert_no_secret,
    exchange,
    running_sidecar,
)
from tests.support.tls import Canary, TlsEchoUpstream
from tests.support.upstream import EchoUpstream, closed_port

KEYS: dict[str, str] = {}


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


@pytest.fixture(scope="module")
def sc(
    tmp_path_factory: pytest.TempPathFactory, canary: Canary, tls_upstream: TlsEchoUpstream, _echo_server: EchoUpstream
) -> Iterator[SidecarProcess]:
    KEYS["alice"] = make_secret("egress")
    workdir = tmp_path_factory.mktemp("egress")
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS), encoding="utf-8")
    config: dict[str, Any] = {
        "secrets": {"backend": "file", "file": {"path": str(keys)}},
        "upstreams": {
            "secure": {"url": tls_upstream.url, "secret": "{client_id}", "inject": {"query": "apiKey"},
                       "allow_private": True, "ca_file": str(tls_upstream.ca_file), "timeout_seconds": 5},
            "plain": {"url": f"http://localhost:{_echo_server.port}/base", "secret": "{client_id}",
                      "inject": {"header": "X-API-Key"}, "allow_private": True, "timeout_seconds": 5},
            # An allowed name that resolves to a loopback address, without allow_private.
            "guarded": {"url": f"http://localhost:{canary.port}", "secret": "{client_id}",
                        "inject": {"query": "apiKey"}, "timeout_seconds": 5},
        },
        "forward_proxy": {
            "enabled": True,
            # Listed, but loopback: the address guard must still refuse them.
            "passthrough_hosts": [f"127.0.0.1:{canary.port}", f"localhost:{canary.port}"],
        },
    }
    with running_sidecar(config, workdir, name="egress") as proc:
        yield proc


@pytest.fixture
def watch(sc: SidecarProcess, canary: Canary, tls: TlsEchoUpstream, echo: EchoUpstream) -> Iterator[None]:
    """Around each case: nothing reached the canary, the sidecar lives, no key leaked to its log."""
    tls.reset()
    before = canary.connections
    yield
    assert canary.connections == before, "the sidecar connected to a forbidden address"
    assert_alive(sc)


def refused(ex: Any, *codes: str) -> None:
    r = ex.first
    assert 400 <= r.status < 500, ex.text()
    assert r.sidecar_error in (codes or ("bad_request", "destination_not_allowed", "unknown_upstream")), ex.text()
    assert_no_secret([ex.raw], *KEYS.values())


LOOPBACK = [
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "017700000001",
    "127.000.000.001", "127.0.0.1.", "[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]", "[64:ff9b::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[::127.0.0.1]",
    "0.0.0.0", "0", "[::]", "localhost", "LOCALHOST", "localhost.", "%31%32%37.0.0.1", "127.0.0.1%00.evil.invalid",
    "[::1%25lo]", "127.0.0.1%2f",
]
NOT_LOOPBACK = [
    "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "[fd00:ec2::254]", "100.64.0.1", "100.127.255.254",
    "[fe80::1]", "[fc00::1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[64:ff9b::a9fe:a9fe]",
    "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]", "[2002:a9fe:a9fe::]", "224.0.0.1", "255.255.255.255",
    "0xa9fea9fe", "2852039166", "0251.0376.0251.0376", "169.254.169.254.", "[::ffff:10.0.0.1]", "192.0.0.170",
    "metadata.google.internal", "instance-data",
]


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_spellings_absolute_form(sc: SidecarProcess, canary: Canary, watch: None, host: str) -> None:
    ex = exchange(sc.url, f"GET http://{host}:{canary.port}/steal HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
    refused(ex)


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_spellings_connect(sc: SidecarProcess, canary: Canary, watch: None, host: str) -> None:
    ex = exchange(sc.url, f"CONNECT {host}:{canary.port} HTTP/1.1\r\nHost: {host}:{canary.port}\r\n\r\n".encode())
    refused(ex)


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_private_and_metadata_addresses_absolute_form(sc: SidecarProcess, watch: None, host: str) -> None:
    ex = exchange(sc.url, f"GET http://{host}/latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
    refused(ex)


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_private_and_metadata_addresses_connect(sc: SidecarProcess, watch: None, host: str) -> None:
    ex = exchange(sc.url, f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    refused(ex)


def _host_tricks(echo_port: int, tls_port: int, closed: int) -> list[str]:
    return [
        f"http://localhost.evil.invalid:{echo_port}/base/x",
        f"http://localhost:{echo_port}@evil.invalid/base/x",
        f"http://evil.invalid#@localhost:{echo_port}/base/x",
        f"http://evil.invalid\\@localhost:{echo_port}/base/x",
        f"http://local%68ost:{echo_port}/base/x",
        f"http://localhost%00:{echo_port}/base/x",
        f"http://localhost:{closed}/base/x",
        f"http://localhost:{echo_port}:{closed}/base/x",
        f"http://[localhost]:{echo_port}/base/x",
        f"http://localhost:{echo_port}/other/x",  # right origin, outside the upstream's base path
        f"http://localhost:{echo_port}/baseline",  # a prefix of the base path is not the base path
        f"https://localhost:{echo_port}/base/x",  # the plain upstream is http only
        f"http://evil.invalid/?http://localhost:{echo_port}/base/x",
        f"ftp://localhost:{echo_port}/base/x",
        "file:///etc/passwd",
        f"gopher://localhost:{echo_port}/_GET%20/",
        f"ws://localhost:{echo_port}/base/x",
        "javascript:alert(1)",
        f"http://localhost:+{echo_port}/base/x",
        f"http://localhost:{tls_port}@localhost:{echo_port}/base/x",
    ]


def test_host_string_tricks(sc: SidecarProcess, tls: TlsEchoUpstream, echo: EchoUpstream, watch: None) -> None:
    tricks = _host_tricks(echo.port, tls.port, closed_port())
    for target in tricks:
        echo.reset()
        ex = exchange(sc.url, f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
        refused(ex)
        assert echo.received == [], f"{target} reached the upstream"


# Finding (fixed in e6c2a01): an absolute-form target whose host fails IDNA round-trip (xn--localhost-) makes
# aiohttp's BaseRequest() raise UnicodeError inside RequestHandler.start (connect.py web.Server, default
# request_factory): no response, the connection task dies and the socket stays open until the client hangs up
@pytest.mark.parametrize("host", ["xn--localhost-", "xn--ls8h-"])
def test_undecodable_punycode_host_is_refused(sc: SidecarProcess, echo: EchoUpstream, watch: None, host: str) -> None:
    ex = exchange(
        sc.url, f"GET http://{host}:{echo.port}/base/x HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode(), timeout=2
    )
    refused(ex)


def test_sidecar_own_addresses_are_not_destinations(sc: SidecarProcess, watch: None) -> None:
    for url in (sc.url, sc.admin_url):
        host, port = address(url)
        ex = exchange(sc.url, f"GET http://{host}:{port}/metrics HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
        refused(ex)
        ex = exchange(sc.url, f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        refused(ex)


def test_connect_tricks(sc: SidecarProcess, tls: TlsEchoUpstream, echo: EchoUpstream, watch: None) -> None:
    for authority in (
        f"localhost:{tls.port}",  # an upstream, but interception is off: refused, never a blind tunnel
        f"localhost:{echo.port}",  # an http upstream
        f"localhost:{echo.port}@evil.invalid:443",
        "localhost",
        "localhost:0",
        "localhost:99999",
        f"localhost:{echo.port}/x",
        "evil.invalid:443",
        f"[localhost]:{tls.port}",
        f":{tls.port}",
    ):
        ex = exchange(sc.url, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        refused(ex)
    assert tls.received == [] and echo.received == []


ROUTE_REFUSED = [
    "/plain/..%2f..%2fx", "/plain/%2e%2e/x", "/plain/%2E%2E%2Fx", "/plain/..%5cx", "/plain/.%2e/x", "/plain/x/../../y",
    "/plain/%252e%252e/x#", "/plain\\x", "/plain/x#y", "/plain@evil.invalid/x", "/plain:80/x", "/plain%2fx",
    "/%2e%2e/plain/x", "/..", "//evil.invalid/x", "/secure/../plain/x",
    # path parameters after a dot segment: Java servers (Tomcat, Jetty, Spring) strip ";..." and walk up
    "/plain/..;/x", "/plain/..;jsessionid=1/x", "/plain/%2e%2e%3b/x", "/plain/.;/x",
]
ROUTE_CONFINED = ["/plain//evil.invalid/x", "/plain/%2F%2Fevil.invalid/x", "/plain/%252e%252e/x", "/plain/x?@evil.invalid"]


@pytest.mark.parametrize("path", ROUTE_REFUSED)
def test_route_escapes_refused(sc: SidecarProcess, echo: EchoUpstream, watch: None, path: str) -> None:
    ex = exchange(sc.url, f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
    refused(ex)
    assert echo.received == []


@pytest.mark.parametrize("path", ROUTE_CONFINED)
def test_route_oddities_stay_under_the_base_path(sc: SidecarProcess, echo: EchoUpstream, watch: None, path: str) -> None:
    exchange(sc.url, f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
    for rec in echo.received:
        assert rec.raw_path.startswith("/base/"), f"{path} left the upstream's base path: {rec.raw_path}"


def test_allowed_name_resolving_to_loopback_is_refused(sc: SidecarProcess, canary: Canary, watch: None) -> None:
    ex = exchange(sc.url, b"GET /guarded/x HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n")
    refused(ex, "destination_not_allowed")
    ex = exchange(sc.url, f"GET http://localhost:{canary.port}/x HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
    refused(ex, "destination_not_allowed")


@pytest.mark.parametrize("mode", ["route", "absolute"])
@pytest.mark.parametrize("where", ["canary", "metadata"])
def test_upstream_redirects_are_not_followed_and_scrubbed(
    sc: SidecarProcess, canary: Canary, tls: TlsEchoUpstream, watch: None, mode: str, where: str
) -> None:
    to = f"http://127.0.0.1:{canary.port}/steal" if where == "canary" else "http://169.254.169.254/latest/meta-data/"
    target = f"/secure/redirect?to={to}" if mode == "route" else f"http://localhost:{tls.port}/redirect?to={to}"
    ex = exchange(sc.url, f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n".encode())
    r = ex.first
    assert r.status == 302, ex.text()
    assert (r.header("Location") or "").startswith(to), r.header("Location")
    assert_no_secret([ex.raw], *KEYS.values())
    assert len(tls.received) == 1, "the sidecar followed the redirect"


def test_zz_log_is_clean(sc: SidecarProcess) -> None:
    assert_alive(sc)
    assert_no_secret([sc.output()], *KEYS.values())
