"""``secrets.vault`` in the config, and what ``check`` says about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import DEFAULT_VAULT_JWT_FILE, VaultAuthSettings, VaultBackendSettings
from sidecar.errors import ConfigError
from sidecar.summary import describe
from tests.support.settings import parse, upstream


def vault_config(vault: dict[str, Any] | None = None, **upstream_overrides: Any) -> dict[str, Any]:
    return {
        "secrets": {"backend": "vault", "vault": vault if vault is not None else {}},
        "upstreams": {"polygon": upstream(**upstream_overrides)},
    }


def problems(raw: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, tmp_path, env)
    return list(info.value.problems)


TOKEN_AUTH = {"auth": {"method": "token"}}


def test_address_and_token_come_from_the_environment_as_for_the_vault_cli(tmp_path: Path) -> None:
    settings = parse(vault_config(TOKEN_AUTH), tmp_path, {"VAULT_ADDR": "https://vault.example:8200/", "VAULT_TOKEN": "t"})
    assert settings.secrets.vault == VaultBackendSettings(
        address="https://vault.example:8200", auth=VaultAuthSettings(method="token", mount="token")
    )
    assert settings.secrets.vault.auth.token_file is None
    assert settings.secrets.vault.mount == "secret"


def test_without_an_auth_block_the_sidecar_logs_in_as_its_pod(tmp_path: Path) -> None:
    """The contract's default: the kubernetes method with the service-account token, not a token to mount."""
    raw = vault_config({"address": "https://vault.example:8200", "auth": {"role": "mcp-sidecar"}})
    auth = parse(raw, tmp_path, {"VAULT_TOKEN": "ignored"}).secrets.vault.auth
    assert auth == VaultAuthSettings(
        method="kubernetes", mount="kubernetes", role="mcp-sidecar",
        jwt_file=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
    )
    assert VaultBackendSettings().auth == VaultAuthSettings(method="kubernetes", mount="kubernetes")


def test_no_auth_block_reads_as_the_kubernetes_method_and_asks_for_its_role(tmp_path: Path) -> None:
    assert problems(vault_config({"address": "https://vault.example:8200"}), tmp_path, {"VAULT_TOKEN": "t"}) == [
        "secrets.vault.auth.role: is required with method kubernetes (the Vault role to log in as)",
    ]
    keys = tmp_path / "keys.yaml"
    keys.write_text("{}\n")
    raw = {"secrets": {"file": {"path": str(keys)}, "vault": {"address": "https://vault.example:8200"}}}
    auth = parse(raw, tmp_path).secrets.vault.auth  # not the backend, so not checked: the bare defaults
    assert (auth.method, auth.mount, auth.role, auth.jwt_file) == (
        "kubernetes", "kubernetes", None, Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    )


def test_nothing_to_reach_or_log_in_with_is_two_clear_problems(tmp_path: Path) -> None:
    assert problems(vault_config(TOKEN_AUTH), tmp_path) == [
        "secrets.vault.address: is required (or set VAULT_ADDR)",
        "secrets.vault.auth.token_file: is required with method token when VAULT_TOKEN is not set",
    ]


