"""The OAuth credential types through the real CLI, against the Authlib authorization server.

The upstream is the server's own protected resource: it accepts only live tokens it
issued and echoes whose they are, so "the upstream saw the right token" is checked by
the party that issued it. The file backend holds the stored credentials; the refresh-token
tests run with each backend that writes (the file, Secrets Manager in moto, OpenBao).
Every token, refresh token and client secret is registered with the leak check: none
may appear in any output of the run.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import yaml

from tests.support.aws import AWS_ENV
from tests.support.idp import IdentityProvider, ThreadedIdP
from tests.support.leaks import make_secret
from tests.support.oauth_server import TOKEN_EXCHANGE, OAuthServer
from tests.support.openbao import OpenBao
from tests.support.process import SidecarProcess, metric
from tests.support.store_faults import put_secret, secrets_manager

Start = Callable[..., SidecarProcess]


def oauth_upstream(server: OAuthServer, credential: dict[str, Any], **extra: Any) -> dict[str, Any]:
    up: dict[str, Any] = {
        "url": server.resource_url,
        "secret": "mcp/api/{client_id}",
        "allow_private": True,
        "timeout_seconds": 3,
        "credential": {"token_url": server.token_url, **credential},
    }
    up.update(extra)
    return up


def file_config(tmp_path: Path, keys: dict[str, Any], up: dict[str, Any], **top: Any) -> dict[str, Any]:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys), encoding="utf-8")
    return {"secrets": {"backend": "file", "file": {"path": str(keys_file)}}, "upstreams": {"api": up}, **top}


def call(sc: SidecarProcess, path: str = "/api/x", client: str = "alice", **headers: str) -> requests.Response:
    if client:
        headers["X-Client-Id"] = client
    return requests.get(sc.url + path, headers=headers, timeout=15)


def tokens(sc: SidecarProcess, grant: str, result: str = "ok") -> float:
    return metric(sc, "sidecar_token_requests_total", {"upstream": "api", "grant": grant, "result": result})


# ------------------------------------------------------------------ client credentials


@pytest.fixture
def agents(oauth_server: OAuthServer) -> dict[str, dict[str, str]]:
    out = {}
    for caller, oauth_client in (("alice", "agent-alice"), ("bob", "agent-bob")):
        c = oauth_server.register_client(oauth_client, scope="reports")
        out[f"mcp/api/{caller}"] = {"client_id": c.client_id, "client_secret": c.client_secret}
    return out


def test_client_credentials_end_to_end(
    start_sidecar: Start, tmp_path: Path, oauth_server: OAuthServer, agents: dict[str, Any]
) -> None:
    up = oauth_upstream(oauth_server, {"type": "oauth2_client_credentials", "scopes": ["reports"]})
    sc = start_sidecar(file_config(tmp_path, agents, up))
    # A cold burst: any number of concurrent first requests make one token request per client.
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: call(sc, f"/api/r/{i}", "alice" if i % 2 else "bob"), range(32)))
    assert [a.status_code for a in answers] == [200] * 32
    assert {a.json()["client_id"] for a in answers} == {"agent-alice", "agent-bob"}
    assert answers[1].json()["scope"] == "reports" and answers[1].json()["path"] == "/r/1"
    assert oauth_server.requests["client_credentials"] == 2
    # Warm: no token request.
    assert call(sc).status_code == 200
    assert oauth_server.requests["client_credentials"] == 2
    assert tokens(sc, "client_credentials") == 2
    line = sc.wait_for_line(lambda line: line.get("event") == "request" and line.get("cache") == "hit")
    assert line["credential"] == "oauth2_client_credentials"
    # A client with nothing stored.
    resp = call(sc, client="carol")
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "no_credential"


def test_an_upstream_401_gets_one_retry_with_a_new_token(
    start_sidecar: Start, tmp_path: Path, oauth_server: OAuthServer, agents: dict[str, Any]
) -> None:
    sc = start_sidecar(file_config(tmp_path, agents, oauth_upstream(oauth_server, {"type": "oauth2_client_credentials"})))
    assert call(sc).status_code == 200
    oauth_server.revoke_access()  # the upstream no longer takes the cached token
    resp = call(sc)
    assert resp.status_code == 200 and resp.json()["client_id"] == "agent-alice"
    assert oauth_server.requests["client_credentials"] == 2
    line = sc.wait_for_line(lambda line: line.get("event") == "request" and line.get("reason") == "credential_rotated")
    assert line["status"] == 200


def test_token_endpoint_failing_hanging_or_refusing(
    start_sidecar: Start, tmp_path: Path, oauth_server: OAuthServer, agents: dict[str, Any]
) -> None:
    sc = start_sidecar(file_config(tmp_path, agents, oauth_upstream(oauth_server, {"type": "oauth2_client_credentials"})))
    oauth_server.fail_status = 502
    resp = call(sc)
    assert resp.status_code == 503 and resp.headers["X-Sidecar-Error"] == "token_endpoint_unavailable"
    assert resp.headers["Retry-After"]
    # An outage the endpoint reports as an OAuth error with 400 (Keycloak, Entra, Okta): not a refusal.
    oauth_server.fail_status, oauth_server.fail_error = 400, "temporarily_unavailable"
    resp = call(sc)
    assert resp.status_code == 503 and resp.headers["X-Sidecar-Error"] == "token_endpoint_unavailable"
    assert tokens(sc, "client_credentials", "error") == 2
    oauth_server.fail_status = oauth_server.fail_error = None
    oauth_server.hang()
    resp = call(sc, client="bob")  # bounded by the upstream's timeout_seconds (3)
    assert resp.status_code == 503 and resp.headers["X-Sidecar-Error"] == "token_endpoint_unavailable"
    oauth_server.release()
    assert tokens(sc, "client_credentials", "timeout") == 1
    oauth_server.refuse("agent-alice")
    resp = call(sc)
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "credential_refused"
    assert tokens(sc, "client_credentials", "refused") == 1
    assert call(sc, client="bob").status_code == 200


def test_a_reload_keeps_the_cached_tokens(
    start_sidecar: Start, tmp_path: Path, oauth_server: OAuthServer, agents: dict[str, Any]
) -> None:
    config = file_config(tmp_path, agents, oauth_upstream(oauth_server, {"type": "oauth2_client_credentials"}))
    sc = start_sidecar(config)
    assert call(sc).status_code == 200
    sc.write_config({**config, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "shutdown_grace_seconds": 5})
    sc.signal(signal.SIGHUP)
    sc.wait_for_line(lambda line: line.get("message") == "config reloaded")
    assert call(sc).status_code == 200
    assert oauth_server.requests["client_credentials"] == 1


def test_a_reload_whose_client_secret_file_cannot_be_read_is_refused_and_the_running_config_serves_on(
    start_sidecar: Start, tmp_path: Path, oauth_server: OAuthServer
) -> None:
    app = oauth_server.register_client("app", grant_types=("refresh_token",), auth_method="client_secret_post")
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"mcp/api/alice": {"refresh_token": oauth_server.issue_grant("app", "alice")}}))
    secret_file = tmp_path / "app-secret"
    secret_file.write_text(app.client_secret + "\n")
    credential = {
        "type": "oauth2_refresh_token", "client_id": "app", "client_secret_file": str(secret_file),
        "auth_method": "client_secret_post",
    }
    config = {
        "secrets": {"backend": "file", "file": {"path": str(keys)}},
        "upstreams": {"api": oauth_upstream(oauth_server, credential)},
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
    }
    sc = start_sidecar(config)
    assert call(sc).status_code == 200
    # The file is there (the config reader checks that) but holds no text: the providers
    # are built before the swap, so the reload is refused whole.
    secret_file.write_bytes(b"\xff\xfe not text")
    sc.write_config(config)
    sc.signal(signal.SIGHUP)
    line = sc.wait_for_line(lambda line: str(line.get("message")).startswith("config reload refused"))
    assert line["problems"] == ["upstreams.api.credential.client_secret_file: cannot be read"]
    assert call(sc).status_code == 200  # the running provider, its token cached
    # Fixed: the reload goes through and keeps the token.
    secret_file.write_text(app.client_secret + "\n")
    sc.signal(signal.SIGHUP)
    sc.wait_for_line(lambda line: line.get("message") == "config reloaded")
    assert call(sc).status_code == 200
    assert oauth_server.requests["refresh_token"] == 1


# ------------------------------------------------------------------ refresh tokens


class GrantStore:
    """Where the users' grants live, seeded and read back by the test as an operator would.

    One backend each (``grants`` is parametrized over them): the secret-store section of
    the config, the upstream's ``secret`` template, the environment the sidecar needs.
    """

    secret = "mcp/api/{client_id}"
    env: dict[str, str] = {}

    def section(self) -> dict[str, Any]:
        raise NotImplementedError

    def put(self, user: str, refresh_token: str) -> None:
        raise NotImplementedError

    def refresh_token(self, user: str) -> str | None:
        raise NotImplementedError


class FileGrants(GrantStore):
    """One keys file: every sidecar of a test reads and rewrites the same file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("{}\n", encoding="utf-8")

    def section(self) -> dict[str, Any]:
        return {"backend": "file", "file": {"path": str(self.path)}}

    def _entries(self) -> dict[str, Any]:
        return dict(yaml.safe_load(self.path.read_text(encoding="utf-8")) or {})

    def put(self, user: str, refresh_token: str) -> None:
        entries = self._entries()
        entries[self.secret.format(client_id=user)] = {"refresh_token": refresh_token}
        self.path.write_text(yaml.safe_dump(entries), encoding="utf-8")

    def refresh_token(self, user: str) -> str | None:
        entry = self._entries().get(self.secret.format(client_id=user))
        return entry.get("refresh_token") if isinstance(entry, dict) else None


