"""The secret stores: a local YAML/JSON file, AWS Secrets Manager (moto's server mode), Vault (a real OpenBao).

The first section holds what every store does alike, run against each; then each
store's own behaviour. Vault's own tests are in tests/unit/secrets/test_vault.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

import sidecar.secrets.file as file_module
from sidecar.config import (
    BACKENDS,
    AwsBackendSettings,
    CacheSettings,
    FileBackendSettings,
    SecretsSettings,
    VaultAuthSettings,
    VaultBackendSettings,
)
from sidecar.errors import NoCredential, SecretStoreUnavailable
from sidecar.metrics import REGISTRY
from sidecar.secrets.aws import MAX_ATTEMPTS, AwsBackend
from sidecar.secrets.base import (
    EmptyStore,
    SecretBackend,
    SecretNotFound,
    SecretPendingDeletion,
    StoreError,
    WritesUnsupported,
    extract,
)
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.factory import BUILDERS, BackendStartError, build_backend, start_backend
from sidecar.secrets.file import FileBackend, FileLoadError, load_secret_file
from sidecar.secrets.vault import VaultBackend
from tests.support.leaks import make_secret
from tests.support.openbao import OpenBao
from tests.support.upstream import closed_port

#: Vault's token auth from VAULT_TOKEN, which these tests hand the backend (the default method is kubernetes).
TOKEN_AUTH = VaultAuthSettings(method="token", mount="token")

# ====================================================================== every store alike


class Store:
    """One started backend, and how its users put a secret in it.

    ``put_text``: the simplest secret each store holds: a string (file), a SecretString
    (AWS), an entry of one field (Vault, which has no plain strings). ``put_fields``: an
    object: a mapping (file), a JSON SecretString (AWS), an entry's fields (Vault).
    """

    def __init__(self, kind: str, backend: SecretBackend, tmp_path: Path, client: Any = None) -> None:
        self.kind = kind
        self.backend = backend
        self.client = client
        self.prefix = f"mcp/contract-{uuid.uuid4().hex[:10]}"
        self._file = tmp_path / "keys.yaml"
        self._file_data: dict[str, Any] = {}

    def id(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    async def put_text(self, secret_id: str, value: str) -> None:
        await self._put(secret_id, value)

    async def put_fields(self, secret_id: str, fields: dict[str, str]) -> None:
        await self._put(secret_id, fields)

    async def _put(self, secret_id: str, value: str | dict[str, str]) -> None:
        if self.kind == "file":
            self._file_data[secret_id] = value
            rewrite(self._file, json.dumps(self._file_data))
            assert isinstance(self.backend, FileBackend)
            await self.backend.reload_if_changed()
        elif self.kind == "aws":
            text = value if isinstance(value, str) else json.dumps(value)
            try:
                self.client.create_secret(Name=secret_id, SecretString=text)
            except self.client.exceptions.ResourceExistsException:
                self.client.put_secret_value(SecretId=secret_id, SecretString=text)
        else:
            fields = {"api_key": value} if isinstance(value, str) else value
            self.client.put(secret_id, **fields)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    kind = request.param
    if kind == "file":
        path = tmp_path / "keys.yaml"
        path.write_text("{}\n")
        backend: Any = FileBackend(path)
        out = Store(kind, backend, tmp_path)
    elif kind == "aws":
        endpoint = request.getfixturevalue("moto_endpoint")
        request.getfixturevalue("aws_env")
        backend = AwsBackend(AwsBackendSettings(region="us-east-1", endpoint_url=endpoint))
        client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=endpoint)
        request.addfinalizer(client.close)
        out = Store(kind, backend, tmp_path, client)
    else:
        bao: OpenBao = request.getfixturevalue("openbao")
        backend = VaultBackend(VaultBackendSettings(address=bao.address, auth=TOKEN_AUTH), env={"VAULT_TOKEN": bao.token()})
        out = Store(kind, backend, tmp_path, bao)
    await backend.start()
    yield out
    await backend.close()


async def test_every_store_gives_its_simplest_secret_as_the_key(store: Store) -> None:
    key = make_secret(f"{store.kind}-simple")
    await store.put_text(store.id("alice"), key)
    secret, result = await SecretCache(store.backend, CacheSettings()).get(store.id("alice"))
    assert (secret.reveal(), result) == (key, "miss")


async def test_every_store_gives_an_objects_field_with_secret_field(store: Store) -> None:
    key = make_secret(f"{store.kind}-field")
    await store.put_fields(store.id("carol"), {"api_key": key, "region": "eu-west-1"})
    cache = SecretCache(store.backend, CacheSettings())
    assert (await cache.get(store.id("carol"), "api_key"))[0].reveal() == key
    with pytest.raises(NoCredential) as info:
        await cache.get(store.id("carol"), "missing")
    assert info.value.reason == "secret_field_missing"


async def test_every_store_says_no_secret_once_and_remembers_it(store: Store) -> None:
    cache = SecretCache(store.backend, CacheSettings())
    with pytest.raises(SecretNotFound):
        await store.backend.fetch(store.id("nobody"))
    for lookup in ("miss", "negative"):
        with pytest.raises(NoCredential) as info:
            await cache.get(store.id("nobody"))
        assert (info.value.reason, info.value.lookup) == ("not_found", lookup)
    assert cache.store_calls == 1


async def test_every_store_reads_ids_exactly(store: Store) -> None:
    key = make_secret(f"{store.kind}-exact")
    await store.put_text(store.id("alice"), key)
    assert (await SecretCache(store.backend, CacheSettings()).get(store.id("alice")))[0].reveal() == key
    for other in ("Alice", "alice ", "alice.", "alic", "alice-AbCdEf", "alice/"):
        with pytest.raises(SecretNotFound):
            await store.backend.fetch(store.id(other))


async def test_every_store_gives_a_rotated_value_on_the_next_read(store: Store) -> None:
    old, new = make_secret(f"{store.kind}-old"), make_secret(f"{store.kind}-new")
    await store.put_text(store.id("dave"), old)
    cache = SecretCache(store.backend, CacheSettings())
    assert (await cache.get(store.id("dave")))[0].reveal() == old
    await store.put_text(store.id("dave"), new)
    cache.invalidate(store.id("dave"))  # what an upstream's 401 does
    assert (await cache.get(store.id("dave")))[0].reveal() == new


async def test_every_store_labels_its_fetches_with_its_name(store: Store) -> None:
    def fetches() -> float:
        labels = {"backend": store.kind}
        return REGISTRY.get_sample_value("sidecar_secret_fetch_duration_seconds_count", labels) or 0.0

    before = fetches()
    await store.put_text(store.id("erin"), make_secret(f"{store.kind}-metric"))
    await SecretCache(store.backend, CacheSettings()).get(store.id("erin"))
    assert fetches() == before + 1


async def test_a_store_without_writes_refuses_them_clearly() -> None:
    """Every configurable store writes (tests/unit/secrets/test_writes.py); the empty one, with no file, does not."""
    with pytest.raises(WritesUnsupported) as info:
        await EmptyStore().write("alice", {"refresh_token": "x"}, None)
    assert str(info.value) == "secret store error: unsupported (the file backend does not write secrets)"


@pytest.mark.parametrize("kind", ["aws", "vault"])
async def test_every_remote_store_down_is_a_quick_store_error_then_unavailable(
    kind: str, request: pytest.FixtureRequest
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    backend: Any
    if kind == "aws":
        request.getfixturevalue("aws_env")
        backend = AwsBackend(AwsBackendSettings(region="us-east-1", endpoint_url=dead, timeout_seconds=1), 3.0)
    else:
        backend = VaultBackend(VaultBackendSettings(address=dead, auth=TOKEN_AUTH), 3.0, env={"VAULT_TOKEN": "unused"})
    await backend.start()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            await backend.fetch("mcp/polygon/alice")
        assert info.value.kind in ("unreachable", "timeout")
        assert "127.0.0.1" not in str(info.value)  # our words, not the client library's
        with pytest.raises(SecretStoreUnavailable):
            await SecretCache(backend, CacheSettings(), lookup_timeout=3.0).get("mcp/polygon/alice")
        assert time.monotonic() - started < 3.0 + 3.0 + 2.0  # two lookups, each bounded, + slack
    finally:
        await backend.close()


# ====================================================================== file backend


def rewrite(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime forward, so a change is seen even within one clock tick."""
    before = path.stat().st_mtime_ns if path.exists() else time.time_ns()
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.fixture
async def started() -> AsyncIterator[list[FileBackend]]:
    """Backends a test starts; all are closed afterwards."""
    backends: list[FileBackend] = []
    yield backends
    for backend in backends:
        await backend.close()


