"""``check``'s summary (sidecar/summary.py): what it says, to the byte, and that it says no secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from sidecar.config import load_settings
from sidecar.summary import describe
from tests.support.leaks import make_secret
from tests.support.settings import config, parse, upstream


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {make_secret('summary-keys')}\n")
    return path


def test_every_line_of_a_full_summary(tmp_path: Path) -> None:
    ca = tmp_path / "idp-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    raw = {
        "listen": "[::1]:8081", "admin_listen": "127.0.0.1:0", "workers": 2,
        "identity": {
            "jwt": [
                {"issuer": "https://idp.example/pool", "jwks_url": "https://idp.example/pool/jwks.json",
                 "ca_file": str(ca), "client_id_claims": ["client_id", "azp"], "require_token_use": "access",
                 "required_claims": {"tenant": "acme", "verified": True}, "audience": "api"},
                {"issuer": "https://login.example.org/t/v2.0", "client_id_claims": ["azp"]},
            ],
        },
        "secrets": {
            "backend": "aws", "lookup_timeout_seconds": 2.5,
            "aws": {"region": "eu-west-1", "endpoint_url": "http://127.0.0.1:4566", "version_stage": "AWSPREVIOUS"},
            "cache": {"ttl_seconds": 60, "negative_ttl_seconds": 1.5, "stale_if_error_seconds": 0, "max_entries": 10},
            "prefetch": ["alice", "bob"],
        },
        "forward_proxy": {
            "passthrough_hosts": ["github.com", "pypi.org:8443"],
            "mitm": {"enabled": True, "ca_cert_out": str(tmp_path / "ca.pem")},
        },
        "upstreams": {
            "polygon": upstream(url="https://api.polygon.io/v2", clients=["alice", "team-*"],
                                connect_to="[fd00::5]:443", allow_private=True),
            "other": upstream(url="https://api.other.example", secret="{client_id}", secret_field="apiKey",
                              inject={"header": "Authorization", "format": "Bearer {secret}"},
                              scopes=["read", "write"], forward_proxy=False),
            "plain": upstream(url="http://10.0.0.7:8080", secret="shared", inject={"header": "X-Api-Key"},
                              allow_private=True),
        },
    }
    assert describe(parse(raw, tmp_path)).split("\n") == [
        "config:        (inline)",
        "listen:        [::1]:8081",
        "admin_listen:  127.0.0.1:0",
        "workers:       2",
        "identity:      verified JWT in Authorization; 2 issuers",
        f"  https://idp.example/pool  keys from https://idp.example/pool/jwks.json (ca_file {ca});"
        " client ID from client_id, azp; token_use=access; requires tenant, verified",
        "  https://login.example.org/t/v2.0  keys from OIDC discovery; client ID from azp",
        "secrets:       aws: AWS Secrets Manager region=eu-west-1 endpoint=http://127.0.0.1:4566 stage=AWSPREVIOUS"
        " lookup_timeout=2.5s",
        "cache:         ttl=60s negative=1.5s stale_if_error=0s max=10 prefetch=2 clients",
        "forward_proxy: on, passthrough github.com, pypi.org:8443, mitm on",
        "upstreams:     3",
        "  polygon      https://api.polygon.io/v2  connect_to=[fd00::5]:443  secret=mcp/polygon/{client_id}"
        "  inject=query apiKey  clients=alice,team-* allow_private",
        "  other        https://api.other.example  secret={client_id}[apiKey]  inject=header Authorization"
        "  clients=*  scopes=read,write route_only",
        "  plain        http://10.0.0.7:8080  secret=shared  inject=header X-Api-Key  clients=* allow_private",
    ]


def test_every_line_of_a_small_summary(tmp_path: Path, keys_file: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        f"secrets: {{file: {{path: {keys_file}}}}}\n"
        "identity: {header: X-Caller, default_client_id: alice}\n"
        "forward_proxy: {enabled: false}\n"
    )
    assert describe(load_settings(path, env={})) == "\n".join([
        f"config:        {path}",
        "listen:        127.0.0.1:8080",
        "admin_listen:  127.0.0.1:9901",
        "workers:       1",
        "identity:      header X-Caller",
        "               default client ID alice",
        f"secrets:       file: {keys_file} lookup_timeout=5s",
        "cache:         ttl=300s negative=30s stale_if_error=3600s max=10000",
        "forward_proxy: off",
        "upstreams:     0",
    ])


def test_summary_holds_no_secret(tmp_path: Path) -> None:
    alice, bob = make_secret("summary-alice"), make_secret("summary-bob")
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"mcp/polygon/alice: {alice}\nbob: {{apiKey: {bob}}}\n")
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "secrets:\n  file: {path: keys.yaml}\n  prefetch: [alice]\n"
        "identity:\n  default_client_id: alice\n"
        "upstreams:\n"
        "  polygon:\n    url: ${POLY_URL}\n    secret: mcp/polygon/{client_id}\n    inject: {query: apiKey}\n"
        "    clients: [alice, 'team-*']\n"
        "  other:\n    url: https://api.other.example\n    secret: '{client_id}'\n    secret_field: apiKey\n"
        "    inject: {header: Authorization, format: 'Bearer {secret}'}\n    scopes: [other]\n"
    )
    s = load_settings(path, env={"POLY_URL": "https://api.polygon.io"})
    summary = describe(s)
    assert alice not in summary
    assert bob not in summary
    # It still says what a user needs to check the config.
    for expected in (
        str(path),
        "127.0.0.1:8080",
        "127.0.0.1:9901",
        "https://api.polygon.io",
        "secret=mcp/polygon/{client_id}",
        "inject=query apiKey",
        "inject=header Authorization",
        "[apiKey]",
        "clients=alice,team-*",
        "scopes=other",
        "identity:      header X-Client-Id",
        "default client ID alice",
        "prefetch=1 clients",
        "upstreams:     2",
    ):
        assert expected in summary, expected


def test_summary_for_aws_and_jwt(tmp_path: Path) -> None:
    raw = {
        "identity": {"jwt": {"issuer": "https://idp.example/pool", "client_id_claims": ["azp"]}},
        "secrets": {"backend": "aws", "aws": {"region": "us-east-1", "endpoint_url": "http://127.0.0.1:4566"}},
        "upstreams": {"polygon": upstream()},
    }
    summary = describe(parse(raw, tmp_path))
    assert "AWS Secrets Manager region=us-east-1 endpoint=http://127.0.0.1:4566 stage=AWSCURRENT" in summary
    assert "https://idp.example/pool  keys from OIDC discovery" in summary
    assert "client ID from azp" in summary
    assert "config:        (inline)" in summary


def test_summary_shows_the_lookup_timeout(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "secrets": {"backend": "aws", "lookup_timeout_seconds": 8, "aws": {"region": "eu-west-1", "timeout_seconds": 2}},
        "upstreams": {"polygon": upstream()},
    }
    assert "lookup_timeout=8s" in describe(parse(raw, tmp_path))


def test_upstreams_out_of_forward_proxy_matching_are_marked_route_only(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file,
        upstreams={
            "personal": upstream(),
            "team": upstream(secret="mcp/polygon/team", forward_proxy=False),
            "other_style": upstream(inject={"header": "Authorization"}, forward_proxy="${FP}"),
        },
    )
    summary = describe(parse(raw, tmp_path, env={"FP": "false"}))
    assert "  team" in summary and summary.count(" route_only") == 2


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("10.0.4.7:443", "10.0.4.7:443"),
        ("vpce-0abc.execute-api.us-east-1.vpce.amazonaws.com:443", "vpce-0abc.execute-api.us-east-1.vpce.amazonaws.com:443"),
        ("Staging.Example.COM.:8443", "staging.example.com:8443"),
        ("[fd00::5]:1", "[fd00::5]:1"),
        ("[FD00:0::5]:65535", "[fd00::5]:65535"),
    ],
)
def test_summary_shows_connect_to_after_the_url(value: str, shown: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(connect_to=value, allow_private=True)})
    assert f"https://api.polygon.io  connect_to={shown}  secret=" in describe(parse(raw, tmp_path))


def test_summary_without_connect_to_says_nothing_of_it(tmp_path: Path, keys_file: Path) -> None:
    assert "connect_to=" not in describe(parse(config(keys_file), tmp_path))
