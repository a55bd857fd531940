"""The vault backend against a real OpenBao dev server (tests/support/openbao.py).

What every store does alike runs in tests/unit/secrets/test_backends.py; here is what is
Vault's own: the four ways to log in, keeping the login alive, telling an expired
token from a policy denial, KV v2 entries and their versions, check-and-set
writes, namespaces, TLS with ca_file, and a sealed or silent Vault.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import CacheSettings, VaultAuthSettings, VaultBackendSettings
from sidecar.errors import NoCredential, SecretStoreUnavailable
from sidecar.secrets.base import (
    SecretNotFound,
    StoredFields,
    StoreError,
    WriteConflict,
    Written,
    extract,
    version_of,
)
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.vault import VaultBackend
from tests.support.leaks import make_secret, register_secret
from tests.support.openbao import NAMESPACE, OpenBao

CACHE = CacheSettings()
#: Token auth from VAULT_TOKEN (the default method is kubernetes, which these tests name when they mean it).
TOKEN = VaultAuthSettings(method="token", mount="token")


def rewrite(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime forward, so the change is seen even within one clock tick."""
    before = path.stat().st_mtime_ns if path.exists() else time.time_ns()
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait (without blocking the loop) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Backends:
    """Vault backends a test starts; each closed after it, its own token registered for the leak check."""

    def __init__(self, bao: OpenBao, tmp_path: Path) -> None:
        self.bao = bao
        self.tmp_path = tmp_path
        self.started: list[VaultBackend] = []

    def file(self, name: str, text: str) -> Path:
        path = self.tmp_path / name
        path.write_text(text + "\n", encoding="utf-8")
        return path

    async def start(
        self, lookup_timeout: float = 5.0, env: dict[str, str] | None = None, **settings: Any
    ) -> VaultBackend:
        settings.setdefault("address", self.bao.address)
        settings.setdefault("auth", TOKEN)  # no auth named: the token in ``env``'s VAULT_TOKEN
        backend = VaultBackend(VaultBackendSettings(**settings), lookup_timeout, env=env or {})
        self.started.append(backend)
        await backend.start()
        return backend

    async def login(self, method: str, **auth: Any) -> VaultBackend:
        """A backend logging in by ``method`` with fresh credentials from the server."""
        if method == "token":
            auth.setdefault("token_file", self.file("token", self.bao.token()))
        elif method == "approle":
            role_id, secret_id = self.bao.approle(role=auth.pop("role_name", "sidecar"), ttl=auth.pop("ttl", "1h"))
            auth.update(role_id=role_id, secret_id_file=self.file("secret-id", secret_id))
        elif method == "jwt":
            self.bao.jwt_role()
            auth.update(role="sidecar", jwt_file=self.file("jwt", self.bao.mint_jwt()))
        elif method == "kubernetes":
            self.bao.kubernetes_role()
            auth.update(role="sidecar", jwt_file=self.file("sa-token", self.bao.service_account_jwt()))
        return await self.start(auth=VaultAuthSettings(method=method, mount=method, **auth))

    async def close(self) -> None:
        for backend in self.started:
            login = backend._login
            if login is not None:
                register_secret(login.token.reveal())
            await backend.close()


@pytest.fixture
async def vaults(openbao: OpenBao, tmp_path: Path) -> AsyncIterator[Backends]:
    backends = Backends(openbao, tmp_path)
    yield backends
    await backends.close()


def secret_path(name: str = "alice") -> str:
    return f"mcp/vault-{uuid.uuid4().hex[:10]}/{name}"


# ====================================================================== logging in