class AwsGrants(GrantStore):
    """Secrets Manager (moto in server mode); names under a prefix of their own, as moto lives per session."""

    env = dict(AWS_ENV)

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = secrets_manager(endpoint)
        self.secret = f"mcp/oauth-{uuid.uuid4().hex[:8]}/{{client_id}}"

    def section(self) -> dict[str, Any]:
        return {"backend": "aws", "aws": {"region": "us-east-1", "endpoint_url": self.endpoint}}

    def put(self, user: str, refresh_token: str) -> None:
        put_secret(self.client, self.secret.format(client_id=user), SecretString=json.dumps({"refresh_token": refresh_token}))

    def refresh_token(self, user: str) -> str | None:
        value = self.client.get_secret_value(SecretId=self.secret.format(client_id=user))["SecretString"]
        token = json.loads(value).get("refresh_token")
        return token if isinstance(token, str) else None


class VaultGrants(GrantStore):
    """OpenBao's KV v2 at secret/, read with a token from a file."""

    def __init__(self, openbao: OpenBao, token_file: Path) -> None:
        self.openbao = openbao
        self.prefix = f"mcp/oauth-{uuid.uuid4().hex[:8]}"
        self.secret = self.prefix + "/{client_id}"
        self.token_file = token_file
        token_file.write_text(openbao.token() + "\n")

    def section(self) -> dict[str, Any]:
        auth = {"method": "token", "token_file": str(self.token_file)}
        return {"backend": "vault", "vault": {"address": self.openbao.address, "auth": auth}}

    def put(self, user: str, refresh_token: str) -> None:
        self.openbao.put(f"{self.prefix}/{user}", refresh_token=refresh_token)

    def refresh_token(self, user: str) -> str | None:
        token = self.openbao.api("GET", f"secret/data/{self.prefix}/{user}")["data"]["data"].get("refresh_token")
        return token if isinstance(token, str) else None


