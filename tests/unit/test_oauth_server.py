"""The tests' authorization server behaves like a real one: the OAuth types' tests lean on that."""

from __future__ import annotations

import base64
import hashlib
import secrets
from urllib.parse import parse_qs, urlsplit

import requests

from tests.support.oauth_server import JWT_TOKEN_TYPE, TOKEN_EXCHANGE, OAuthServer


def _token(server: OAuthServer, data: dict[str, str], auth: tuple[str, str] | None = None) -> requests.Response:
    return requests.post(server.token_url, data=data, auth=auth, timeout=10)


def test_client_credentials_and_the_protected_resource(oauth_server: OAuthServer) -> None:
    client = oauth_server.register_client("agent-1", scope="read")
    resp = _token(oauth_server, {"grant_type": "client_credentials", "scope": "read"}, (client.client_id, client.client_secret))
    assert resp.status_code == 200 and resp.json()["expires_in"] == 3600
    access = resp.json()["access_token"]
    seen = requests.get(oauth_server.resource_url + "/x", headers={"Authorization": f"Bearer {access}"}, timeout=10)
    assert seen.json()["client_id"] == "agent-1"
    oauth_server.revoke_access(access)
    assert requests.get(oauth_server.resource_url, headers={"Authorization": f"Bearer {access}"}, timeout=10).status_code == 401
    # The registered method only: a basic client posting its secret in the form is refused.
    form = {"grant_type": "client_credentials", "client_id": client.client_id, "client_secret": client.client_secret}
    assert _token(oauth_server, form).json()["error"] == "invalid_client"
    oauth_server.refuse("agent-1")
    assert _token(oauth_server, {"grant_type": "client_credentials"}, (client.client_id, client.client_secret)).status_code == 401


def test_refresh_rotates_and_revokes_the_old_grant(oauth_server: OAuthServer) -> None:
    app = oauth_server.register_client("app", grant_types=("refresh_token",), auth_method="client_secret_post")
    grant = oauth_server.issue_grant("app", "alice")
    form = {"grant_type": "refresh_token", "client_id": "app", "client_secret": app.client_secret}
    first = _token(oauth_server, {**form, "refresh_token": grant})
    assert first.status_code == 200
    rotated = first.json()["refresh_token"]
    assert rotated != grant and oauth_server.live_grants("alice") == [rotated]
    again = _token(oauth_server, {**form, "refresh_token": grant})
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_authorization_code_with_pkce_on_a_loopback_redirect(oauth_server: OAuthServer) -> None:
    app = oauth_server.register_client(
        "app", grant_types=("authorization_code", "refresh_token"), redirect_uris=("http://127.0.0.1/callback",)
    )
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect = "http://127.0.0.1:49152/callback"
    resp = requests.get(
        oauth_server.authorize_url,
        params={
            "response_type": "code", "client_id": "app", "redirect_uri": redirect, "state": "s1",
            "code_challenge": challenge, "code_challenge_method": "S256",
        },
        allow_redirects=False,
        timeout=10,
    )
    assert resp.status_code == 302
    query = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert query["state"] == ["s1"]
    form = {"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": redirect}
    wrong = _token(oauth_server, {**form, "code_verifier": secrets.token_urlsafe(48)}, ("app", app.client_secret))
    assert wrong.json()["error"] == "invalid_grant"
    good = _token(oauth_server, {**form, "code_verifier": verifier}, ("app", app.client_secret))
    assert good.status_code == 200 and oauth_server.live_grants("alice") == [good.json()["refresh_token"]]


def test_token_exchange_binds_subject_and_audience(oauth_server: OAuthServer) -> None:
    gw = oauth_server.register_client("gw", grant_types=(TOKEN_EXCHANGE,), audiences=("api://reports",))
    oauth_server.subject_verifier = lambda token: "bob" if token == "bobs-token" else None
    form = {"grant_type": TOKEN_EXCHANGE, "subject_token_type": JWT_TOKEN_TYPE, "audience": "api://reports"}
    resp = _token(oauth_server, {**form, "subject_token": "bobs-token"}, ("gw", gw.client_secret))
    assert resp.status_code == 200
    seen = requests.get(oauth_server.resource_url, headers={"Authorization": f"Bearer {resp.json()['access_token']}"}, timeout=10)
    assert seen.json()["subject"] == "bob" and seen.json()["audience"] == "api://reports"
    assert _token(oauth_server, {**form, "subject_token": "forged"}, ("gw", gw.client_secret)).json()["error"] == "invalid_grant"
    other = {**form, "subject_token": "bobs-token", "audience": "api://payroll"}
    assert _token(oauth_server, other, ("gw", gw.client_secret)).json()["error"] == "invalid_target"


def test_failing_answers(oauth_server: OAuthServer) -> None:
    client = oauth_server.register_client("agent-1")
    oauth_server.fail_status = 503
    assert _token(oauth_server, {"grant_type": "client_credentials"}, (client.client_id, client.client_secret)).status_code == 503
    oauth_server.fail_status = None
    oauth_server.access_lifetime = None
    assert "expires_in" not in _token(oauth_server, {"grant_type": "client_credentials"}, (client.client_id, client.client_secret)).json()
    assert oauth_server.requests["client_credentials"] == 2