async def start_file_backend(path: Path, started: list[FileBackend], **kwargs: Any) -> FileBackend:
    backend = FileBackend(path, **kwargs)
    started.append(backend)
    await backend.start()
    return backend


async def test_yaml_file_simple_mapping(tmp_path: Path, started: list[FileBackend]) -> None:
    alice, bob = make_secret("file-alice"), make_secret("file-bob")
    path = tmp_path / "keys.yaml"
    path.write_text(f"# client_id: key, as MCP servers keep them today\nalice: {alice}\n'bob@example.com': \"{bob}\"\n")
    backend = await start_file_backend(path, started)
    assert await backend.fetch("alice") == alice
    assert await backend.fetch("bob@example.com") == bob
    with pytest.raises(SecretNotFound):
        await backend.fetch("carol")
    with pytest.raises(SecretNotFound):
        await backend.fetch("Alice")  # ids are exact


async def test_yaml_file_with_templated_ids_and_nested_mappings(tmp_path: Path, started: list[FileBackend]) -> None:
    key, other = make_secret("file-nested"), make_secret("file-nested-other")
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"mcp/polygon/alice: {key}\n"
        f"mcp/internal/alice:\n  api_key: {other}\n  region: eu-west-1\n  port: 8443\n"
    )
    backend = await start_file_backend(path, started)
    assert await backend.fetch("mcp/polygon/alice") == key
    nested = await backend.fetch("mcp/internal/alice")
    assert nested == {"api_key": other, "region": "eu-west-1", "port": "8443"}
    assert extract(nested, "api_key").reveal() == other
    assert extract(nested, "port").reveal() == "8443"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("null: {secret}\n", "null"),
        ("~: {secret}\n", "null"),
        ("? \n: {secret}\n", "null"),
        ("!!int 0123: {secret}\n", "int"),
        ("!!bool yes: {secret}\n", "bool"),
        ("!!float 1: {secret}\n", "float"),
        ("!!timestamp 2024-01-01: {secret}\n", "date"),
        ("!!binary aGk=: {secret}\n", "bytes"),
        ("mcp/crm/alice:\n  null: {secret}\n", "null"),
    ],
)
def test_file_keys_that_yaml_does_not_read_as_text_are_refused(text: str, kind: str, tmp_path: Path) -> None:
    """``null:`` would answer to the id "None", ``!!int 0123:`` to "83": lookups are by exact text."""
    key = make_secret("file-key-type")
    path = tmp_path / "keys.yaml"
    path.write_text(text.format(secret=key))
    with pytest.raises(FileLoadError) as info:
        load_secret_file(path)
    assert f"read by YAML as {kind}" in str(info.value) and "quotes" in str(info.value)
    leaked = key in str(info.value) or key in repr(info.value)
    assert not leaked