@pytest.fixture(params=["file", "aws", "vault"])
def grants(request: pytest.FixtureRequest, tmp_path: Path) -> GrantStore:
    """The users' grants in each backend that writes: the file, Secrets Manager (moto), Vault (OpenBao)."""
    if request.param == "file":
        return FileGrants(tmp_path / "keys.yaml")
    if request.param == "aws":
        return AwsGrants(request.getfixturevalue("moto_endpoint"))
    return VaultGrants(request.getfixturevalue("openbao"), tmp_path / "vault-token")


def refresh_config(grants: GrantStore, server: OAuthServer, **credential: Any) -> dict[str, Any]:
    credential = {
        "type": "oauth2_refresh_token", "client_id": "app", "client_secret": "${APP_SECRET}", **credential
    }
    return {"secrets": grants.section(), "upstreams": {"api": oauth_upstream(server, credential, secret=grants.secret)}}


def test_refresh_token_rotates_into_the_store(
    start_sidecar: Start, oauth_server: OAuthServer, grants: GrantStore
) -> None:
    app = oauth_server.register_client("app", grant_types=("refresh_token",), auth_method="client_secret_post")
    first = oauth_server.issue_grant("app", "alice")
    grants.put("alice", first)
    revoked = oauth_server.issue_grant("app", "bob")
    oauth_server.revoke_grant(revoked)
    grants.put("bob", revoked)
    config = refresh_config(
        grants, oauth_server, auth_method="client_secret_post", authorize_url=oauth_server.authorize_url
    )
    sc = start_sidecar(config, env={**grants.env, "APP_SECRET": app.client_secret})
    resp = call(sc)
    assert resp.status_code == 200 and resp.json()["subject"] == "alice"
    # The provider rotated the grant (the first one is revoked): the store holds the new one.
    live = oauth_server.live_grants("alice")
    assert len(live) == 1 and live[0] != first
    assert grants.refresh_token("alice") == live[0]
    # The next refresh starts from what was written, and its write replaces that version:
    # the upstream refuses the cached access token, the sidecar refreshes and rotates again.
    oauth_server.revoke_access()
    resp = call(sc)
    assert resp.status_code == 200 and resp.json()["subject"] == "alice"
    again = oauth_server.live_grants("alice")
    assert len(again) == 1 and again[0] not in (first, live[0])
    assert grants.refresh_token("alice") == again[0]
    assert tokens(sc, "refresh_token") == 2
    # A revoked grant, and no grant at all: consent is needed, and the body says where.
    for user in ("bob", "carol"):
        resp = call(sc, client=user)
        assert resp.status_code == 401 and resp.headers["X-Sidecar-Error"] == "consent_required"
        assert resp.json()["authorize_url"] == oauth_server.authorize_url
    assert grants.refresh_token("bob") == revoked  # a refused grant is left for the user's next consent


