"""``credential-sidecar oauth login`` as a user runs it, against a real OAuth server (Authlib).

The CLI runs as a subprocess; the test plays the browser: it opens the printed
authorize URL (the server approves at once for its test user), follows the redirect
to the CLI's loopback callback, and reads the page. Then it checks what the user
depends on: the store holds a refresh token that works at the token endpoint, and
nothing the CLI printed holds a token or the code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import yaml

from sidecar.secrets.file import load_secret_file
from tests.support.leaks import make_secret, output_file
from tests.support.oauth_server import OAuthServer
from tests.support.openbao import OpenBao
from tests.support.store_faults import secrets_manager
from tests.support.upstream import free_ports

APP = "mcp-github-app"
#: how long any step of the CLI may take on a busy machine
STEP_SECONDS = 60


class Login:
    """One ``oauth login`` process: its printed authorize URL, then its exit code and output."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "oauth", "login", "--config", str(config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self.printed: list[str] = []
        self.url = ""
        self.stdout = self.stderr = ""

    def authorize_url(self) -> str:
        """The URL the CLI prints for the browser (read from its stdout as it appears)."""
        assert self.proc.stdout is not None
        while not self.url:
            line = self.proc.stdout.readline()
            if not line:
                self.finish()
                raise AssertionError(f"the CLI ended before printing a URL: {self.stderr}")
            self.printed.append(line)
            if line.strip().startswith("http"):
                self.url = line.strip()
        return self.url

    def line_with(self, words: str) -> str:
        """The next printed line holding ``words``."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the CLI ended before printing {words!r}"
            self.printed.append(line)
            if words in line:
                return line.strip()

    def finish(self) -> int:
        out, err = self.proc.communicate(timeout=STEP_SECONDS)
        self.stdout, self.stderr = "".join(self.printed) + out, err
        # Kept where the leak check reads every output of the run.
        output_file(f"oauth-login-{uuid.uuid4().hex[:8]}.log").write_text(self.stdout + self.stderr)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def logins() -> Any:
    started: list[Login] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None) -> Login:
        login = Login(config, *args, env=env)
        started.append(login)
        return login

    yield start
    for login in started:
        login.kill()


def browse(url: str) -> requests.Response:
    """The browser's part: open the authorize URL, follow the provider's redirect to the loopback callback."""
    consent = requests.get(url, allow_redirects=False, timeout=STEP_SECONDS)
    assert consent.status_code == 302, consent.text[:300]
    callback = consent.headers["Location"]
    assert callback.startswith("http://127.0.0.1:")
    return requests.get(callback, timeout=STEP_SECONDS)


def the_code(url: str) -> str:
    consent = requests.get(url, allow_redirects=False, timeout=STEP_SECONDS)
    return dict(parse_qsl(urlsplit(consent.headers["Location"]).query))["code"]


def register_app(server: OAuthServer, auth_method: str = "client_secret_basic", refresh: bool = True) -> str:
    grants = ("authorization_code", "refresh_token") if refresh else ("authorization_code",)
    client = server.register_client(
        APP, grant_types=grants, auth_method=auth_method, scope="repo read:user",
        redirect_uris=("http://127.0.0.1/callback",),
    )
    return client.client_secret


def write_config(
    tmp_path: Path, server: OAuthServer, secrets: dict[str, Any], *, auth_method: str = "client_secret_basic",
    template: str = "mcp/github/{client_id}",
) -> Path:
    config = {
        "secrets": secrets,
        "upstreams": {
            "github": {
                "url": server.resource_url,
                "secret": template,
                "allow_private": True,
                "credential": {
                    "type": "oauth2_refresh_token",
                    "token_url": server.token_url,
                    "authorize_url": server.authorize_url + "?prompt=consent",
                    "client_id": APP,
                    "client_secret": "${APP_SECRET}",
                    "auth_method": auth_method,
                    "scopes": ["repo", "read:user"],
                },
            },
            "polygon": {"url": "https://api.polygon.io", "secret": "mcp/polygon/{client_id}",
                        "inject": {"query": "apiKey"}},
        },
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def file_secrets(tmp_path: Path, content: str = "{}\n") -> dict[str, Any]:
    (tmp_path / "keys.yaml").write_text(content)
    return {"backend": "file", "file": {"path": str(tmp_path / "keys.yaml")}}


def works_at_the_token_endpoint(server: OAuthServer, refresh_token: str, client_secret: str) -> None:
    answer = requests.post(
        server.token_url, data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=(APP, client_secret), timeout=STEP_SECONDS,
    )
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["access_token"]


def assert_nothing_secret_printed(login: Login, *values: str) -> None:
    for value in values:
        assert value not in login.stdout and value not in login.stderr


# ====================================================================== the flow, per store


@pytest.mark.parametrize("kind", ["file", "aws", "vault"])
def test_a_user_grants_once_and_the_store_holds_a_working_refresh_token(
    kind: str, tmp_path: Path, oauth_server: OAuthServer, logins: Any, request: pytest.FixtureRequest
) -> None:
    app_secret = register_app(oauth_server)
    env = {"APP_SECRET": app_secret}
    template = f"mcp/login-{uuid.uuid4().hex[:10]}/{{client_id}}"
    if kind == "file":
        secrets = file_secrets(tmp_path)
    elif kind == "aws":
        endpoint = request.getfixturevalue("moto_endpoint")
        env.update(request.getfixturevalue("aws_env"))
        secrets = {"backend": "aws", "aws": {"region": "us-east-1", "endpoint_url": endpoint}}
    else:
        bao: OpenBao = request.getfixturevalue("openbao")
        env["VAULT_TOKEN"] = bao.token()
        secrets = {"backend": "vault", "vault": {"address": bao.address, "auth": {"method": "token"}}}
    config = write_config(tmp_path, oauth_server, secrets, template=template)

    login = logins(config, "--upstream", "github", "--client", "alice", env=env)
    url = login.authorize_url()
    page = browse(url)
    assert login.finish() == 0, login.stderr
    assert page.status_code == 200 and "Access granted" in page.text

    secret_id = template.format(client_id="alice")
    if kind == "file":
        stored: dict[str, str] = load_secret_file(tmp_path / "keys.yaml")[secret_id]  # type: ignore[assignment]
    elif kind == "aws":
        client = secrets_manager(request.getfixturevalue("moto_endpoint"))
        stored = json.loads(client.get_secret_value(SecretId=secret_id)["SecretString"])
        client.close()
    else:
        stored = bao.api("GET", f"secret/data/{secret_id}")["data"]["data"]
    assert list(stored) == ["refresh_token"]
    assert stored["refresh_token"] in oauth_server.live_grants("alice")
    works_at_the_token_endpoint(oauth_server, stored["refresh_token"], app_secret)
    assert f"under {secret_id} ({kind} backend)" in login.stdout
    assert_nothing_secret_printed(login, stored["refresh_token"], app_secret)


def test_the_authorize_url_carries_the_contracts_parameters(
    tmp_path: Path, oauth_server: OAuthServer, logins: Any
) -> None:
    register_app(oauth_server)
    config = write_config(tmp_path, oauth_server, file_secrets(tmp_path))
    port = free_ports(1)[0]
    login = logins(config, "--upstream", "github", "--client", "alice", "--port", str(port),
                   env={"APP_SECRET": "unused"})
    url = urlsplit(login.authorize_url())
    params = parse_qsl(url.query)
    assert f"{url.scheme}://{url.netloc}{url.path}" == oauth_server.authorize_url
    assert [k for k, _ in params] == [
        "prompt", "response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge",
        "code_challenge_method",
    ]
    got = dict(params)
    assert got["prompt"] == "consent"  # the configured URL's own parameters are kept
    assert got["response_type"] == "code" and got["client_id"] == APP
    assert got["redirect_uri"] == f"http://127.0.0.1:{port}/callback"
    assert got["scope"] == "repo read:user" and got["code_challenge_method"] == "S256"
    assert len(got["state"]) >= 32 and len(got["code_challenge"]) == 43
    assert login.line_with("Waiting") == f"Waiting for the redirect to http://127.0.0.1:{port}/callback (up to 300 s)..."


def test_client_secret_post_and_a_grant_already_stored_is_replaced(
    tmp_path: Path, oauth_server: OAuthServer, logins: Any
) -> None:
    app_secret = register_app(oauth_server, auth_method="client_secret_post")
    old = make_secret("login-old-grant")
    secrets = file_secrets(tmp_path, f"mcp/github/alice:\n  refresh_token: {old}\nbob: keep-me\n")
    config = write_config(tmp_path, oauth_server, secrets, auth_method="client_secret_post")
    login = logins(config, "--upstream", "github", "--client", "alice", env={"APP_SECRET": app_secret})
    browse(login.authorize_url())
    assert login.finish() == 0, login.stderr
    data = load_secret_file(tmp_path / "keys.yaml")
    assert data["bob"] == "keep-me"
    new = data["mcp/github/alice"]
    assert isinstance(new, dict) and new["refresh_token"] != old
    works_at_the_token_endpoint_post(oauth_server, new["refresh_token"], app_secret)


def works_at_the_token_endpoint_post(server: OAuthServer, refresh_token: str, client_secret: str) -> None:
    answer = requests.post(
        server.token_url,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": APP,
              "client_secret": client_secret},
        timeout=STEP_SECONDS,
    )
    assert answer.status_code == 200, answer.text[:300]


# ====================================================================== refusals


def test_an_upstream_of_another_type_or_unknown_is_a_usage_error(tmp_path: Path, oauth_server: OAuthServer) -> None:
    config = write_config(tmp_path, oauth_server, file_secrets(tmp_path))
    env = {**os.environ, "APP_SECRET": "unused"}
    for upstream, words in (
        ("polygon", "upstreams.polygon.credential.type is api_key; oauth login stores a user's grant for type "
                    "oauth2_refresh_token only"),
        ("gitlab", "no upstream named 'gitlab' (configured: github, polygon)"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "oauth", "login", "--config", str(config), "--upstream", upstream,
             "--client", "alice"], capture_output=True, text=True, env=env, timeout=STEP_SECONDS,
        )
        assert (result.returncode, result.stderr.strip(), result.stdout) == (2, f"error: {words}", "")


def test_a_redirect_with_another_state_is_refused_and_nothing_is_stored(
    tmp_path: Path, oauth_server: OAuthServer, logins: Any
) -> None:
    register_app(oauth_server)
    config = write_config(tmp_path, oauth_server, file_secrets(tmp_path))
    login = logins(config, "--upstream", "github", "--client", "alice", env={"APP_SECRET": "unused"})
    url = login.authorize_url()
    redirect = dict(parse_qsl(urlsplit(url).query))["redirect_uri"]
    code = the_code(url)
    page = requests.get(redirect, params={"code": code, "state": "forged-" + uuid.uuid4().hex}, timeout=STEP_SECONDS)
    assert page.status_code == 400
    assert login.finish() == 3
    assert "state is not this login's" in login.stderr
    assert load_secret_file(tmp_path / "keys.yaml") == {}
    assert_nothing_secret_printed(login, code)


def test_the_user_declining_is_the_providers_error(tmp_path: Path, oauth_server: OAuthServer, logins: Any) -> None:
    register_app(oauth_server)
    config = write_config(tmp_path, oauth_server, file_secrets(tmp_path))
    login = logins(config, "--upstream", "github", "--client", "alice", env={"APP_SECRET": "unused"})
    query = dict(parse_qsl(urlsplit(login.authorize_url()).query))
    # What the provider sends the browser back with when the user clicks "Deny".
    page = requests.get(
        query["redirect_uri"],
        params={"error": "access_denied", "error_description": "The user denied the request", "state": query["state"]},
        timeout=STEP_SECONDS,
    )
    assert page.status_code == 400 and "access_denied" in page.text
    assert login.finish() == 3
    assert login.stderr.strip() == (
        "error: the provider did not grant access: access_denied (The user denied the request)"
    )
    assert load_secret_file(tmp_path / "keys.yaml") == {}


@pytest.mark.parametrize("failure", ["5xx", "refused_client", "no_refresh_token"])
def test_a_token_endpoint_failure_is_told_and_nothing_is_stored(
    failure: str, tmp_path: Path, oauth_server: OAuthServer, logins: Any
) -> None:
    app_secret = register_app(oauth_server, refresh=failure != "no_refresh_token")
    config = write_config(tmp_path, oauth_server, file_secrets(tmp_path))
    login = logins(config, "--upstream", "github", "--client", "alice", env={"APP_SECRET": app_secret})
    url = login.authorize_url()
    consent = requests.get(url, allow_redirects=False, timeout=STEP_SECONDS)
    if failure == "5xx":
        oauth_server.fail_status = 503
    elif failure == "refused_client":
        oauth_server.refuse(APP)
    page = requests.get(consent.headers["Location"], timeout=STEP_SECONDS)
    assert page.status_code == 400
    assert login.finish() == 4
    expected = {
        "5xx": f"the token endpoint {oauth_server.token_url} answered 503",
        "refused_client": f"the token endpoint {oauth_server.token_url} refused the code: invalid_client",
        "no_refresh_token": f"the token endpoint {oauth_server.token_url} issued no refresh token",
    }[failure]
    assert login.stderr.startswith("error: " + expected), login.stderr
    assert load_secret_file(tmp_path / "keys.yaml") == {}
    tokens = [t.access_token for t in oauth_server.access_tokens()]
    assert_nothing_secret_printed(login, app_secret, *tokens)


def test_no_redirect_within_the_timeout(tmp_path: Path, oauth_server: OAuthServer, logins: Any) -> None:
    register_app(oauth_server)
    config = write_config(tmp_path, oauth_server, file_secrets(tmp_path))
    login = logins(config, "--upstream", "github", "--client", "alice", "--timeout", "1", env={"APP_SECRET": "x"})
    redirect = dict(parse_qsl(urlsplit(login.authorize_url()).query))["redirect_uri"]
    assert login.finish() == 5
    assert login.stderr.strip() == f"error: no redirect came to {redirect} within 1 s"


def test_a_port_in_use_is_a_usage_error(tmp_path: Path, oauth_server: OAuthServer) -> None:
    config = write_config(tmp_path, oauth_server, file_secrets(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "oauth", "login", "--config", str(config), "--upstream", "github",
             "--client", "alice", "--port", str(port)],
            capture_output=True, text=True, env={**os.environ, "APP_SECRET": "x"}, timeout=STEP_SECONDS,
        )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
