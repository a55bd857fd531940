"""The credential factory (sidecar/credentials/factory.py): a type in, its provider out, and
what a reload's new provider takes over from the one it replaces. Over a real file store
and the tests' authorization server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import CREDENTIAL_TYPES, CacheSettings, InjectSettings, UpstreamSettings, parse_settings
from sidecar.credentials.factory import BUILDERS, CredentialBuildError, build_provider
from sidecar.identity.base import Identity
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.file import FileBackend
from tests.support.oauth_server import OAuthServer


def api_key_settings() -> UpstreamSettings:
    return UpstreamSettings(
        name="polygon", url="https://api.example", scheme="https", host="api.example", port=443,
        base_path="", secret="api/{upstream}/{client_id}", inject=InjectSettings("query", "apiKey"),
    )


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text("{}\n", encoding="utf-8")
    return path


async def open_cache(keys_file: Path) -> SecretCache:
    backend = FileBackend(keys_file)
    await backend.start()
    return SecretCache(backend, CacheSettings())


def test_every_credential_type_has_a_builder() -> None:
    assert set(BUILDERS) == set(CREDENTIAL_TYPES)


def oauth_settings(tmp_path: Path, server: OAuthServer, **credential: Any) -> UpstreamSettings:
    up = {
        "url": server.resource_url, "secret": "mcp/api/{client_id}", "allow_private": True,
        "credential": {"token_url": server.token_url, **credential},
    }
    raw = {"secrets": {"file": {"path": str(tmp_path / "keys.yaml")}}, "upstreams": {"api": up}}
    return parse_settings(raw, base_dir=tmp_path, env={}).upstreams["api"]


def no_wait(client: str, delta: int) -> None:
    pass


async def test_a_reload_keeps_the_tokens_got_from_the_same_source(
    tmp_path: Path, keys_file: Path, oauth_server: OAuthServer
) -> None:
    agent = oauth_server.register_client("agent-1", scope="read write")
    keys_file.write_text(yaml.safe_dump({"mcp/api/alice": {"client_id": agent.client_id, "client_secret": agent.client_secret}}))
    cache = await open_cache(keys_file)
    cc = {"type": "oauth2_client_credentials", "scopes": ["read"]}
    first = build_provider(oauth_settings(tmp_path, oauth_server, **cc), cache, no_wait)
    providers = [first]
    try:
        token, word = await first.get(Identity("alice"))
        assert word == "miss" and oauth_server.requests["client_credentials"] == 1
        # The same source (timeout_seconds changed, say): the token is kept.
        again = build_provider(oauth_settings(tmp_path, oauth_server, **cc), cache, no_wait, first)
        providers.append(again)
        first.retire()
        assert await again.get(Identity("alice")) == (token, "hit")
        # Other scopes: a token for those is another token.
        wider = build_provider(
            oauth_settings(tmp_path, oauth_server, **{**cc, "scopes": ["read", "write"]}), cache, no_wait, again
        )
        providers.append(wider)
        other, word = await wider.get(Identity("alice"))
        assert word == "miss" and not other == token
        # Another type replacing it keeps nothing, and api_key has nothing to keep.
        key = build_provider(api_key_settings(), cache, no_wait, wider)
        assert key.kind == "api_key"
    finally:
        for provider in providers:
            await provider.close()
        cache.close()
        await cache.backend.close()


async def test_an_unreadable_client_secret_file_is_a_build_error_naming_the_setting(
    tmp_path: Path, keys_file: Path, oauth_server: OAuthServer
) -> None:
    secret_file = tmp_path / "app-secret"
    secret_file.write_text("app-secret-value\n")
    up = oauth_settings(
        tmp_path, oauth_server, type="oauth2_refresh_token", client_id="app", client_secret_file=str(secret_file)
    )
    cache = await open_cache(keys_file)
    try:
        await build_provider(up, cache, no_wait).close()
        secret_file.write_bytes(b"\xff\xfe\x00 not text")  # a file, but no secret to be read from it
        with pytest.raises(CredentialBuildError) as failed:
            build_provider(up, cache, no_wait)
        assert str(failed.value) == "upstreams.api.credential.client_secret_file: cannot be read"
        secret_file.unlink()
        with pytest.raises(CredentialBuildError):
            build_provider(up, cache, no_wait)
    finally:
        cache.close()
        await cache.backend.close()
