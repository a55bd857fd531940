"""JWT identity through the real CLI: agent and user tokens, scopes, refusals, key rotation."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
import yaml

from tests.support.idp import IdentityProvider, ThreadedIdP, hs256_token, make_key, unsigned_token
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.upstream import EchoUpstream

Start = Callable[..., SidecarProcess]


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    threaded = ThreadedIdP()
    yield threaded.idp
    threaded.close()


@pytest.fixture
def keys() -> dict[str, str]:
    return {
        "reporting-agent": make_secret("jwt-agent"),
        "kc-agent": make_secret("jwt-kc"),
        "alice@example.com": make_secret("jwt-user"),
    }


@pytest.fixture
def sidecar(start_sidecar: Start, tmp_path: Path, idp: IdentityProvider, echo: EchoUpstream, keys: dict[str, str]) -> SidecarProcess:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({f"mcp/polygon/{k}": v for k, v in keys.items()}), encoding="utf-8")
    upstream = {
        "url": echo.url + "/echo",
        "secret": "mcp/polygon/{client_id}",
        "inject": {"query": "apiKey"},
        "allow_private": True,
    }
    return start_sidecar(
        {
            "identity": {
                "jwt": {
                    "issuer": idp.issuer,  # keys found through OIDC discovery
                    "algorithms": ["RS256"],
                    "client_id_claims": ["client_id", "azp", "email", "sub"],
                    "jwks_cooldown_seconds": 1,
                }
            },
            "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
            "upstreams": {
                "polygon": upstream,
                "reports": {**upstream, "url": echo.url + "/echo/reports", "scopes": ["reports.read", "analysts"]},
            },
        }
    )


def call(sc: SidecarProcess, path: str, token: str | None, **headers: str) -> requests.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(sc.url + path, headers=headers, timeout=10)


def test_agent_tokens_cognito_and_keycloak(sidecar: SidecarProcess, idp: IdentityProvider, echo: EchoUpstream, keys: dict[str, str]) -> None:
    # Cognito client-credentials access token: the app client in client_id, no aud.
    cognito = idp.mint(client_id="reporting-agent", token_use="access", scope="reports.read", sub="reporting-agent")
    resp = call(sidecar, "/polygon/v2/x", cognito)
    assert resp.status_code == 200
    got = echo.last()
    assert got.query == f"apiKey={keys['reporting-agent']}"
    assert "authorization" not in got.header_names()  # the token carried identity: it stays here
    # Keycloak service account: the client in azp.
    keycloak = idp.mint(azp="kc-agent", sub="service-account-kc-agent", aud="account")
    assert call(sidecar, "/polygon/v2/x", keycloak).status_code == 200
    assert echo.last().query == f"apiKey={keys['kc-agent']}"


def test_user_token_keys_on_the_user(sidecar: SidecarProcess, idp: IdentityProvider, echo: EchoUpstream, keys: dict[str, str]) -> None:
    user = idp.mint(sub="5f0c-user-uuid", email="alice@example.com", email_verified=True, scope="openid profile")
    assert call(sidecar, "/polygon/x", user).status_code == 200
    assert echo.last().query == f"apiKey={keys['alice@example.com']}"
    line = sidecar.wait_for_line(lambda line: line.get("event") == "request" and line.get("identity") == "jwt")
    assert line["client_id"] == "alice@example.com"


@pytest.mark.parametrize("verified", [None, False, "true", "false"])
def test_a_user_who_sets_their_email_to_alices_does_not_get_alices_key(
    sidecar: SidecarProcess, idp: IdentityProvider, echo: EchoUpstream, keys: dict[str, str], verified: object
) -> None:
    """In Cognito a user may change their own e-mail attribute; until verified it proves nothing."""
    forged = idp.mint(sub="mallory-sub", email="alice@example.com", email_verified=verified)
    resp = call(sidecar, "/polygon/x", forged)
    # The next claim, sub, names mallory, who has no key here.
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "no_credential", resp.text
    assert all(keys["alice@example.com"] not in r.query for r in echo.received)


def test_scopes_and_groups_gate_an_upstream(sidecar: SidecarProcess, idp: IdentityProvider, echo: EchoUpstream) -> None:
    with_scope = idp.mint(client_id="reporting-agent", scope="reports.read")
    assert call(sidecar, "/reports/q", with_scope).status_code == 200
    with_group = idp.mint(email="alice@example.com", email_verified=True, **{"cognito:groups": ["analysts"]})
    assert call(sidecar, "/reports/q", with_group).status_code == 200
    without = idp.mint(client_id="reporting-agent", scope="other")
    resp = call(sidecar, "/reports/q", without)
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "client_not_allowed"


def test_forwarded_header_is_not_trusted_in_jwt_mode(sidecar: SidecarProcess, idp: IdentityProvider, echo: EchoUpstream, keys: dict[str, str]) -> None:
    token = idp.mint(client_id="reporting-agent")
    resp = call(sidecar, "/polygon/x", token, **{"X-Client-Id": "kc-agent"})
    assert resp.status_code == 200
    assert echo.last().query == f"apiKey={keys['reporting-agent']}"
    assert "x-client-id" not in echo.last().header_names()
    resp = call(sidecar, "/polygon/x", None, **{"X-Client-Id": "kc-agent"})
    assert resp.status_code == 401 and resp.headers["X-Sidecar-Error"] == "invalid_token"


@pytest.mark.parametrize(
    "make",
    [
        lambda idp: idp.mint(client_id="reporting-agent", exp=1_000_000),  # expired
        lambda idp: idp.mint(client_id="reporting-agent", nbf=4_000_000_000),  # not yet valid
        lambda idp: idp.mint(client_id="reporting-agent", iss="https://evil.example/"),
        lambda idp: unsigned_token(idp.claims(client_id="reporting-agent"), {"alg": "none"}),
        lambda idp: hs256_token(idp.claims(client_id="reporting-agent"), idp.keys[0].public_pem, {"kid": idp.keys[0].kid}),
        lambda idp: idp.mint(key=make_key("stranger"), client_id="reporting-agent"),
        lambda idp: "not.a.token",
        lambda idp: "",
    ],
    ids=["expired", "not-yet-valid", "wrong-issuer", "alg-none", "hs256-with-public-key", "unknown-key", "garbage", "empty"],
)
def test_bad_tokens_are_401(sidecar: SidecarProcess, idp: IdentityProvider, echo: EchoUpstream, make: Any) -> None:
    resp = call(sidecar, "/polygon/x", make(idp))
    assert resp.status_code == 401
    assert resp.headers["X-Sidecar-Error"] == "invalid_token"
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert echo.received == []


def test_key_rotation_at_the_identity_provider(sidecar: SidecarProcess, idp: IdentityProvider, echo: EchoUpstream) -> None:
    assert call(sidecar, "/polygon/x", idp.mint(client_id="reporting-agent")).status_code == 200
    new = make_key("key-2")
    idp.rotate(new)
    time.sleep(1.1)  # past jwks_cooldown_seconds since the fetch at start
    # A token with the new kid makes the sidecar refetch the JWKS once.
    assert call(sidecar, "/polygon/x", idp.mint(key=new, client_id="reporting-agent")).status_code == 200


@pytest.mark.parametrize("route", ["https-only", "discovery-names-http", "redirect-through-http"])
def test_an_https_issuers_keys_are_never_taken_over_plain_http(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream, route: str
) -> None:
    """Keys read in the clear could be anyone's: whoever is on that path would mint identities.

    The same keys are served over TLS and, by a second provider, in the clear; only the route
    to them differs. "https-only" shows the TLS set-up itself works.
    """
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    key = make_key("tls-1")
    secure = ThreadedIdP(IdentityProvider([key], issuer_path="/realms/tls", tls=server_tls))
    plain = ThreadedIdP(IdentityProvider([key]))
    sc: SidecarProcess | None = None
    try:
        jwt: dict[str, Any] = {"issuer": secure.idp.issuer, "algorithms": [key.alg], "client_id_claims": ["sub"]}
        if route == "discovery-names-http":
            secure.idp.discovery_overrides = {"jwks_uri": plain.idp.jwks_url}
        elif route == "redirect-through-http":
            # https, then a plain-http hop, then https again: where the chain ends is not enough.
            secure.idp.redirects["first"] = plain.idp.base_url + "/redirect/second"
            plain.idp.redirects["second"] = secure.idp.jwks_url
            jwt["jwks_url"] = secure.idp.base_url + "/redirect/first"
        keys_file = tmp_path / "keys.yaml"
        keys_file.write_text(yaml.safe_dump({"alice": make_secret("jwt-tls")}), encoding="utf-8")
        sc = start_sidecar(
            {
                "identity": {"jwt": jwt},
                "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
                "upstreams": {"polygon": {"url": echo.url + "/echo", "secret": "{client_id}",
                                          "inject": {"query": "apiKey"}, "allow_private": True}},
            },
            env={"SSL_CERT_FILE": str(bundle)},  # the sidecar trusts the test CA, as for a private IdP
            wait_ready=route == "https-only",
        )
        if route != "https-only":
            # The refused keys are never loaded: not ready, and no token can be checked.
            sc.wait_for_line(lambda line: "signing keys" in str(line.get("message")))
            assert sc.readyz() == 503
        resp = call(sc, "/polygon/v2/x", secure.idp.mint(sub="alice"))
        if route == "https-only":
            assert resp.status_code == 200
            assert plain.idp.hits["jwks"] == 0
        else:
            assert resp.status_code == 503, resp.text
            assert resp.headers["X-Sidecar-Error"] == "identity_provider_unavailable"
            if route == "discovery-names-http":
                assert plain.idp.hits["jwks"] == 0  # never even asked
                assert "names a plain-http jwks_uri for an https issuer" in sc.output()
            else:
                assert plain.idp.hits["redirect"] >= 1  # the chain did pass through the plain hop
                assert "redirected to plain http" in sc.output()
    finally:
        if sc is not None:
            sc.stop()  # first: its keep-alive connections to the providers go with it
        secure.close()
        plain.close()