def test_every_key(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(_ca_pem())
    settings = parse(vault_config({
        "address": "https://vault.internal:8200", "namespace": "/team-a/", "mount": "kv/mcp/", "ca_file": "ca.pem",
        "auth": {"method": "kubernetes", "mount": "k8s-prod", "role": "mcp-sidecar", "jwt_file": "sa/token"},
    }), tmp_path)
    v = settings.secrets.vault
    assert (v.address, v.namespace, v.mount, v.ca_file) == (
        "https://vault.internal:8200", "team-a", "kv/mcp", tmp_path / "ca.pem"
    )
    assert v.auth == VaultAuthSettings(method="kubernetes", mount="k8s-prod", role="mcp-sidecar",
                                       jwt_file=tmp_path / "sa" / "token")


@pytest.mark.parametrize("method", ["kubernetes", "jwt"])
def test_the_auth_mount_defaults_to_the_method_and_the_jwt_file_to_the_service_account_token(
    method: str, tmp_path: Path
) -> None:
    auth = parse(vault_config({"address": "https://v:8200", "auth": {"method": method, "role": "r"}}), tmp_path)
    assert (auth.secrets.vault.auth.mount, auth.secrets.vault.auth.jwt_file) == (method, DEFAULT_VAULT_JWT_FILE)


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"method": "approle"}, [
            "secrets.vault.auth.role_id: is required with method approle",
            "secrets.vault.auth.secret_id_file: is required with method approle (a file holding the secret id)",
        ]),
        ({"method": "kubernetes"}, [
            "secrets.vault.auth.role: is required with method kubernetes (the Vault role to log in as)"]),
        ({"method": "jwt", "jwt_file": "t"}, [
            "secrets.vault.auth.role: is required with method jwt (the Vault role to log in as)"]),
        ({"method": "token", "token_file": "t", "role": "r"}, [
            "secrets.vault.auth.role: applies to method kubernetes or jwt, not token"]),
        ({"method": "kubernetes", "role": "r", "secret_id_file": "s"}, [
            "secrets.vault.auth.secret_id_file: applies to method approle, not kubernetes"]),
        ({"method": "ldap"}, ["secrets.vault.auth.method: expected one of token, approle, kubernetes, jwt"]),
        ({"method": "token", "token_file": "t", "mount": "a/../b"}, [
            "secrets.vault.auth.mount: has an empty, . or .. segment"]),
        ({"metod": "token"}, ["secrets.vault.auth.metod: unknown key (did you mean method?)"]),
    ],
)
def test_each_method_says_what_it_misses(auth: dict[str, Any], expected: list[str], tmp_path: Path) -> None:
    assert problems(vault_config({"address": "https://v:8200", "auth": auth}), tmp_path, {"VAULT_TOKEN": "t"}) \
        == expected


def test_paths_that_are_not_one_vault_path_are_refused(tmp_path: Path) -> None:
    raw = vault_config({"address": "https://v:8200", "mount": "a//b", **TOKEN_AUTH}, secret="mcp/../{client_id}")
    assert problems(raw, tmp_path, {"VAULT_TOKEN": "t"}) == [
        "secrets.vault.mount: has an empty, . or .. segment",
        "upstreams.polygon.secret: is not a Vault KV path: has an empty, . or .. segment",
    ]


def test_an_address_with_user_information_is_refused(tmp_path: Path) -> None:
    found = problems(vault_config({"address": "https://user:pw@v:8200", **TOKEN_AUTH}), tmp_path, {"VAULT_TOKEN": "t"})
    assert len(found) == 1 and found[0].startswith("secrets.vault.address: ")


def test_the_vault_section_is_ignored_but_checked_for_typos_with_another_backend(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("{}\n")
    raw = {"secrets": {"file": {"path": str(keys)}, "vault": {"auth": {"method": "approle"}}},
           "upstreams": {"polygon": upstream()}}
    assert parse(raw, tmp_path).secrets.backend == "file"  # approle's missing pieces matter only for vault
    raw["secrets"]["vault"] = {"adress": "x"}
    assert problems(raw, tmp_path) == ["secrets.vault.adress: unknown key (did you mean address?)"]


def test_check_describes_where_vault_is_and_how_the_sidecar_logs_in(tmp_path: Path) -> None:
    settings = parse(vault_config({
        "address": "https://vault.internal:8200", "namespace": "team-a",
        "auth": {"method": "approle", "mount": "approle-mcp", "role_id": "r-1", "secret_id_file": "/run/sid"},
    }), tmp_path)
    text = describe(settings)
    assert (
        "secrets:       vault: Vault KV v2 at https://vault.internal:8200 mount=secret namespace=team-a "
        "auth=approle role_id=r-1 secret_id from /run/sid (at auth/approle-mcp) lookup_timeout=5s"
    ) in text
    assert "an entry of several fields needs the upstream's secret_field" in text
    k8s = describe(parse(vault_config({"address": "https://v:8200", "auth": {"method": "kubernetes", "role": "x"}}),
                         tmp_path))
    assert f"auth=kubernetes role=x jwt from {DEFAULT_VAULT_JWT_FILE} lookup_timeout" in k8s
    token = describe(parse(vault_config({"address": "https://v:8200", **TOKEN_AUTH}), tmp_path, {"VAULT_TOKEN": "s.sekrit"}))
    assert "auth=token from VAULT_TOKEN" in token and "s.sekrit" not in token


def _ca_pem() -> str:
    import trustme

    return trustme.CA().cert_pem.bytes().decode()
