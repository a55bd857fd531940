"""The real CLI with the vault backend against a real OpenBao dev server.

Each sidecar logs in as it would in a cluster (AppRole, the jwt method, a token
file); the apps' requests go through the data plane to the echo upstream.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from tests.support.leaks import make_secret
from tests.support.openbao import OpenBao
from tests.support.process import SidecarProcess, metric
from tests.support.upstream import EchoUpstream

Start = Callable[..., SidecarProcess]


def approle_auth(bao: OpenBao, tmp_path: Path, policy: str = "sidecar") -> dict[str, Any]:
    role = f"e2e-{uuid.uuid4().hex[:8]}"
    role_id, secret_id = bao.approle(role=role, policy=policy)
    secret_id_file = tmp_path / f"{role}.secret-id"
    secret_id_file.write_text(secret_id + "\n")
    return {"method": "approle", "role_id": role_id, "secret_id_file": str(secret_id_file)}


def vault_config(bao: OpenBao, echo: EchoUpstream, auth: dict[str, Any], prefix: str, **secrets: Any) -> dict[str, Any]:
    return {
        "secrets": {"backend": "vault", "vault": {"address": bao.address, "auth": auth}, **secrets},
        "upstreams": {
            "polygon": {
                "url": echo.url + "/echo/polygon", "secret": prefix + "/polygon/{client_id}",
                "inject": {"query": "apiKey"}, "allow_private": True,
            },
            "internal": {
                "url": echo.url + "/echo/internal", "secret": prefix + "/internal/{client_id}",
                "secret_field": "api_key", "inject": {"header": "X-API-Key"}, "allow_private": True,
            },
        },
    }


def call(sc: SidecarProcess, path: str, client: str) -> requests.Response:
    return requests.get(sc.url + path, headers={"X-Client-Id": client}, timeout=15)


def prefix() -> str:
    return f"mcp/e2e-{uuid.uuid4().hex[:10]}"


def test_kv_entries_are_injected_and_a_missing_path_is_no_credential(
    start_sidecar: Start, openbao: OpenBao, echo: EchoUpstream, tmp_path: Path
) -> None:
    p = prefix()
    alice, carol = make_secret("vault-e2e-alice"), make_secret("vault-e2e-carol")
    openbao.put(f"{p}/polygon/alice", api_key=alice)  # one field: no secret_field needed
    openbao.put(f"{p}/internal/carol", api_key=carol, owner="carol")
    sc = start_sidecar(vault_config(openbao, echo, approle_auth(openbao, tmp_path), p))
    assert call(sc, "/polygon/v2/x?a=1", "alice").status_code == 200
    assert echo.last().query == f"a=1&apiKey={alice}"
    assert call(sc, "/internal/v1/y", "carol").status_code == 200
    assert echo.last().header("X-API-Key") == carol
    resp = call(sc, "/polygon/x", "nobody")
    assert resp.status_code == 403 and resp.headers["X-Sidecar-Error"] == "no_credential"
    before = metric(sc, "sidecar_secret_fetch_duration_seconds_count", {"backend": "vault"})
    assert call(sc, "/polygon/x", "nobody").status_code == 403  # remembered: Vault is not asked again
    assert metric(sc, "sidecar_secret_fetch_duration_seconds_count", {"backend": "vault"}) == before == 3
    login = sc.wait_for_line(lambda line: line.get("message") == "vault login")
    assert (login["method"], login["mount"]) == ("approle", "approle")


def test_concurrent_first_requests_make_one_login_and_one_read(
    start_sidecar: Start, openbao: OpenBao, echo: EchoUpstream, tmp_path: Path
) -> None:
    p = prefix()
    openbao.put(f"{p}/polygon/bob", api_key=make_secret("vault-e2e-bob"))
    openbao.jwt_role()
    jwt_file = tmp_path / "jwt"
    jwt_file.write_text(openbao.mint_jwt())
    sc = start_sidecar(vault_config(openbao, echo, {"method": "jwt", "role": "sidecar", "jwt_file": str(jwt_file)}, p))
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda _: call(sc, "/polygon/x", "bob").status_code, range(30)))
    assert results == [200] * 30
    assert metric(sc, "sidecar_secret_fetch_duration_seconds_count", {"backend": "vault"}) == 1
    assert len([line for line in sc.lines() if line.get("message") == "vault login"]) == 1


def test_a_policy_denial_is_503_and_a_cached_key_is_served_stale(
    start_sidecar: Start, openbao: OpenBao, echo: EchoUpstream, tmp_path: Path
) -> None:
    p = prefix()
    policy = f"e2e-{uuid.uuid4().hex[:8]}"
    openbao.policy(policy, f'path "secret/data/{p}/*" {{ capabilities = ["read"] }}')
    key = make_secret("vault-e2e-denied-stale")
    openbao.put(f"{p}/polygon/dave", api_key=key)
    openbao.put(f"{p}/polygon/erin", api_key=make_secret("vault-e2e-denied-cold"))
    config = vault_config(openbao, echo, approle_auth(openbao, tmp_path, policy), p,
                          cache={"ttl_seconds": 0.2, "stale_if_error_seconds": 600})
    sc = start_sidecar(config)
    assert call(sc, "/polygon/x", "dave").status_code == 200
    openbao.policy(policy, 'path "secret/data/elsewhere/*" { capabilities = ["read"] }')  # an operator's mistake
    resp = call(sc, "/polygon/x", "erin")
    assert resp.status_code == 503 and resp.headers["X-Sidecar-Error"] == "secret_store_unavailable"
    assert resp.headers["Retry-After"].isdigit()
    assert metric(sc, "sidecar_secret_store_errors_total", {"backend": "vault", "kind": "access_denied"}) >= 1
    deadline = time.monotonic() + 10
    while metric(sc, "sidecar_secret_lookups_total", {"result": "stale"}) < 1:  # dave's TTL ends: served stale
        assert time.monotonic() < deadline
        assert call(sc, "/polygon/x", "dave").status_code == 200
        assert echo.last().query == f"apiKey={key}"
    sc.wait_for_line(lambda line: "serving cached values" in str(line.get("message")))
    assert len([line for line in sc.lines() if line.get("message") == "vault login"]) == 1  # denial is no re-login


def test_a_sealed_then_stopped_vault_serves_cached_keys_and_refuses_the_rest_in_time(
    start_sidecar: Start, own_openbao: OpenBao, echo: EchoUpstream, tmp_path: Path
) -> None:
    p = prefix()
    key = make_secret("vault-e2e-outage")
    own_openbao.put(f"{p}/polygon/frank", api_key=key)
    own_openbao.put(f"{p}/polygon/grace", api_key=make_secret("vault-e2e-outage-cold"))
    config = vault_config(own_openbao, echo, approle_auth(own_openbao, tmp_path), p,
                          lookup_timeout_seconds=2, cache={"ttl_seconds": 0.2, "stale_if_error_seconds": 600})
    sc = start_sidecar(config)
    assert call(sc, "/polygon/x", "frank").status_code == 200
    for outage in (own_openbao.seal, own_openbao.stop):
        outage()
        started = time.monotonic()
        resp = call(sc, "/polygon/x", "grace")
        assert resp.status_code == 503 and resp.headers["X-Sidecar-Error"] == "secret_store_unavailable"
        assert time.monotonic() - started < 2 + 1.5  # lookup_timeout_seconds, + slack for a busy machine
        resp = call(sc, "/polygon/x", "frank")
        assert resp.status_code == 200 and echo.last().query == f"apiKey={key}"
    kinds = {kind: metric(sc, "sidecar_secret_store_errors_total", {"backend": "vault", "kind": kind})
             for kind in ("sealed", "unreachable")}
    assert kinds["sealed"] >= 1 and kinds["unreachable"] >= 1, kinds


def test_a_token_file_and_prefetch(
    start_sidecar: Start, openbao: OpenBao, echo: EchoUpstream, tmp_path: Path
) -> None:
    p = prefix()
    openbao.put(f"{p}/polygon/alice", api_key=make_secret("vault-e2e-prefetch-a"))
    openbao.put(f"{p}/polygon/bob", api_key=make_secret("vault-e2e-prefetch-b"))
    token_file = tmp_path / "vault-token"
    token_file.write_text(openbao.token())
    sc = start_sidecar(vault_config(openbao, echo, {"method": "token", "token_file": str(token_file)}, p,
                                    prefetch=["alice", "bob"]))
    assert metric(sc, "sidecar_secret_fetch_duration_seconds_count", {"backend": "vault"}) >= 2  # ready = loaded
    assert call(sc, "/polygon/x", "alice").status_code == 200
    assert sc.wait_for_line(lambda line: line.get("event") == "request")["cache"] == "hit"


def test_check_summarises_the_vault_section_and_fails_clearly_on_missing_pieces(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "secrets:\n  backend: vault\n  vault:\n    address: https://vault.internal:8200\n"
        "    auth: {method: kubernetes, role: mcp-sidecar}\n"
        "upstreams:\n  polygon: {url: 'https://api.polygon.io', secret: 'mcp/polygon/{client_id}',"
        " inject: {query: apiKey}}\n"
    )
    run = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(good)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "vault: Vault KV v2 at https://vault.internal:8200 mount=secret auth=kubernetes role=mcp-sidecar" \
        in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("{method: kubernetes, role: mcp-sidecar}", "{method: approle}"))
    run = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(bad)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "secrets.vault.auth.role_id: is required with method approle" in run.stdout + run.stderr


def test_with_no_auth_block_check_wants_the_kubernetes_role_even_with_a_vault_token_about(tmp_path: Path) -> None:
    """The default login is the pod's own (kubernetes): a VAULT_TOKEN in the environment does not change it."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "secrets:\n  backend: vault\n  vault:\n    address: https://vault.internal:8200\n"
        "upstreams:\n  polygon: {url: 'https://api.polygon.io', secret: 'mcp/polygon/{client_id}',"
        " inject: {query: apiKey}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "SIDECAR_"))}
    env["VAULT_TOKEN"] = "s.not-a-default"

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(config)],
                              capture_output=True, text=True, timeout=30, env=env)

    run = check()
    assert run.returncode == 2, run.stdout + run.stderr
    assert "secrets.vault.auth.role: is required with method kubernetes" in run.stdout + run.stderr
    assert "token_file" not in run.stdout + run.stderr
    config.write_text(config.read_text().replace(
        "    address: https://vault.internal:8200\n",
        "    address: https://vault.internal:8200\n    auth: {role: mcp-sidecar}\n",
    ))
    run = check()
    assert run.returncode == 0, run.stdout + run.stderr
    assert ("auth=kubernetes role=mcp-sidecar jwt from /var/run/secrets/kubernetes.io/serviceaccount/token"
            " lookup_timeout=5s") in run.stdout
    assert "(at auth/" not in run.stdout  # the mount is the method's name
    assert "s.not-a-default" not in run.stdout + run.stderr
