"""``connect_to``: dial another address, keep url's host for TLS, the certificate check and Host.

The upstream is ``https://api.polygon.test``, a name that resolves nowhere; ``connect_to``
sends it to a TLS stub on 127.0.0.1 whose certificate (from a private CA) names only
``api.polygon.test``. Every way in is covered (route mode, absolute-form forward proxy,
an intercepted CONNECT), through the lean upstream client and through aiohttp's.
Several upstreams share that one origin, as route mode allows.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
import yaml
from aiohttp import web

from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.upstream import EchoUpstream

HOST = "api.polygon.test"
#: A second name on the stub's certificate, for an upstream that is route only.
ROUTE_ONLY_HOST = "api.routeonly.test"


class NamedTlsStub(EchoUpstream):
    """The echo upstream behind TLS with a certificate for ``names``.

    ``server_names`` holds, for each request received, the TLS server name (SNI) its
    connection asked for: pooled connections carry several requests, so it is read
    from the request's own connection.
    """

    def __init__(self, ca: trustme.CA, *names: str) -> None:
        super().__init__(host="127.0.0.1")
        self.server_names: list[str | None] = []
        self._asked: dict[ssl.SSLObject, str | None] = {}
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self.context)
        self.context.sni_callback = self._sni

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        self._asked[sslobj] = name

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle_named)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 0, ssl_context=self.context).start()
        self.port = self._runner.addresses[0][1]

    async def _handle_named(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.server_names.append(self._asked.get(request.transport.get_extra_info("ssl_object")))
        return await self._handle(request)

    def reset(self) -> None:
        super().reset()
        self.server_names.clear()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def stubs(ca: trustme.CA) -> Iterator[tuple[NamedTlsStub, NamedTlsStub]]:
    """The stub for api.polygon.test, and one whose certificate names another host."""
    good, wrong = NamedTlsStub(ca, HOST, ROUTE_ONLY_HOST), NamedTlsStub(ca, "elsewhere.test")
    good.start()
    wrong.start()
    yield good, wrong
    good.stop()
    wrong.stop()


@pytest.fixture
def stub(stubs: tuple[NamedTlsStub, NamedTlsStub]) -> NamedTlsStub:
    for s in stubs:
        s.reset()
    return stubs[0]


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {"alice": make_secret("connect-to-alice"), "team": make_secret("connect-to-team")}


def upstream(ca_file: Path, port: int, **over: Any) -> dict[str, Any]:
    return {
        "url": f"https://{HOST}",
        "connect_to": f"127.0.0.1:{port}",
        "secret": "{client_id}",
        "inject": {"query": "apiKey"},
        "ca_file": str(ca_file),
        "allow_private": True,
        **over,
    }


@pytest.fixture(scope="module", params=["fast", "aiohttp"])
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    ca: trustme.CA,
    stubs: tuple[NamedTlsStub, NamedTlsStub],
    keys: dict[str, str],
) -> Iterator[SidecarProcess]:
    """One sidecar per upstream client: the lean one (default) and aiohttp's."""
    good, wrong = stubs
    workdir = tmp_path_factory.mktemp(f"connect-to-{request.param}")
    ca_file = workdir / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    keys_file = workdir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"alice": keys["alice"], "team": keys["team"]}), encoding="utf-8")
    config = {
        "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
        "upstreams": {
            "polygon": upstream(ca_file, good.port),
            # The same origin again, route mode only: a shared team key beside per-user ones.
            "team": upstream(ca_file, good.port, secret="team", forward_proxy=False),
            "wrongcert": upstream(ca_file, wrong.port, forward_proxy=False),
            # localhost is 127.0.0.1: the guard refuses what connect_to resolves to.
            "guarded": upstream(ca_file, good.port, connect_to=f"localhost:{good.port}", allow_private=False,
                                forward_proxy=False),
            "routeonly": upstream(ca_file, good.port, url=f"https://{ROUTE_ONLY_HOST}", forward_proxy=False),
        },
        "forward_proxy": {"mitm": {"enabled": True, "ca_cert_out": str(workdir / "mitm-ca.pem")}},
    }
    sc = SidecarProcess(config, workdir, env={"SIDECAR_UPSTREAM_CLIENT": request.param}, name="connect-to")
    sc.start()
    yield sc
    try:
        sc.stop(timeout=10)
    except Exception:
        sc.kill()


def mitm_ca(sc: SidecarProcess) -> str:
    return str(sc.config_path.parent / "mitm-ca.pem")


def assert_reached_as_the_named_host(stub: NamedTlsStub, key: str) -> None:
    """The stub saw url's host as the TLS server name and as Host, and the key injected."""
    assert stub.server_names and set(stub.server_names) == {HOST}
    assert len(stub.server_names) == len(stub.received)
    got = stub.last()
    assert got.header("Host") == HOST
    assert got.query.endswith(f"apiKey={key}")
    assert "x-client-id" not in got.header_names()


# ---------------------------------------------------------------- every way in


def test_route_mode_dials_connect_to_with_the_url_host_for_tls_and_host(
    sidecar: SidecarProcess, stub: NamedTlsStub, keys: dict[str, str]
) -> None:
    resp = requests.get(sidecar.url + "/polygon/v2/aggs?ticker=AAPL", headers={"X-Client-Id": "alice"}, timeout=10)
    assert resp.status_code == 200, resp.text
    assert stub.last().raw_path == f"/v2/aggs?ticker=AAPL&apiKey={keys['alice']}"
    assert_reached_as_the_named_host(stub, keys["alice"])


