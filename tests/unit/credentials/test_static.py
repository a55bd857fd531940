"""api_key (sidecar/credentials/static.py) as the data plane uses it, over a real secret cache and file store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from sidecar.config import CacheSettings, InjectSettings, UpstreamSettings
from sidecar.credentials.factory import build_provider
from sidecar.credentials.static import StaticKey
from sidecar.errors import NoCredential
from sidecar.identity.base import Identity
from sidecar.secrets.base import Secret
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.file import FileBackend
from tests.support.leaks import make_secret


def settings(template: str = "api/{upstream}/{client_id}", secret_field: str | None = None) -> UpstreamSettings:
    return UpstreamSettings(
        name="polygon", url="https://api.example", scheme="https", host="api.example", port=443,
        base_path="", secret=template, inject=InjectSettings("query", "apiKey"), secret_field=secret_field,
    )


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"api/polygon/alice": "placeholder"}), encoding="utf-8")
    return path


async def open_cache(keys_file: Path) -> SecretCache:
    backend = FileBackend(keys_file)
    await backend.start()
    cache = SecretCache(backend, CacheSettings())
    backend.on_change = cache.clear
    return cache


@pytest.fixture
async def cache(keys_file: Path) -> AsyncIterator[SecretCache]:
    cache = await open_cache(keys_file)
    yield cache
    cache.close()
    await cache.backend.close()


async def rewrite(keys_file: Path, cache: SecretCache, keys: dict[str, object]) -> None:
    """Replace the file (a new inode, so seen as changed however fast) and let the store reread it."""
    fresh = keys_file.with_suffix(".new")
    fresh.write_text(yaml.safe_dump(keys), encoding="utf-8")
    fresh.replace(keys_file)
    backend = cache.backend
    assert isinstance(backend, FileBackend)
    assert await backend.reload_if_changed()


async def test_api_key_is_read_under_the_secret_id_template(keys_file: Path, cache: SecretCache) -> None:
    key = make_secret("cred-alice")
    await rewrite(keys_file, cache, {"api/polygon/alice": key})
    waits: list[tuple[str, int]] = []
    provider = build_provider(settings(), cache, lambda client, delta: waits.append((client, delta)))
    assert provider.kind == "api_key"
    secret, word = await provider.get(Identity("alice"))
    assert (secret.reveal(), word) == (key, "miss")
    assert waits == [("alice", 1), ("alice", -1)]  # the upstream may connect while the store is asked
    secret, word = await provider.get(Identity("alice"))
    assert (secret.reveal(), word) == (key, "hit")
    assert waits == [("alice", 1), ("alice", -1)]  # a warm lookup waits for nothing


async def test_api_key_takes_the_field_of_a_json_secret(keys_file: Path, cache: SecretCache) -> None:
    key = make_secret("cred-field")
    await rewrite(keys_file, cache, {"k/alice": {"api_key": key, "other": "x"}})
    provider = StaticKey(settings("k/{client_id}", "api_key"), cache)
    secret, _ = await provider.get(Identity("alice"))
    assert secret.reveal() == key


async def test_no_key_is_no_credential_with_the_cache_word(cache: SecretCache) -> None:
    provider = StaticKey(settings(), cache)
    with pytest.raises(NoCredential) as refused:
        await provider.get(Identity("mallory"))
    assert refused.value.lookup == "miss"
    with pytest.raises(NoCredential) as again:
        await provider.prefetch("mallory")
    assert again.value.lookup == "negative"


@pytest.mark.parametrize("status", [401, 403])
async def test_a_key_refused_with_401_or_403_gives_the_rotated_one_or_none(
    keys_file: Path, cache: SecretCache, status: int
) -> None:
    # APIs answer either to a revoked key: both look for a rotation in the store.
    old, new = make_secret("cred-old"), make_secret("cred-new")
    await rewrite(keys_file, cache, {"api/polygon/alice": old})
    provider = StaticKey(settings(), cache)
    secret, _ = await provider.get(Identity("alice"))
    assert await provider.rejected(Identity("alice"), secret, status) is None  # the store still holds it
    await rewrite(keys_file, cache, {"api/polygon/alice": new})
    fresh = await provider.rejected(Identity("alice"), Secret(old), status)
    assert fresh is not None and fresh.reveal() == new


async def test_prefetch_warms_the_cache(keys_file: Path, cache: SecretCache) -> None:
    await rewrite(keys_file, cache, {"api/polygon/alice": make_secret("cred-pre")})
    provider = StaticKey(settings(), cache)
    await provider.prefetch("alice")
    _, word = await provider.get(Identity("alice"))
    assert word == "hit"
