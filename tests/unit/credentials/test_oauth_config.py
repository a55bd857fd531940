"""``upstreams.*.credential``: every key of the contract, its field-path errors, and ``check``'s line for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import CredentialSettings, InjectSettings, parse_settings
from sidecar.errors import ConfigError
from sidecar.summary import describe
from tests.support.leaks import make_secret
from tests.support.settings import parse, upstream

JWT = {"jwt": {"issuer": "https://idp.example/", "jwks_url": "https://idp.example/jwks.json"}}


def doc(tmp_path: Path, credential: dict[str, Any], *, identity: dict[str, Any] | None = None, **up: Any) -> dict[str, Any]:
    keys = tmp_path / "keys.yaml"
    keys.write_text("{}\n")
    raw: dict[str, Any] = {
        "secrets": {"file": {"path": str(keys)}},
        "upstreams": {"github": upstream(url="https://api.github.com", **{"credential": credential, **up})},
    }
    if identity is not None:
        raw["identity"] = identity
    return raw


def problems(raw: Any, tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, base_dir=tmp_path, env=env or {})
    return info.value.problems


def test_default_is_api_key_and_oauth_keys_do_not_apply_to_it(tmp_path: Path) -> None:
    s = parse(doc(tmp_path, {}), tmp_path)
    assert s.upstreams["github"].credential == CredentialSettings()
    assert problems(doc(tmp_path, {"token_url": "https://idp.example/token", "audience": "x"}), tmp_path) == [
        "upstreams.github.credential.token_url: applies to type oauth2_client_credentials or "
        "oauth2_refresh_token or token_exchange, not api_key",
        "upstreams.github.credential.audience: applies to type token_exchange, not api_key",
    ]


def test_client_credentials_every_key(tmp_path: Path) -> None:
    raw = doc(
        tmp_path,
        {"type": "oauth2_client_credentials", "token_url": "https://idp.example/oauth2/token",
         "auth_method": "client_secret_post", "scopes": ["read", "write"]},
        inject=None,
    )
    up = parse(raw, tmp_path).upstreams["github"]
    assert up.credential == CredentialSettings(
        type="oauth2_client_credentials", token_url="https://idp.example/oauth2/token",
        auth_method="client_secret_post", scopes=("read", "write"),
    )
    # An access token goes into Authorization as a bearer token unless the upstream says otherwise.
    assert up.inject == InjectSettings("header", "Authorization", "Bearer {secret}")


def test_refresh_token_needs_its_app_and_takes_the_secret_from_the_environment(tmp_path: Path) -> None:
    app_secret = make_secret("config-app-secret")
    credential = {
        "type": "oauth2_refresh_token", "token_url": "https://github.com/login/oauth/access_token",
        "client_id": "Iv1.abc", "client_secret": "${GITHUB_APP_SECRET}",
        "authorize_url": "https://github.com/login/oauth/authorize",
    }
    s = parse(doc(tmp_path, credential), tmp_path, env={"GITHUB_APP_SECRET": app_secret})
    c = s.upstreams["github"].credential
    assert (c.client_id, c.client_secret, c.authorize_url) == (
        "Iv1.abc", app_secret, "https://github.com/login/oauth/authorize"
    )
    assert app_secret not in repr(s) and s.warnings == ()
    # A literal secret works, with a warning: config files live in ConfigMaps and repositories.
    literal = parse(doc(tmp_path, {**credential, "client_secret": app_secret}), tmp_path)
    assert literal.warnings == (
        "upstreams.github.credential.client_secret: is written in the config file; take it from the "
        "environment (${VAR}) or client_secret_file",
    )
    del credential["client_id"]
    assert problems(doc(tmp_path, credential), tmp_path, env={"GITHUB_APP_SECRET": app_secret}) == [
        "upstreams.github.credential.client_id: is required with type oauth2_refresh_token "
        "(the OAuth app the sidecar acts as)"
    ]


def test_client_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "app-secret"
    secret_file.write_text(make_secret("config-secret-file"))
    credential = {
        "type": "oauth2_refresh_token", "token_url": "https://idp.example/token", "client_id": "app",
        "client_secret_file": "app-secret",
    }
    assert parse(doc(tmp_path, credential), tmp_path).upstreams["github"].credential.client_secret_file == secret_file
    missing = {**credential, "client_secret_file": "nope"}
    assert problems(doc(tmp_path, missing), tmp_path) == [
        "upstreams.github.credential.client_secret_file: file nope does not exist"
    ]
    both = {**credential, "client_secret": "${S}"}
    assert problems(doc(tmp_path, both), tmp_path, env={"S": make_secret("config-both")}) == [
        "upstreams.github.credential.client_secret: give client_secret or client_secret_file, not both"
    ]


def test_token_exchange_needs_jwt_mode_and_no_secret(tmp_path: Path) -> None:
    credential = {
        "type": "token_exchange", "token_url": "https://login.example/token", "client_id": "gateway",
        "client_secret": "${S}", "audience": "api://reports",
    }
    env = {"S": make_secret("config-exchange")}
    raw = doc(tmp_path, credential, identity=JWT)
    del raw["upstreams"]["github"]["secret"]
    up = parse(raw, tmp_path, env=env).upstreams["github"]
    assert (up.secret, up.credential.audience) == ("", "api://reports")
    # Without identity.jwt there is no verified token to exchange.
    raw.pop("identity")
    assert problems(raw, tmp_path, env=env) == [
        "upstreams.github.credential.type: token_exchange needs identity.jwt: it exchanges the caller's verified token"
    ]
    # A secret would never be read.
    with_secret = doc(tmp_path, credential, identity=JWT)
    assert problems(with_secret, tmp_path, env=env) == [
        "upstreams.github.secret: does not apply to credential type token_exchange (nothing is stored)"
    ]


def test_token_exchange_alone_needs_no_secret_store_file(tmp_path: Path) -> None:
    raw = {
        "identity": JWT,
        "upstreams": {
            "reports": {
                "url": "https://reports.example",
                "credential": {"type": "token_exchange", "token_url": "https://idp.example/token", "client_id": "gw"},
            }
        },
    }
    assert parse(raw, tmp_path).upstreams["reports"].credential.type == "token_exchange"


@pytest.mark.parametrize(
    ("credential", "extra", "expected"),
    [
        ({"type": "oauth"}, {}, "upstreams.github.credential.type: expected one of api_key, "
         "oauth2_client_credentials, oauth2_refresh_token, token_exchange"),
        ({"type": "oauth2_client_credentials"}, {}, "upstreams.github.credential.token_url: is required"),
        ({"type": "oauth2_client_credentials", "token_url": "ftp://idp/token"}, {},
         "upstreams.github.credential.token_url: expected an http:// or https:// URL"),
        ({"type": "oauth2_client_credentials", "token_url": "https://u:p@idp/token"}, {},
         "upstreams.github.credential.token_url: must not contain user information (user@host)"),
        ({"type": "oauth2_client_credentials", "token_url": "https://idp/t", "auth_method": "private_key_jwt"}, {},
         "upstreams.github.credential.auth_method: expected one of client_secret_basic, client_secret_post"),
        ({"type": "oauth2_client_credentials", "token_url": "https://idp/t", "client_id": "x"}, {},
         "upstreams.github.credential.client_id: applies to type oauth2_refresh_token or token_exchange, "
         "not oauth2_client_credentials"),
        ({"type": "oauth2_client_credentials", "token_url": "https://idp/t", "authorize_url": "https://idp/a"}, {},
         "upstreams.github.credential.authorize_url: applies to type oauth2_refresh_token, not oauth2_client_credentials"),
        ({"type": "oauth2_client_credentials", "token_url": "https://idp/t", "scope": ["a"]}, {},
         "upstreams.github.credential.scope: unknown key (did you mean scopes?)"),
        ({"type": "oauth2_client_credentials", "token_url": "https://idp/t"}, {"secret_field": "token"},
         "upstreams.github.secret_field: does not apply to credential type oauth2_client_credentials "
         "(the stored object's fields are fixed)"),
    ],
)
def test_mistakes_are_named_by_path(tmp_path: Path, credential: dict[str, Any], extra: dict[str, Any], expected: str) -> None:
    assert problems(doc(tmp_path, credential, **extra), tmp_path) == [expected]


def test_summary_names_the_type_and_never_the_secret(tmp_path: Path) -> None:
    app_secret = make_secret("summary-app-secret")
    credential = {
        "type": "oauth2_refresh_token", "token_url": "https://github.com/login/oauth/access_token",
        "client_id": "Iv1.abc", "client_secret": "${S}", "scopes": ["repo"],
        "authorize_url": "https://github.com/login/oauth/authorize",
    }
    text = describe(parse(doc(tmp_path, credential, inject=None), tmp_path, env={"S": app_secret}))
    line = next(line for line in text.splitlines() if line.startswith("  github"))
    assert line == (
        "  github       https://api.github.com  secret=mcp/polygon/{client_id}  "
        "credential=(oauth2_refresh_token token_url=https://github.com/login/oauth/access_token "
        "client_secret_basic client_id=Iv1.abc client_secret set scopes=repo "
        "authorize_url=https://github.com/login/oauth/authorize)  inject=header Authorization  clients=*"
    )
    assert app_secret not in text