def test_head_goes_through_aiohttp_with_connect_to_too(
    sidecar: SidecarProcess, stub: NamedTlsStub, keys: dict[str, str]
) -> None:
    # The lean client never sends HEAD: this is aiohttp's path in either stack.
    resp = requests.head(sidecar.url + "/polygon/h", headers={"X-Client-Id": "alice"}, timeout=10)
    assert resp.status_code == 200
    assert stub.last().method == "HEAD"
    assert_reached_as_the_named_host(stub, keys["alice"])


def test_absolute_form_forward_proxy_dials_connect_to(
    sidecar: SidecarProcess, stub: NamedTlsStub, keys: dict[str, str]
) -> None:
    # http:// to an https upstream on 443 is upgraded; the name itself never resolves.
    resp = requests.get(
        f"http://{HOST}/v1/x?q=1", proxies={"http": sidecar.url}, headers={"X-Client-Id": "alice"}, timeout=10
    )
    assert resp.status_code == 200, resp.text
    assert stub.last().raw_path == f"/v1/x?q=1&apiKey={keys['alice']}"  # polygon, not team: it is route only
    assert_reached_as_the_named_host(stub, keys["alice"])


def test_intercepted_connect_dials_connect_to(sidecar: SidecarProcess, stub: NamedTlsStub, keys: dict[str, str]) -> None:
    with requests.Session() as session:
        for i in range(2):  # two requests on one intercepted connection
            resp = session.get(
                f"https://{HOST}/v3/t{i}",
                proxies={"https": sidecar.url},
                headers={"X-Client-Id": "alice"},
                verify=mitm_ca(sidecar),
                timeout=10,
            )
            assert resp.status_code == 200, resp.text
    assert stub.last().raw_path == f"/v3/t1?apiKey={keys['alice']}"
    assert_reached_as_the_named_host(stub, keys["alice"])
    line = sidecar.wait_for_line(lambda line: line.get("mode") == "mitm" and line.get("path") == "/v3/t1")
    assert line["upstream"] == "polygon"


# ---------------------------------------------------------------- refusals


def test_a_certificate_that_does_not_name_the_url_host_fails(sidecar: SidecarProcess, stub: NamedTlsStub) -> None:
    resp = requests.get(sidecar.url + "/wrongcert/x", headers={"X-Client-Id": "alice"}, timeout=10)
    assert resp.status_code == 502
    assert resp.headers["X-Sidecar-Error"] == "upstream_unreachable"
    line = sidecar.wait_for_line(lambda line: line.get("upstream") == "wrongcert")
    assert line["reason"] == "tls"


def test_the_address_guard_applies_to_what_connect_to_resolves_to(
    sidecar: SidecarProcess, stub: NamedTlsStub
) -> None:
    resp = requests.get(sidecar.url + "/guarded/x", headers={"X-Client-Id": "alice"}, timeout=10)
    assert resp.status_code == 403
    assert resp.headers["X-Sidecar-Error"] == "destination_not_allowed"
    assert stub.received == [] and stub.server_names == []
    line = sidecar.wait_for_line(lambda line: line.get("upstream") == "guarded")
    assert line["reason"] == "forbidden_address"


def test_a_private_connect_to_literal_is_refused_by_check(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("alice: x\n", encoding="utf-8")
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "secrets": {"file": {"path": str(keys_file)}},
                "upstreams": {"polygon": {"url": f"https://{HOST}", "connect_to": "127.0.0.1:8443",
                                          "secret": "{client_id}", "inject": {"query": "apiKey"}}},
            }
        ),
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: upstreams.polygon.connect_to: 127.0.0.1 is a loopback, private or reserved address; "
        "set allow_private: true for an internal API"
    )


# ---------------------------------------------------------------- several upstreams on one origin


def test_route_mode_reaches_each_upstream_of_one_origin(
    sidecar: SidecarProcess, stub: NamedTlsStub, keys: dict[str, str]
) -> None:
    for name, key in (("team", keys["team"]), ("polygon", keys["alice"])):
        resp = requests.get(sidecar.url + f"/{name}/q", headers={"X-Client-Id": "alice"}, timeout=10)
        assert resp.status_code == 200
        assert stub.last().raw_path == f"/q?apiKey={key}"


def test_a_route_only_upstream_is_left_out_of_host_matching(sidecar: SidecarProcess, stub: NamedTlsStub) -> None:
    resp = requests.get(
        f"http://{ROUTE_ONLY_HOST}/x", proxies={"http": sidecar.url}, headers={"X-Client-Id": "alice"}, timeout=10
    )
    assert resp.status_code == 403
    assert resp.headers["X-Sidecar-Error"] == "destination_not_allowed"
    out = sidecar.raw(f"CONNECT {ROUTE_ONLY_HOST}:443 HTTP/1.1\r\nHost: {ROUTE_ONLY_HOST}:443\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 403"), out
    assert b"X-Sidecar-Error: destination_not_allowed" in out
    assert stub.received == []
    # Route mode still reaches it.
    resp = requests.get(sidecar.url + "/routeonly/x", headers={"X-Client-Id": "alice"}, timeout=10)
    assert resp.status_code == 200
    assert stub.server_names == [ROUTE_ONLY_HOST] and stub.last().header("Host") == ROUTE_ONLY_HOST