def test_two_sidecars_racing_on_a_rotation_never_lose_the_grant(
    start_sidecar: Start, oauth_server: OAuthServer, grants: GrantStore
) -> None:
    app = oauth_server.register_client("app", grant_types=("refresh_token",))
    users = [f"user{i}" for i in range(6)]
    for user in users:
        grants.put(user, oauth_server.issue_grant("app", user))
    # Two replicas on one store (for the file backend: one keys file, as two sidecars beside it).
    config = refresh_config(grants, oauth_server)
    env = {**grants.env, "APP_SECRET": app.client_secret}
    a, b = start_sidecar(config, env=env), start_sidecar(config, env=env)
    jobs = [(sc, u) for u in users for sc in (a, b)]
    for _round in range(2):
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda job: call(job[0], client=job[1]), jobs))
        outcome = [(r.status_code, r.headers.get("X-Sidecar-Error")) for r in answers]
        assert outcome == [(200, None)] * len(answers), (_round, outcome)
        assert [r.json()["subject"] for r in answers] == [user for _, user in jobs]
        for user in users:
            live = oauth_server.live_grants(user)
            assert len(live) == 1, user
            assert grants.refresh_token(user) == live[0], user
        # Round two: every cached access token refused at once, so both replicas refresh
        # every user again, each from what the other may just have written.
        oauth_server.revoke_access()


# ------------------------------------------------------------------ token exchange


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    threaded = ThreadedIdP()
    yield threaded.idp
    threaded.close()


def test_token_exchange_with_a_real_jwks(
    start_sidecar: Start, tmp_path: Path, oauth_server: OAuthServer, idp: IdentityProvider
) -> None:
    gw = oauth_server.register_client("gateway", grant_types=(TOKEN_EXCHANGE,), audiences=("api://reports",))
    key = idp.keys[0]

    def verify(token: str) -> str | None:
        try:
            return str(jwt.decode(token, key.public_pem, algorithms=[key.alg], issuer=idp.issuer)["sub"])
        except jwt.PyJWTError:
            return None

    oauth_server.subject_verifier = verify
    secret_file = tmp_path / "gateway-secret"
    secret_file.write_text(gw.client_secret + "\n")
    up = oauth_upstream(
        oauth_server,
        {"type": "token_exchange", "client_id": "gateway", "client_secret_file": str(secret_file),
         "audience": "api://reports"},
    )
    del up["secret"]
    sc = start_sidecar({
        "identity": {"jwt": {"issuer": idp.issuer, "client_id_claims": ["sub"]}},
        "upstreams": {"api": up},
    })
    user_token = idp.mint(sub="alice-sub", scope="openid")
    resp = call(sc, client="", Authorization=f"Bearer {user_token}")
    assert resp.status_code == 200, resp.text
    seen = resp.json()
    # The resource accepted the exchanged token (it refuses anything it did not issue, the
    # user's own token included) and it was issued for this subject and audience.
    assert (seen["subject"], seen["audience"], seen["client_id"]) == ("alice-sub", "api://reports", "gateway")
    assert call(sc, client="", Authorization=f"Bearer {user_token}").status_code == 200
    assert oauth_server.requests[TOKEN_EXCHANGE] == 1  # cached per subject
    other = idp.mint(sub="bob-sub")
    assert call(sc, client="", Authorization=f"Bearer {other}").json()["subject"] == "bob-sub"
    assert tokens(sc, "token_exchange") == 2
    # The exchange refused: credential_refused.
    oauth_server.subject_verifier = lambda token: None
    resp = call(sc, client="", Authorization=f"Bearer {idp.mint(sub='mallory')}")
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "credential_refused"
    assert make_secret  # every token the server issued is registered for the leak check