@pytest.mark.parametrize("method", ["token", "approle", "jwt", "kubernetes"])
async def test_each_auth_method_logs_in_once_and_reads(
    method: str, vaults: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    key, path = make_secret(f"vault-{method}"), secret_path()
    vaults.bao.put(path, api_key=key)
    with caplog.at_level(logging.DEBUG, logger="sidecar.secrets.vault"):
        backend = await vaults.login(method)
        cache = SecretCache(backend, CACHE)
        assert (await cache.get(path))[0].reveal() == key
        assert (await cache.get(path, "api_key"))[0].reveal() == key
        assert backend.logins == 1
    assert backend._login is not None
    own_token = backend._login.token.reveal()
    leaked = own_token in caplog.text or own_token in repr(backend)
    assert not leaked
    if method != "token":
        assert [r.message for r in caplog.records if r.name == "sidecar.secrets.vault"][:1] == ["vault login"]


async def test_the_token_method_reads_vault_token_when_there_is_no_token_file(vaults: Backends) -> None:
    key, path = make_secret("vault-env-token"), secret_path()
    vaults.bao.put(path, api_key=key)
    backend = await vaults.start(env={"VAULT_TOKEN": vaults.bao.token()})
    assert await backend.fetch(path) == {"api_key": key}


async def test_kubernetes_login_sends_the_pods_token_for_review(vaults: Backends) -> None:
    """Vault asks the cluster (here a TokenReview stand-in) about the service-account token it was given."""
    vaults.bao.put(path := secret_path(), api_key=make_secret("vault-k8s-review"))
    assert vaults.bao.tokenreview is not None
    before = len(vaults.bao.tokenreview.reviews)
    backend = await vaults.login("kubernetes")
    await backend.fetch(path)
    review = vaults.bao.tokenreview.reviews[before]
    sa_token = backend.settings.auth.jwt_file.read_text().strip()
    assert review["body"]["spec"]["token"] == sa_token
    assert review["authorization"] == f"Bearer {sa_token}"  # no reviewer JWT configured: the pod's own


async def test_a_refused_login_is_an_auth_error_whose_log_holds_no_secret_id(
    vaults: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    role_id, _ = vaults.bao.approle()
    wrong = register_secret(str(uuid.uuid4()))
    backend = await vaults.start(auth=VaultAuthSettings(
        method="approle", mount="approle", role_id=role_id, secret_id_file=vaults.file("wrong", wrong)
    ))
    with caplog.at_level(logging.ERROR, logger="sidecar.secrets.vault"), pytest.raises(StoreError) as info:
        await backend.fetch(secret_path())
    assert info.value.kind == "auth" and "auth/approle" in str(info.value)
    failures = [r for r in caplog.records if r.getMessage() == "vault login failed"]
    assert failures and failures[0].status == 400  # type: ignore[attr-defined]
    leaked = wrong in caplog.text or wrong in str(info.value)
    assert not leaked


async def test_a_missing_token_file_is_an_auth_error_naming_the_file(vaults: Backends, tmp_path: Path) -> None:
    absent = tmp_path / "not-yet-written"
    backend = await vaults.start(auth=VaultAuthSettings(method="token", mount="token", token_file=absent))
    with pytest.raises(StoreError) as info:
        await backend.fetch(secret_path())
    assert info.value.kind == "auth" and str(absent) in str(info.value)
    # A Vault Agent writes it later: the next lookup uses it.
    key, path = make_secret("vault-late-file"), secret_path()
    vaults.bao.put(path, api_key=key)
    absent.write_text(vaults.bao.token())
    assert await backend.fetch(path) == {"api_key": key}


# ====================================================================== keeping the token alive


async def test_a_rewritten_token_file_is_used_from_the_next_read(vaults: Backends) -> None:
    key, path = make_secret("vault-file-rotate"), secret_path()
    vaults.bao.put(path, api_key=key)
    backend = await vaults.login("token")
    token_file = backend.settings.auth.token_file
    assert token_file is not None
    first = token_file.read_text().strip()
    assert await backend.fetch(path) == {"api_key": key}
    rewrite(token_file, first + "\n")  # touched, same token: nothing changes
    assert await backend.fetch(path) == {"api_key": key}
    assert backend.logins == 1
    vaults.bao.revoke(first)
    rewrite(token_file, vaults.bao.token())  # a Vault Agent wrote a new one
    assert await backend.fetch(path) == {"api_key": key}
    assert backend.logins == 2
    assert backend._login is not None and backend._login.token.reveal() != first


async def test_a_revoked_token_from_a_file_is_an_auth_error_until_the_file_changes(vaults: Backends) -> None:
    path = secret_path()
    vaults.bao.put(path, api_key=make_secret("vault-revoked-file"))
    backend = await vaults.login("token")
    token_file = backend.settings.auth.token_file
    assert token_file is not None
    await backend.fetch(path)
    vaults.bao.revoke(token_file.read_text().strip())
    with pytest.raises(StoreError) as info:
        await backend.fetch(path)
    assert info.value.kind == "auth" and "refused" in str(info.value)
    rewrite(token_file, vaults.bao.token())
    await backend.fetch(path)


async def test_a_login_is_renewed_before_it_expires(vaults: Backends) -> None:
    """A 3 s login renewed at 2/3 of its lease keeps reading well past 3 s, with no new login."""
    key, path = make_secret("vault-renew"), secret_path()
    vaults.bao.put(path, api_key=key)
    backend = await vaults.login("approle", role_name="short", ttl="3s")
    await backend.fetch(path)
    logged_in = time.monotonic()
    login = backend._login
    assert login is not None and login.lease == 3
    await until(lambda: backend.renewals >= 2)  # at 2 s, then 2 s after: past the first lease's end
    assert time.monotonic() - logged_in > 3 and backend._login is login
    assert await backend.fetch(path) == {"api_key": key}
    assert backend.logins == 1


async def test_a_given_token_is_looked_up_and_renewed(vaults: Backends) -> None:
    path = secret_path()
    vaults.bao.put(path, api_key=make_secret("vault-given-renew"))
    backend = await vaults.start(env={"VAULT_TOKEN": vaults.bao.token(ttl="3s")})
    await backend.fetch(path)
    await until(lambda: backend.renewals >= 1)
    assert backend._login is not None and backend._login.lease == 3


async def test_a_revoked_login_token_means_one_new_login(vaults: Backends, caplog: pytest.LogCaptureFixture) -> None:
    key, path = make_secret("vault-relogin"), secret_path()
    vaults.bao.put(path, api_key=key)
    backend = await vaults.login("approle")
    await backend.fetch(path)
    assert backend._login is not None
    old = backend._login.token.reveal()
    register_secret(old)
    vaults.bao.revoke(old)
    with caplog.at_level(logging.WARNING, logger="sidecar.secrets.vault"):
        assert await backend.fetch(path) == {"api_key": key}
    assert backend.logins == 2
    assert "vault token no longer valid" in caplog.text
    assert old not in caplog.text


async def test_an_expired_login_token_means_one_new_login(vaults: Backends) -> None:
    """The role's max_ttl ends the token whatever renewals do; the next read logs in again."""
    key, path = make_secret("vault-expired"), secret_path()
    vaults.bao.put(path, api_key=key)
    role_id, secret_id = vaults.bao.approle(role="capped", ttl="2s", max_ttl="2s")
    backend = await vaults.start(auth=VaultAuthSettings(
        method="approle", mount="approle", role_id=role_id, secret_id_file=vaults.file("sid", secret_id)
    ))
    assert backend._keeper is not None
    backend._keeper.cancel()  # no renewal or login in the background: the read itself must cope
    await backend.fetch(path)
    first = backend._login
    assert first is not None
    await until(lambda: first.expired(time.monotonic()))
    assert await backend.fetch(path) == {"api_key": key}
    assert backend.logins == 2


# ====================================================================== what Vault answers


async def test_a_policy_denial_is_a_store_error_not_a_new_login(vaults: Backends) -> None:
    outside = f"other/vault-{uuid.uuid4().hex[:8]}/alice"
    vaults.bao.put(outside, api_key=make_secret("vault-outside"))  # exists, but not for the sidecar's policy
    backend = await vaults.login("approle")
    with pytest.raises(StoreError) as info:
        await backend.fetch(outside)
    assert info.value.kind == "access_denied" and not info.value.transient
    assert backend.logins == 1
    with pytest.raises(SecretStoreUnavailable) as refusal:
        await SecretCache(backend, CACHE).get(outside)
    assert refusal.value.reason == "access_denied"


async def test_a_deleted_current_version_is_no_secret(vaults: Backends) -> None:
    path = secret_path()
    vaults.bao.put(path, api_key=make_secret("vault-deleted"))
    vaults.bao.api("DELETE", f"secret/data/{path}")  # soft delete of the current version
    backend = await vaults.login("token")
    with pytest.raises(SecretNotFound):
        await backend.fetch(path)


async def test_the_entry_and_its_version_come_back(vaults: Backends) -> None:
    path = secret_path()
    vaults.bao.put(path, api_key=make_secret("vault-v1"))
    version = vaults.bao.put(path, api_key=(key := make_secret("vault-v2")), plan="pro", seats=5)
    backend = await vaults.login("token")
    raw = await backend.fetch(path)
    assert isinstance(raw, StoredFields) and raw == {"api_key": key, "plan": "pro", "seats": 5}
    assert version_of(raw) == version == 2
    assert version_of("a plain string") is None


async def test_an_entry_of_several_fields_needs_secret_field(vaults: Backends) -> None:
    path, empty = secret_path(), secret_path("empty")
    vaults.bao.put(path, api_key=make_secret("vault-two-a"), other=make_secret("vault-two-b"))
    vaults.bao.put(empty)
    cache = SecretCache(await vaults.login("token"), CACHE)
    with pytest.raises(NoCredential) as info:
        await cache.get(path)
    assert info.value.reason == "secret_field_needed"
    with pytest.raises(NoCredential, match="several fields; the upstream needs secret_field"):
        extract(StoredFields({"a": "1", "b": "2"}), None)
    assert extract(StoredFields({"a": "1", "b": "2"}), "b").reveal() == "2"
    with pytest.raises(NoCredential) as none:
        await cache.get(empty)
    assert none.value.reason == "secret_field_missing"


@pytest.mark.parametrize("asked", ["mcp/../other/alice", "mcp/./alice", "mcp//alice", "/mcp/alice", ""])
async def test_ids_that_are_not_one_vault_path_are_no_secret_and_never_asked(asked: str, vaults: Backends) -> None:
    backend = await vaults.start(env={"VAULT_TOKEN": "never-used"})
    with pytest.raises(SecretNotFound):
        await backend.fetch(asked)
    assert backend.logins == 0


async def test_a_namespace_is_sent_with_every_call(vaults: Backends) -> None:
    """OpenBao serves namespaces as Vault Enterprise does: the same path in team-a is another secret."""
    key, path = make_secret("vault-ns"), secret_path()
    vaults.bao.put(path, namespace=NAMESPACE, api_key=key)
    in_ns = await vaults.start(namespace=NAMESPACE, env={"VAULT_TOKEN": vaults.bao.root_token})
    assert await in_ns.fetch(path) == {"api_key": key}
    root = await vaults.start(env={"VAULT_TOKEN": vaults.bao.root_token})
    with pytest.raises(SecretNotFound):
        await root.fetch(path)


# ====================================================================== writes


async def test_a_check_and_set_write_lands_once_and_a_late_writer_is_told(vaults: Backends) -> None:
    path = secret_path()
    vaults.bao.put(path, refresh_token=make_secret("vault-rt-1"))
    backend = await vaults.login("approle")
    read = await backend.fetch(path)
    new, late = make_secret("vault-rt-2"), make_secret("vault-rt-late")
    assert await backend.write(path, {"refresh_token": new}, version_of(read)) == Written(2)
    # Another replica read version 1 too, and writes after us: it must not overwrite.
    assert await backend.write(path, {"refresh_token": late}, version_of(read)) == WriteConflict()
    assert await backend.fetch(path) == {"refresh_token": new}
    # None: only where nothing is stored yet.
    assert await backend.write(path, {"refresh_token": late}, None) == WriteConflict()
    fresh = secret_path("fresh")
    assert await backend.write(fresh, {"refresh_token": new}, None) == Written(1)
    assert version_of(await backend.fetch(fresh)) == 1


async def test_a_write_outside_the_policy_is_a_store_error(vaults: Backends) -> None:
    backend = await vaults.login("approle")
    with pytest.raises(StoreError) as info:
        await backend.write(f"other/{uuid.uuid4().hex}", {"refresh_token": make_secret("vault-w-denied")}, None)
    assert info.value.kind == "access_denied"


# ====================================================================== outages and bounds


async def test_a_sealed_vault_is_unavailable_until_unsealed(own_openbao: OpenBao, tmp_path: Path) -> None:
    vaults = Backends(own_openbao, tmp_path)
    try:
        key, path = make_secret("vault-sealed"), secret_path()
        own_openbao.put(path, api_key=key)
        backend = await vaults.login("approle")
        cache = SecretCache(backend, CACHE, lookup_timeout=5.0)
        assert (await cache.get(path))[0].reveal() == key
        own_openbao.seal()
        with pytest.raises(StoreError) as info:
            await backend.fetch(path)
        assert info.value.kind == "sealed" and info.value.transient
        own_openbao.unseal()
        assert await backend.fetch(path) == {"api_key": key}
    finally:
        await vaults.close()


async def test_a_silent_vault_ends_the_lookup_within_its_timeout(vaults: Backends) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        address = f"http://127.0.0.1:{server.getsockname()[1]}"
        backend = await vaults.start(lookup_timeout=1.0, address=address, env={"VAULT_TOKEN": "unused"})
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            await backend.fetch(secret_path())
        elapsed = time.monotonic() - started
    assert info.value.kind == "timeout"
    assert elapsed < 1.0 + 0.8, f"took {elapsed:.1f}s"  # no retry starts past the deadline; + slack


async def test_tls_with_ca_file_and_without_it(tmp_path: Path) -> None:
    server = OpenBao(tmp_path / "bao", tls=True)
    vaults = Backends(server, tmp_path)
    try:
        server.start()
        server.setup()
        key, path = make_secret("vault-tls"), secret_path()
        server.put(path, api_key=key)
        token = server.token()
        trusted = await vaults.start(ca_file=server.ca_file, env={"VAULT_TOKEN": token})
        assert await trusted.fetch(path) == {"api_key": key}
        untrusted = await vaults.start(env={"VAULT_TOKEN": token})
        with pytest.raises(StoreError) as info:
            await untrusted.fetch(path)
        assert info.value.kind == "tls" and "ca_file" in str(info.value)
    finally:
        await vaults.close()
        server.stop()