async def test_file_lookups_are_exact(tmp_path: Path, started: list[FileBackend]) -> None:
    """No case folding, trimming or type conversion between the id asked and the key written."""
    key, quoted = make_secret("file-exact"), make_secret("file-quoted-null")
    path = tmp_path / "keys.yaml"
    path.write_text(f"mcp/polygon/alice: {key}\n'null': {quoted}\n'0123': {quoted}\n")
    backend = await start_file_backend(path, started)
    assert await backend.fetch("mcp/polygon/alice") == key
    assert await backend.fetch("null") == quoted and await backend.fetch("0123") == quoted
    for other in ("mcp/polygon/Alice", "MCP/polygon/alice", "mcp/polygon/alice ", " mcp/polygon/alice",
                  "mcp/polygon/alice.", "mcp/polygon/alice-AbCdEf", "mcp/polygon/ali", "None", "83", "123"):
        with pytest.raises(SecretNotFound):
            await backend.fetch(other)


async def test_json_file(tmp_path: Path, started: list[FileBackend]) -> None:
    alice, obj = make_secret("file-json-a"), make_secret("file-json-obj")
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"alice": alice, "svc": {"apiKey": obj, "n": 1}, "num": 42}))
    backend = await start_file_backend(path, started)
    assert await backend.fetch("alice") == alice
    # Keys are text: a number in a nested object comes back spelled as written.
    assert await backend.fetch("svc") == {"apiKey": obj, "n": "1"}
    assert await backend.fetch("num") == "42"


@pytest.mark.parametrize(("text", "expected"), [("12345", "12345"), ("1.5", "1.5"), ("-7", "-7")])
def test_numbers_become_strings(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {text}\n")
    assert load_secret_file(path) == {"alice": expected}


@pytest.mark.parametrize(
    "text", ["0123", "0x1F", "1_000", "12.50", "1234567890123456789012.0", "2024-01-01", "2001-12-14t21:59:43.10-05:00"]
)
def test_numeric_looking_keys_keep_their_spelling(text: str, tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {text}\n")
    assert load_secret_file(path) == {"alice": text}


def test_empty_file_holds_no_secrets(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("# nothing yet\n")
    assert load_secret_file(path) == {}


@pytest.mark.parametrize(
    "template",
    [
        "alice: {secret}\n  bob: : [unclosed {secret}\n",  # invalid YAML around a key
        '{{"alice": "{secret}", "bob": ',  # truncated JSON
        "- {secret}\n- other\n",  # a list, not a mapping
        "{secret}\n",  # a bare scalar
        "alice: [{secret}]\n",  # a value that is a list
        "alice: {secret}\nbob:\n",  # an empty value
    ],
)
async def test_invalid_file_at_start_names_no_value(
    template: str, tmp_path: Path, started: list[FileBackend], caplog: pytest.LogCaptureFixture
) -> None:
    secret = make_secret("file-invalid")
    path = tmp_path / "keys.yaml"
    path.write_text(template.format(secret=secret))
    with pytest.raises(FileLoadError) as info:
        await start_file_backend(path, started)
    assert str(path) in str(info.value)
    assert secret not in str(info.value)
    assert secret not in repr(info.value)
    # The parser's exception (which quotes lines of the file) is not chained on.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert secret not in caplog.text


async def test_missing_file_at_start(tmp_path: Path, started: list[FileBackend]) -> None:
    with pytest.raises(FileLoadError, match="cannot read"):
        await start_file_backend(tmp_path / "absent.yaml", started)


async def test_reload_on_change_calls_on_change(tmp_path: Path, started: list[FileBackend]) -> None:
    old, new = make_secret("file-old"), make_secret("file-new")
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {old}\n")
    changes: list[int] = []
    backend = await start_file_backend(path, started, on_change=lambda: changes.append(1))
    assert await backend.reload_if_changed() is False  # nothing changed yet
    assert changes == []
    rewrite(path, f"alice: {new}\nbob: {old}\n")
    assert await backend.reload_if_changed() is True
    assert changes == [1]
    assert await backend.fetch("alice") == new
    assert await backend.fetch("bob") == old
    assert await backend.reload_if_changed() is False
    assert changes == [1]


async def test_removed_entry_disappears_on_reload(tmp_path: Path, started: list[FileBackend]) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {make_secret('file-rm-a')}\nbob: {make_secret('file-rm-b')}\n")
    backend = await start_file_backend(path, started)
    rewrite(path, f"alice: {make_secret('file-rm-a2')}\n")
    assert await backend.reload_if_changed() is True
    with pytest.raises(SecretNotFound):
        await backend.fetch("bob")


async def test_broken_edit_keeps_the_old_data(
    tmp_path: Path, started: list[FileBackend], caplog: pytest.LogCaptureFixture
) -> None:
    old, typo, fixed = make_secret("file-keep"), make_secret("file-typo"), make_secret("file-fixed")
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {old}\n")
    changes: list[int] = []
    backend = await start_file_backend(path, started, on_change=lambda: changes.append(1))
    rewrite(path, f"alice: {typo}\n  bob: : [\n")
    with caplog.at_level(logging.ERROR, logger="sidecar.secrets.file"):
        assert await backend.reload_if_changed() is False
    assert await backend.fetch("alice") == old
    assert changes == []
    assert "not reloaded" in caplog.text
    assert typo not in caplog.text
    # The next good edit is picked up.
    rewrite(path, f"alice: {fixed}\n")
    assert await backend.reload_if_changed() is True
    assert await backend.fetch("alice") == fixed
    assert changes == [1]


async def test_deleted_file_keeps_the_old_data(tmp_path: Path, started: list[FileBackend]) -> None:
    key = make_secret("file-deleted")
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {key}\n")
    backend = await start_file_backend(path, started)
    path.unlink()
    assert await backend.reload_if_changed() is False
    assert await backend.fetch("alice") == key


async def test_atomic_replace_is_seen(tmp_path: Path, started: list[FileBackend]) -> None:
    # Kubernetes swaps a mounted Secret by renaming; the inode changes, size and mtime may not.
    a, b = make_secret("file-swap-a"), make_secret("file-swap-b")
    assert len(a) == len(b)
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {a}\n")
    stat = path.stat()
    backend = await start_file_backend(path, started)
    staged = tmp_path / "keys.yaml.new"
    staged.write_text(f"alice: {b}\n")
    os.utime(staged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(staged, path)
    assert await backend.reload_if_changed() is True
    assert await backend.fetch("alice") == b


async def test_watcher_rereads_the_file_by_itself(
    tmp_path: Path, started: list[FileBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module, "POLL_SECONDS", 0.01)
    old, new = make_secret("file-watch-old"), make_secret("file-watch-new")
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {old}\n")
    changed = asyncio.Event()
    backend = await start_file_backend(path, started, on_change=changed.set)
    rewrite(path, f"alice: {new}\n")
    await asyncio.wait_for(changed.wait(), timeout=5)
    assert await backend.fetch("alice") == new
    await backend.close()
    await backend.close()  # closing twice is harmless


# ====================================================================== AWS Secrets Manager (moto)


@pytest.fixture
def sm(moto_endpoint: str, aws_env: dict[str, str]) -> Iterator[Any]:
    client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_endpoint)
    yield client
    client.close()


@pytest.fixture
def name() -> str:
    return f"mcp/polygon/unit-{uuid.uuid4().hex[:12]}"


async def aws_backend(endpoint: str, lookup_timeout: float = 5.0, **settings: Any) -> AwsBackend:
    backend = AwsBackend(AwsBackendSettings(region="us-east-1", endpoint_url=endpoint, **settings), lookup_timeout)
    await backend.start()
    return backend


@pytest.fixture
async def aws(moto_endpoint: str, aws_env: dict[str, str]) -> AsyncIterator[AwsBackend]:
    backend = await aws_backend(moto_endpoint)
    yield backend
    await backend.close()


async def test_aws_plain_secret_string(aws: AwsBackend, sm: Any, name: str) -> None:
    key = make_secret("aws-plain")
    sm.create_secret(Name=name, SecretString=key)
    assert await aws.fetch(name) == key


async def test_aws_json_secret_string(aws: AwsBackend, sm: Any, name: str) -> None:
    key = make_secret("aws-json")
    sm.create_secret(Name=name, SecretString=json.dumps({"apiKey": key, "plan": "pro"}))
    raw = await aws.fetch(name)
    assert isinstance(raw, str)
    assert extract(raw, "apiKey").reveal() == key
    # And the same through the cache, as the proxy uses it.
    cache = SecretCache(aws, CacheSettings())
    secret, result = await cache.get(name, "apiKey")
    assert (secret.reveal(), result) == (key, "miss")


async def test_aws_secret_binary(aws: AwsBackend, sm: Any, name: str) -> None:
    key = make_secret("aws-binary")
    sm.create_secret(Name=name, SecretBinary=key.encode())
    assert await aws.fetch(name) == key


async def test_aws_secret_binary_that_is_not_utf8(aws: AwsBackend, sm: Any, name: str) -> None:
    key = make_secret("aws-not-utf8")  # the output leak check looks for it too
    sm.create_secret(Name=name, SecretBinary=b"\xff" + key.encode())
    with pytest.raises(StoreError) as info:
        await aws.fetch(name)
    assert info.value.kind == "invalid"
    # Through the cache, as the proxy meets it: the refusal's chain holds none of the
    # decode error that carried the stored bytes.
    with pytest.raises(SecretStoreUnavailable) as refused:
        await SecretCache(aws, CacheSettings()).get(name)
    chain: list[BaseException] = []
    exc: BaseException | None = refused.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert not [e for e in chain if isinstance(e, UnicodeDecodeError)]
    assert [type(e) for e in chain] == [SecretStoreUnavailable, StoreError]
    leaked = any(key in repr(e) or key in str(e) or key in repr(e.args) for e in chain)
    assert not leaked


async def test_aws_not_found(aws: AwsBackend, name: str) -> None:
    with pytest.raises(SecretNotFound):
        await aws.fetch(name + "-absent")


async def test_aws_version_stage(moto_endpoint: str, aws_env: dict[str, str], sm: Any, name: str) -> None:
    v1, v2 = make_secret("aws-v1"), make_secret("aws-v2")
    sm.create_secret(Name=name, SecretString=v1)
    sm.put_secret_value(SecretId=name, SecretString=v2)
    current = await aws_backend(moto_endpoint)
    previous = await aws_backend(moto_endpoint, version_stage="AWSPREVIOUS")
    missing_stage = await aws_backend(moto_endpoint, version_stage="NO_SUCH_STAGE")
    try:
        assert await current.fetch(name) == v2
        assert await previous.fetch(name) == v1
        with pytest.raises(SecretNotFound):
            await missing_stage.fetch(name)
    finally:
        for backend in (current, previous, missing_stage):
            await backend.close()


async def test_aws_partial_arn_is_accepted_and_a_complete_one_refused(aws: AwsBackend, sm: Any, name: str) -> None:
    key = make_secret("aws-arn")
    arn = sm.create_secret(Name=name, SecretString=key)["ARN"]
    assert await aws.fetch(arn[: -len("-AbCdEf")]) == key
    # moto, like AWS, reads the suffix as a complete ARN; the sidecar cannot tell whether
    # the template or a client ID wrote it, so it never takes that reading.
    with pytest.raises(SecretNotFound):
        await aws.fetch(arn)


async def test_aws_backend_not_started(name: str) -> None:
    backend = AwsBackend(AwsBackendSettings(region="us-east-1"))
    try:
        with pytest.raises(StoreError) as info:
            await backend.fetch(name)
        assert info.value.kind == "unavailable"
    finally:
        await backend.close()


async def test_aws_without_a_region_fails_at_start(
    monkeypatch: pytest.MonkeyPatch, aws_env: dict[str, str], tmp_path: Path
) -> None:
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    backend = AwsBackend(AwsBackendSettings(region=None))
    try:
        with pytest.raises(StoreError) as info:
            await backend.start()
        assert info.value.kind == "config"
        assert "region" in str(info.value)
    finally:
        await backend.close()


async def test_aws_endpoint_down_is_a_quick_store_error(aws_env: dict[str, str], name: str) -> None:
    backend = await aws_backend(f"http://127.0.0.1:{closed_port()}", timeout_seconds=1)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            await backend.fetch(name)
        elapsed = time.monotonic() - started
    finally:
        await backend.close()
    assert info.value.kind in ("unreachable", "timeout")
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert "127.0.0.1" not in str(info.value)  # our words, not botocore's


async def test_aws_unresponsive_endpoint_times_out(aws_env: dict[str, str], name: str) -> None:
    # A listener that accepts and never answers: the read timeout must end the call.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        backend = await aws_backend(f"http://127.0.0.1:{port}", timeout_seconds=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await backend.fetch(name)
            elapsed = time.monotonic() - started
        finally:
            await backend.close()
    assert info.value.kind == "timeout"
    assert elapsed < 10, f"took {elapsed:.1f}s"


async def test_aws_retries_against_a_silent_store_end_within_the_lookup_timeout(aws_env: dict[str, str], name: str) -> None:
    """Every attempt times out (0.9 s); no retry starts after lookup_timeout (1 s), so the
    call ends by then plus at most the attempt under way: 1.9 s, where botocore's own
    retries made four attempts, 3.6 s and their backoff."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        backend = await aws_backend(f"http://127.0.0.1:{server.getsockname()[1]}", lookup_timeout=1.0,
                                    timeout_seconds=0.9)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await backend.fetch(name)
            elapsed = time.monotonic() - started
        finally:
            await backend.close()
    assert info.value.kind == "timeout"
    assert elapsed < 1.0 + 0.9 + 0.8, f"took {elapsed:.1f}s"  # + slack for a busy machine


async def test_aws_timeout_seconds_defaults_to_the_lookup_timeout() -> None:
    assert AwsBackend(AwsBackendSettings(), lookup_timeout=3).attempt_timeout == 3
    assert AwsBackend(AwsBackendSettings(timeout_seconds=1), lookup_timeout=3).attempt_timeout == 1
    assert AwsBackend(AwsBackendSettings(timeout_seconds=9), lookup_timeout=3).attempt_timeout == 3  # never longer


async def test_aws_secret_pending_deletion_then_restored(aws: AwsBackend, sm: Any, name: str) -> None:
    key = make_secret("aws-doomed")
    sm.create_secret(Name=name, SecretString=key)
    sm.delete_secret(SecretId=name, RecoveryWindowInDays=7)
    with pytest.raises(SecretPendingDeletion) as info:
        await aws.fetch(name)
    assert info.value.reason == "pending_deletion"
    assert not info.value.negative_cacheable
    sm.restore_secret(SecretId=name)
    assert await aws.fetch(name) == key


# ---------------------------------------------------------------------- stub client
#
# moto answers honestly (its answers always name the secret they hold), and never
# reads a bare name as a partial ARN. What a store that answers with another secret
# looks like is tested with a stub client standing in for botocore's; through the
# real CLI, tests/adversarial/test_store_aliasing.py does the same against moto and
# a hostile fake Secrets Manager.

ACCOUNT = "123456789012"
PARTIAL = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:"


def answer(name: str, value: str, **changes: Any) -> dict[str, Any]:
    """What GetSecretValue returns for the secret ``name``; ``changes`` replace keys (None drops one)."""
    out: dict[str, Any] = {
        "ARN": f"{PARTIAL}{name}-AbCdEf", "Name": name, "VersionId": "v1", "SecretString": value,
        "VersionStages": ["AWSCURRENT"],
    }
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


class StubClient:
    def __init__(self, answer: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        self.answer = answer or {}
        self.error = error
        self.requests: list[dict[str, Any]] = []
        self.closed = False

    def get_secret_value(self, **kwargs: Any) -> dict[str, Any]:
        self.requests.append(kwargs)
        if self.error is not None:
            raise self.error
        return self.answer

    def close(self) -> None:
        self.closed = True


@pytest.fixture
async def stubbed() -> AsyncIterator[tuple[AwsBackend, StubClient]]:
    backend = AwsBackend(AwsBackendSettings(region="us-east-1"))
    backend.backoff_seconds = 0.0  # retries at once: the tests count them, not their pauses
    stub = StubClient()
    backend._client = stub  # type: ignore[assignment]
    yield backend, stub
    await backend.close()
    assert stub.closed


async def test_aws_name_resolving_to_another_secret_is_refused(stubbed: tuple[AwsBackend, StubClient]) -> None:
    backend, stub = stubbed
    key = make_secret("aws-partial")
    stub.answer = answer("mcp/polygon/alice", key)
    # A client ID "alice-abcdef" would build this name; AWS could match it to alice's secret.
    with pytest.raises(SecretNotFound):
        await backend.fetch("mcp/polygon/alice-abcdef")
    assert await backend.fetch("mcp/polygon/alice") == key
    assert stub.requests[-1] == {"SecretId": "mcp/polygon/alice", "VersionStage": "AWSCURRENT"}


ALICE = "mcp/polygon/alice"

# (case, id asked, the answer's changes from alice's honest one, the mismatch logged)
ALIASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("arn-with-alices-suffix", f"{PARTIAL}{ALICE}-AbCdEf", {}, "suffix"),
    ("arn-naming-another-secret", f"{PARTIAL}mcp/polygon/mallory", {}, "name"),
    ("arn-case", f"{PARTIAL}mcp/polygon/Alice", {}, "name"),
    ("arn-trailing-dot", f"{PARTIAL}{ALICE}.", {}, "name"),
    ("arn-no-name", f"{PARTIAL}{ALICE}", {"Name": None}, "unnamed"),
    ("arn-no-arn", f"{PARTIAL}{ALICE}", {"ARN": None}, "unnamed"),
    ("arn-empty-name", f"{PARTIAL}{ALICE}", {"Name": ""}, "unnamed"),
    ("arn-name-not-text", f"{PARTIAL}{ALICE}", {"Name": ["mcp/polygon/alice"]}, "unnamed"),
    ("arn-other-account", f"{PARTIAL}{ALICE}", {"ARN": f"arn:aws:secretsmanager:us-east-1:210987654321:secret:{ALICE}-AbCdEf"}, "arn"),
    ("arn-other-region", f"{PARTIAL}{ALICE}", {"ARN": f"arn:aws:secretsmanager:eu-west-1:{ACCOUNT}:secret:{ALICE}-AbCdEf"}, "arn"),
    ("arn-other-partition", f"{PARTIAL}{ALICE}", {"ARN": f"arn:aws-cn:secretsmanager:us-east-1:{ACCOUNT}:secret:{ALICE}-AbCdEf"}, "arn"),
    ("arn-answer-arn-of-another-name", f"{PARTIAL}{ALICE}", {"ARN": f"{PARTIAL}mcp/polygon/bob-AbCdEf"}, "arn"),
    ("arn-answer-arn-without-suffix", f"{PARTIAL}{ALICE}", {"ARN": f"{PARTIAL}{ALICE}"}, "arn"),
    ("arn-answer-arn-longer-suffix", f"{PARTIAL}{ALICE}", {"ARN": f"{PARTIAL}{ALICE}-AbCdEfG"}, "arn"),
    ("arn-answer-not-an-arn", f"{PARTIAL}{ALICE}", {"ARN": "mcp/polygon/alice"}, "arn"),
    ("asked-arn-of-another-service", f"arn:aws:ssm:us-east-1:{ACCOUNT}:parameter/{ALICE}", {}, "arn"),
    ("arn-stage", f"{PARTIAL}{ALICE}", {"VersionStages": ["AWSPREVIOUS"]}, "version_stage"),
    ("name-echoed-with-alices-arn", "mcp/polygon/mallory", {"Name": "mcp/polygon/mallory"}, "arn"),
    ("name-case", "mcp/polygon/Alice", {}, "name"),
    ("name-trailing-space", f"{ALICE} ", {}, "name"),
    ("name-no-name", "mcp/polygon/mallory", {"Name": None}, "unnamed"),
    ("name-no-arn", ALICE, {"ARN": None}, "unnamed"),
    ("name-other-region", ALICE, {"ARN": f"arn:aws:secretsmanager:eu-west-1:{ACCOUNT}:secret:{ALICE}-AbCdEf"}, "arn"),
    ("name-stage", ALICE, {"VersionStages": ["AWSPENDING"]}, "version_stage"),
    ("name-stages-not-a-list", ALICE, {"VersionStages": "AWSCURRENT-not"}, "version_stage"),
]


@pytest.mark.parametrize(("asked", "changes", "why"), [pytest.param(*c[1:], id=c[0]) for c in ALIASES])
async def test_aws_an_answer_that_is_not_the_secret_asked_for_is_no_secret(
    stubbed: tuple[AwsBackend, StubClient], caplog: pytest.LogCaptureFixture,
    asked: str, changes: dict[str, Any], why: str,
) -> None:
    backend, stub = stubbed
    key = make_secret("aws-alias")
    stub.answer = answer(ALICE, key, **changes)
    with caplog.at_level(logging.WARNING, logger="sidecar.secrets.aws"), pytest.raises(SecretNotFound) as info:
        await backend.fetch(asked)
    said = [
        (r.levelname, getattr(r, "mismatch", None), getattr(r, "secret_id", None))
        for r in caplog.records if r.name == "sidecar.secrets.aws"
    ]
    assert said == [("WARNING", why, asked)]
    leaked = key in caplog.text or key in repr(info.value) or key in str(info.value)
    assert not leaked


@pytest.mark.parametrize(
    ("asked", "changes"),
    [
        pytest.param(ALICE, {}, id="name"),
        pytest.param(f"{PARTIAL}{ALICE}", {}, id="partial-arn"),
        pytest.param(ALICE, {"VersionStages": None}, id="no-stages-listed"),
        pytest.param(ALICE, {"VersionStages": ["AWSPREVIOUS", "AWSCURRENT"]}, id="several-stages"),
        pytest.param(ALICE, {"ARN": f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:{ALICE}-a1B2c3"}, id="suffix"),
    ],
)
async def test_aws_the_secret_asked_for_is_accepted(
    stubbed: tuple[AwsBackend, StubClient], asked: str, changes: dict[str, Any]
) -> None:
    """The control for the refusals above: alice's own honest answer passes."""
    backend, stub = stubbed
    key = make_secret("aws-own")
    stub.answer = answer(ALICE, key, **changes)
    assert await backend.fetch(asked) == key


async def test_aws_the_region_named_ids_resolve_in_is_the_clients(aws_env: dict[str, str]) -> None:
    """With no region in the settings, the one the client was made with is checked."""
    backend = AwsBackend(AwsBackendSettings(region=None))
    await backend.start()  # AWS_DEFAULT_REGION=us-east-1
    made, backend._client = backend._client, StubClient(answer(ALICE, make_secret("aws-region")))  # type: ignore[assignment]
    try:
        backend._client.answer["ARN"] = backend._client.answer["ARN"].replace("us-east-1", "us-west-2")  # type: ignore[union-attr]
        with pytest.raises(SecretNotFound):
            await backend.fetch(ALICE)
    finally:
        await backend.close()
        assert made is not None
        made.close()


async def test_aws_a_mismatch_is_negatively_cached_as_no_credential(stubbed: tuple[AwsBackend, StubClient]) -> None:
    backend, stub = stubbed
    stub.answer = answer(ALICE, make_secret("aws-cached-alias"))
    cache = SecretCache(backend, CacheSettings())
    asked = f"{PARTIAL}{ALICE}-AbCdEf"
    for lookup in ("miss", "negative"):
        with pytest.raises(NoCredential) as info:
            await cache.get(asked)
        assert (info.value.reason, info.value.lookup) == ("secret_mismatch", lookup)
    assert len(stub.requests) == 1
    # alice's own id is another cache entry, untouched by the refusal.
    secret, result = await cache.get(f"{PARTIAL}{ALICE}")
    assert result == "miss" and secret.reveal() == stub.answer["SecretString"]


async def test_aws_answer_without_a_value(stubbed: tuple[AwsBackend, StubClient]) -> None:
    backend, stub = stubbed
    stub.answer = answer("x", "", SecretString=None)
    with pytest.raises(StoreError) as info:
        await backend.fetch("x")
    assert info.value.kind == "invalid"


def client_error(code: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "GetSecretValue")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("AccessDeniedException", "access_denied"),
        ("ThrottlingException", "throttled"),
        ("TooManyRequestsException", "throttled"),
        ("ExpiredTokenException", "auth"),
        ("UnrecognizedClientException", "auth"),
        ("InvalidSignatureException", "auth"),
        ("InternalServiceError", "unavailable"),
        ("DecryptionFailure", "unavailable"),
        ("", "unavailable"),
    ],
)
async def test_aws_client_errors_map_to_store_errors(
    code: str, kind: str, stubbed: tuple[AwsBackend, StubClient]
) -> None:
    backend, stub = stubbed
    key = make_secret("aws-echoed")
    # Even if a service message echoed a value, our error must not carry it on.
    stub.error = client_error(code, f"request for {key} failed")
    with pytest.raises(StoreError) as info:
        await backend.fetch("mcp/polygon/alice")
    assert info.value.kind == kind
    assert key not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize("code", ["ResourceNotFoundException", "InvalidRequestException"])
async def test_aws_not_found_codes(code: str, stubbed: tuple[AwsBackend, StubClient]) -> None:
    backend, stub = stubbed
    stub.error = client_error(code, "no")
    with pytest.raises(SecretNotFound) as info:
        await backend.fetch("mcp/polygon/alice")
    assert info.value.negative_cacheable and info.value.reason == "not_found"
    assert len(stub.requests) == 1


@pytest.mark.parametrize(
    "message",
    [
        "You can't perform this operation on the secret because it was marked for deletion.",  # AWS
        "You tried to perform the operation on a secret that's currently marked deleted.",  # moto
    ],
)
async def test_aws_pending_deletion_is_its_own_refusal(message: str, stubbed: tuple[AwsBackend, StubClient]) -> None:
    backend, stub = stubbed
    stub.error = client_error("InvalidRequestException", message)
    with pytest.raises(SecretPendingDeletion) as info:
        await backend.fetch("mcp/polygon/alice")
    assert (info.value.reason, info.value.negative_cacheable) == ("pending_deletion", False)
    assert len(stub.requests) == 1


@pytest.mark.parametrize(
    ("error", "calls"),
    [
        (client_error("ThrottlingException", "slow down"), MAX_ATTEMPTS),
        (client_error("InternalServiceError", "try again"), MAX_ATTEMPTS),
        (ClientError({"Error": {"Code": "Whatever"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetSecretValue"),
         MAX_ATTEMPTS),
        (ReadTimeoutError(endpoint_url="https://secretsmanager.example"), MAX_ATTEMPTS),
        (EndpointConnectionError(endpoint_url="https://secretsmanager.example"), MAX_ATTEMPTS),
        (client_error("AccessDeniedException", "no"), 1),
        (client_error("DecryptionFailure", "kms"), 1),
        (NoCredentialsError(), 1),
    ],
)
async def test_aws_transient_failures_are_retried_up_to_max_attempts(
    error: Exception, calls: int, stubbed: tuple[AwsBackend, StubClient]
) -> None:
    backend, stub = stubbed
    stub.error = error
    with pytest.raises(StoreError):
        await backend.fetch("mcp/polygon/alice")
    assert len(stub.requests) == calls


async def test_aws_no_retry_starts_past_the_deadline(
    stubbed: tuple[AwsBackend, StubClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, stub = stubbed
    monkeypatch.setattr("sidecar.secrets.aws.random.random", lambda: 0.5)  # the jitter, fixed
    backend.backoff_seconds = 2 * backend.lookup_timeout + 2  # so the first pause ends past the deadline
    stub.error = client_error("ThrottlingException", "slow down")
    with pytest.raises(StoreError):
        await backend.fetch("mcp/polygon/alice")
    assert len(stub.requests) == 1
    # A call that waited in the pool's queue until the lookup was over is not made at all.
    stub.error = None
    with pytest.raises(StoreError) as info:
        backend._get("mcp/polygon/alice", time.monotonic() - 0.001)
    assert info.value.kind == "timeout"
    assert len(stub.requests) == 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConnectTimeoutError(endpoint_url="https://secretsmanager.example"), "timeout"),
        (ReadTimeoutError(endpoint_url="https://secretsmanager.example"), "timeout"),
        (EndpointConnectionError(endpoint_url="https://secretsmanager.example"), "unreachable"),
        (NoCredentialsError(), "auth"),
    ],
)
async def test_aws_transport_errors_map_to_store_errors(
    error: Exception, kind: str, stubbed: tuple[AwsBackend, StubClient]
) -> None:
    backend, stub = stubbed
    stub.error = error
    with pytest.raises(StoreError) as info:
        await backend.fetch("mcp/polygon/alice")
    assert info.value.kind == kind


def test_a_keys_file_that_is_not_utf8_is_a_load_error_that_quotes_nothing(tmp_path: Path) -> None:
    key = make_secret("latin1")
    path = tmp_path / "keys.yaml"
    path.write_bytes(f"alice: {key}\xe9\n".encode("latin-1"))
    with pytest.raises(FileLoadError) as info:
        load_secret_file(path)
    leaked = key in repr(info.value)
    assert not leaked  # checked first, as a bool: a failure must not print the key
    assert str(info.value) == f"{path} is not UTF-8 text"
    assert info.value.__context__ is None  # no library error (quoting the bytes) rides along


def test_refusals_of_unusable_secrets_carry_no_parser_error_with_the_value(tmp_path: Path) -> None:
    key = make_secret("ctx")
    with pytest.raises(NoCredential) as info:
        extract(f"{key} is not json", "apiKey")
    assert info.value.__context__ is None
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: [{key}\n", encoding="utf-8")  # unclosed flow sequence
    with pytest.raises(FileLoadError) as load:
        load_secret_file(path)
    assert load.value.__context__ is None


# ====================================================================== the factory


def test_every_configurable_backend_has_a_builder() -> None:
    assert BUILDERS.keys() == set(BACKENDS)


async def test_the_factory_builds_each_backend(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"alice: {make_secret('factory')}\n", encoding="utf-8")
    assert isinstance(build_backend(SecretsSettings(file=FileBackendSettings(path=keys))), FileBackend)
    assert isinstance(build_backend(SecretsSettings()), EmptyStore)  # no file: only allowed with no upstreams
    aws = build_backend(SecretsSettings(backend="aws", aws=AwsBackendSettings(region="eu-west-1")))
    assert isinstance(aws, AwsBackend)
    await aws.close()
    vault = build_backend(SecretsSettings(backend="vault", vault=VaultBackendSettings(address="https://vault.example")))
    assert isinstance(vault, VaultBackend) and vault.name == "vault"
    await vault.close()


async def test_a_store_that_cannot_start_is_one_error_naming_the_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: dict[str, str]
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("- not\n- a mapping\n", encoding="utf-8")
    with pytest.raises(BackendStartError) as info:
        await start_backend(SecretsSettings(file=FileBackendSettings(path=keys)))
    assert str(info.value) == f"secrets.file: {keys} must hold a mapping of secret id to value"
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    with pytest.raises(BackendStartError) as info:
        await start_backend(SecretsSettings(backend="aws"))
    assert str(info.value) == "secrets.aws: no region: set secrets.aws.region or AWS_REGION"  # a StoreError's detail


async def test_a_library_error_at_start_is_named_by_its_type_only(monkeypatch: pytest.MonkeyPatch) -> None:
    key = make_secret("factory-lib")

    class Quoting(EmptyStore):
        async def start(self) -> None:
            raise ValueError(f"could not parse {key!r}")

    monkeypatch.setitem(BUILDERS, "file", lambda settings: Quoting())
    with pytest.raises(BackendStartError) as info:
        await start_backend(SecretsSettings())
    leaked = key in repr(info.value)
    assert not leaked  # checked first, as a bool: a failure must not print the key
    assert str(info.value) == "secrets.file: ValueError"
    assert info.value.__cause__ is None and info.value.__suppress_context__  # a traceback shows no library text
