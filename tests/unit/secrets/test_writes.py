"""Check-and-set writes (an OAuth grant rotated, ``oauth login``) to every store that writes.

The first section holds what every store does alike: the file backend, AWS Secrets
Manager (moto's server mode) and Vault (a real OpenBao). Then each store's own
behaviour: the file's atomic rewrite, its lock across processes, and its watcher;
AWS's derived version ids, which make the check-and-set hold between sidecars.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import AwsBackendSettings, VaultAuthSettings, VaultBackendSettings
from sidecar.secrets.aws import AwsBackend, next_version_id
from sidecar.secrets.base import (
    RawSecret,
    StoreError,
    VersionedObject,
    VersionedText,
    WriteConflict,
    Written,
    extract,
    version_of,
)
from sidecar.secrets.file import FileBackend, load_secret_file
from sidecar.secrets.vault import VaultBackend
from tests.support.leaks import make_secret
from tests.support.openbao import OpenBao
from tests.support.store_faults import FakeSecretsManager, secrets_manager

WRITERS = ("file", "aws", "vault")

# ====================================================================== every store alike


class Writable:
    """A store that writes, how a test seeds it from outside, and how a test makes more sidecars on it."""

    def __init__(self, kind: str, make: Callable[[], Any], tmp_path: Path, client: Any = None) -> None:
        self.kind = kind
        self.make = make
        self.client = client
        self.file = tmp_path / "keys.yaml"
        self.started: list[Any] = []

    def id(self, name: str) -> str:
        return f"mcp/writes-{uuid.uuid4().hex[:10]}/{name}"

    async def backend(self) -> Any:
        backend = self.make()
        await backend.start()
        self.started.append(backend)
        return backend

    def seed(self, secret_id: str, fields: dict[str, str]) -> None:
        """Put a secret in as its operator would, outside any sidecar."""
        if self.kind == "file":
            data = yaml.safe_load(self.file.read_text()) or {}
            data[secret_id] = fields
            self.file.write_text(yaml.safe_dump(data))
        elif self.kind == "aws":
            self.client.create_secret(Name=secret_id, SecretString=json.dumps(fields))
        else:
            self.client.put(secret_id, **fields)

    def stored(self, secret_id: str) -> dict[str, str]:
        """What the store holds now, read from outside the sidecar."""
        if self.kind == "file":
            return dict(load_secret_file(self.file)[secret_id])  # type: ignore[arg-type]
        if self.kind == "aws":
            return dict(json.loads(self.client.get_secret_value(SecretId=secret_id)["SecretString"]))
        return dict(self.client.api("GET", f"secret/data/{secret_id}")["data"]["data"])


@pytest.fixture(params=WRITERS)
async def writable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Writable]:
    kind = request.param
    if kind == "file":
        path = tmp_path / "keys.yaml"
        path.write_text("{}\n")
        out = Writable(kind, lambda: FileBackend(path), tmp_path)
    elif kind == "aws":
        endpoint = request.getfixturevalue("moto_endpoint")
        request.getfixturevalue("aws_env")
        client = secrets_manager(endpoint)
        request.addfinalizer(client.close)
        settings = AwsBackendSettings(region="us-east-1", endpoint_url=endpoint)
        out = Writable(kind, lambda: AwsBackend(settings), tmp_path, client)
    else:
        bao: OpenBao = request.getfixturevalue("openbao")
        token = bao.token()
        settings_v = VaultBackendSettings(address=bao.address, auth=VaultAuthSettings(method="token", mount="token"))
        out = Writable(kind, lambda: VaultBackend(settings_v, env={"VAULT_TOKEN": token}), tmp_path, bao)
    yield out
    for backend in out.started:
        await backend.close()


async def test_a_write_lands_once_and_a_writer_with_the_old_version_is_told(writable: Writable) -> None:
    secret_id = writable.id("alice")
    writable.seed(secret_id, {"refresh_token": make_secret(f"{writable.kind}-w-1")})
    backend = await writable.backend()
    read = await backend.fetch(secret_id)
    assert version_of(read) is not None
    new, late = make_secret(f"{writable.kind}-w-2"), make_secret(f"{writable.kind}-w-late")

    written = await backend.write(secret_id, {"refresh_token": new}, version_of(read))
    assert isinstance(written, Written) and written.version not in (None, version_of(read))
    # Another replica read the same version, and writes after us: it must not overwrite.
    assert await backend.write(secret_id, {"refresh_token": late}, version_of(read)) == WriteConflict()

    again = await backend.fetch(secret_id)
    assert extract(again, "refresh_token").reveal() == new
    assert version_of(again) == written.version  # the next rotation names what this write made
    assert writable.stored(secret_id) == {"refresh_token": new}
    fresh = await writable.backend()  # another sidecar, started after the write, reads it too
    assert extract(await fresh.fetch(secret_id), "refresh_token").reveal() == new


async def test_with_no_version_a_write_only_creates(writable: Writable) -> None:
    secret_id = writable.id("bob")
    backend = await writable.backend()
    first, second = make_secret(f"{writable.kind}-c-1"), make_secret(f"{writable.kind}-c-2")
    created = await backend.write(secret_id, {"refresh_token": first}, None)
    assert isinstance(created, Written)
    assert await backend.write(secret_id, {"refresh_token": second}, None) == WriteConflict()
    assert writable.stored(secret_id) == {"refresh_token": first}
    assert version_of(await backend.fetch(secret_id)) == created.version


async def test_of_concurrent_writers_from_one_version_exactly_one_wins(writable: Writable) -> None:
    """Four sidecars (each its own backend, as in four pods) rotate the same grant at once."""
    secret_id = writable.id("carol")
    writable.seed(secret_id, {"refresh_token": make_secret(f"{writable.kind}-r-0")})
    backends = [await writable.backend() for _ in range(4)]
    reads = [await b.fetch(secret_id) for b in backends]  # the same entry (a file's versions are per process)
    values = [make_secret(f"{writable.kind}-r-{n}") for n in range(1, 5)]
    results = await asyncio.gather(*(
        b.write(secret_id, {"refresh_token": v}, version_of(r)) for b, r, v in zip(backends, reads, values, strict=True)
    ))
    winners = [v for v, result in zip(values, results, strict=True) if isinstance(result, Written)]
    assert len(winners) == 1, results
    assert results.count(WriteConflict()) == 3
    assert writable.stored(secret_id) == {"refresh_token": winners[0]}


async def test_one_backend_serializes_its_own_concurrent_writers(writable: Writable) -> None:
    secret_id = writable.id("dave")
    writable.seed(secret_id, {"refresh_token": make_secret(f"{writable.kind}-s-0")})
    backend = await writable.backend()
    version = version_of(await backend.fetch(secret_id))
    values = [make_secret(f"{writable.kind}-s-{n}") for n in range(1, 4)]
    results = await asyncio.gather(*(backend.write(secret_id, {"refresh_token": v}, version) for v in values))
    assert sum(isinstance(r, Written) for r in results) == 1, results


async def test_a_secret_deleted_since_the_read_is_a_conflict(writable: Writable) -> None:
    secret_id = writable.id("erin")
    writable.seed(secret_id, {"refresh_token": make_secret(f"{writable.kind}-d-0")})
    backend = await writable.backend()
    version = version_of(await backend.fetch(secret_id))
    if writable.kind == "file":
        writable.file.write_text("{}\n")
    elif writable.kind == "aws":
        writable.client.delete_secret(SecretId=secret_id, ForceDeleteWithoutRecovery=True)
    else:
        writable.client.delete(secret_id)
    assert await backend.write(secret_id, {"refresh_token": make_secret(f"{writable.kind}-d-1")}, version) == (
        WriteConflict()
    )


# ====================================================================== file backend


@pytest.fixture
async def files() -> AsyncIterator[list[FileBackend]]:
    started: list[FileBackend] = []
    yield started
    for backend in started:
        await backend.close()


async def start_file(started: list[FileBackend], path: Path, on_change: Callable[[], None] | None = None) -> FileBackend:
    backend = FileBackend(path, on_change)
    await backend.start()
    started.append(backend)
    return backend


async def test_a_file_rewrite_keeps_every_other_entry_its_mode_and_yaml(tmp_path: Path, files: list[FileBackend]) -> None:
    path = tmp_path / "keys.yaml"
    alice, grant = make_secret("file-keep-a"), make_secret("file-keep-g")
    # Values YAML would read as other types, written as an operator would: the rewrite must keep each as text.
    path.write_text(
        f"# one key per client\nalice: {alice}\nzip: '0123'\nflag: 'yes'\nwhen: '2024-01-01'\n"
        f"ünï: {alice}\nsvc:\n  api_key: {alice}\n  n: 1\nmcp/polygon/carol:\n  refresh_token: {grant}\n"
    )
    path.chmod(0o640)
    before = load_secret_file(path)
    backend = await start_file(files, path)
    read = await backend.fetch("mcp/polygon/carol")
    new = make_secret("file-keep-new")
    assert isinstance(await backend.write("mcp/polygon/carol", {"refresh_token": new}, version_of(read)), Written)

    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    after = load_secret_file(path)
    assert after == {**before, "mcp/polygon/carol": {"refresh_token": new}}
    assert list(after) == list(before)  # the entries keep their order
    assert path.read_text().lstrip()[0] != "{"  # still YAML
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keys.yaml.lock", "keys.yaml"]  # no temp file left


async def test_a_landed_write_is_written_where_the_directory_cannot_be_fsynced(
    tmp_path: Path, files: list[FileBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network and FUSE file systems refuse fsync on a directory (EINVAL). The rename has
    landed by then: reporting the write as failed would make a rotated grant look unsaved."""
    path = tmp_path / "keys.yaml"
    path.write_text(f"carol:\n  refresh_token: {make_secret('file-dirsync-old')}\n")
    backend = await start_file(files, path)
    read = await backend.fetch("carol")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    new = make_secret("file-dirsync-new")
    assert isinstance(await backend.write("carol", {"refresh_token": new}, version_of(read)), Written)
    assert load_secret_file(path) == {"carol": {"refresh_token": new}}


async def test_a_json_file_stays_json(tmp_path: Path, files: list[FileBackend]) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"alice": make_secret("file-json-a"), "bob": {"refresh_token": "r0"}}))
    backend = await start_file(files, path)
    new = make_secret("file-json-new")
    assert isinstance(await backend.write("bob", {"refresh_token": new}, version_of(await backend.fetch("bob"))), Written)
    assert json.loads(path.read_text())["bob"] == {"refresh_token": new}


async def test_a_symlinked_file_keeps_its_link_and_its_target_is_rewritten(
    tmp_path: Path, files: list[FileBackend]
) -> None:
    target = tmp_path / "data" / "keys.yaml"
    target.parent.mkdir()
    target.write_text("bob: {refresh_token: r0}\n")
    link = tmp_path / "keys.yaml"
    link.symlink_to(target)
    backend = await start_file(files, link)
    new = make_secret("file-link-new")
    assert isinstance(await backend.write("bob", {"refresh_token": new}, version_of(await backend.fetch("bob"))), Written)
    assert link.is_symlink() and load_secret_file(target) == {"bob": {"refresh_token": new}}


async def test_its_own_write_is_no_change_to_the_watcher_but_an_edit_before_it_is(
    tmp_path: Path, files: list[FileBackend]
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {make_secret('file-watch-a')}\nbob: {{refresh_token: r0}}\n")
    changes: list[int] = []
    backend = await start_file(files, path, lambda: changes.append(1))
    read = await backend.fetch("bob")
    assert isinstance(await backend.write("bob", {"refresh_token": "r1"}, version_of(read)), Written)
    assert await backend.reload_if_changed() is False and changes == []

    # An operator edits alice's key; before the watcher looks, a rotation writes bob's grant.
    edited = make_secret("file-watch-a2")
    data = load_secret_file(path)
    path.write_text(yaml.safe_dump({**data, "alice": edited}))
    assert isinstance(await backend.write("bob", {"refresh_token": "r2"}, version_of(await backend.fetch("bob"))), Written)
    assert changes == [1]  # the cache is told, as the watcher would have told it
    assert await backend.fetch("alice") == edited
    assert load_secret_file(path)["alice"] == edited


async def test_a_file_in_a_read_only_directory_is_a_store_error_and_stays_as_it_was(
    tmp_path: Path, files: list[FileBackend]
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    directory = tmp_path / "ro"
    directory.mkdir()
    path = directory / "keys.yaml"
    path.write_text("bob: {refresh_token: r0}\n")
    backend = await start_file(files, path)
    version = version_of(await backend.fetch("bob"))
    directory.chmod(0o555)
    try:
        with pytest.raises(StoreError) as info:
            await backend.write("bob", {"refresh_token": "r1"}, version)
    finally:
        directory.chmod(0o755)
    assert info.value.kind == "unavailable" and "r1" not in str(info.value)
    assert load_secret_file(path) == {"bob": {"refresh_token": "r0"}}


async def test_plain_keys_read_as_strings_with_a_version(tmp_path: Path, files: list[FileBackend]) -> None:
    path = tmp_path / "keys.yaml"
    key = make_secret("file-plain")
    path.write_text(f"alice: {key}\nsvc: {{api_key: {key}}}\n")
    backend = await start_file(files, path)
    plain: RawSecret = await backend.fetch("alice")
    obj: RawSecret = await backend.fetch("svc")
    assert isinstance(plain, VersionedText) and plain == key and extract(plain, None).reveal() == key
    assert isinstance(obj, VersionedObject) and extract(obj, "api_key").reveal() == key
    assert version_of(plain) != version_of(obj)
    # A mapping is still an object that needs secret_field, as before writes came.
    with pytest.raises(Exception, match="secret_field"):
        extract(obj, None)


RACER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from sidecar.secrets.base import Written, version_of
    from sidecar.secrets.file import FileBackend

    async def main() -> None:
        backend = FileBackend(Path(sys.argv[1]))
        await backend.start()
        version = version_of(await backend.fetch("bob"))
        print("ready", flush=True)
        sys.stdin.readline()
        result = await backend.write("bob", {"refresh_token": sys.argv[2]}, version)
        print("written" if isinstance(result, Written) else "conflict", flush=True)
        await backend.close()

    asyncio.run(main())
""")


def test_two_processes_racing_on_one_file_one_wins_the_other_is_told(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("bob: {refresh_token: r0}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    values = [make_secret(f"file-proc-{n}") for n in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(path), value], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env,
        )
        for value in values
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:  # all have read version r0; now all write at once
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert sorted(outcomes) == ["conflict", "conflict", "written"]
    winner = values[outcomes.index("written")]
    assert load_secret_file(path) == {"bob": {"refresh_token": winner}}


# ====================================================================== AWS backend


@pytest.fixture
async def aws(moto_endpoint: str, aws_env: dict[str, str]) -> AsyncIterator[tuple[Callable[[], Any], Any]]:
    client = secrets_manager(moto_endpoint)
    started: list[AwsBackend] = []

    async def make() -> AwsBackend:
        backend = AwsBackend(AwsBackendSettings(region="us-east-1", endpoint_url=moto_endpoint))
        await backend.start()
        started.append(backend)
        return backend

    yield make, client
    for backend in started:
        await backend.close()
    client.close()


async def test_aws_a_write_makes_the_version_every_sidecar_would_make_after_the_one_read(
    aws: tuple[Callable[[], Any], Any],
) -> None:
    make, client = aws
    name = f"mcp/writes-{uuid.uuid4().hex[:10]}/alice"
    created = client.create_secret(Name=name, SecretString=json.dumps({"refresh_token": "r0"}))
    backend = await make()
    read = await backend.fetch(name)
    assert version_of(read) == created["VersionId"]
    written = await backend.write(name, {"refresh_token": make_secret("aws-derived")}, version_of(read))
    assert written == Written(next_version_id(created["ARN"], created["VersionId"]))
    stages = client.describe_secret(SecretId=name)["VersionIdsToStages"]
    assert stages[written.version] == ["AWSCURRENT"] and stages[created["VersionId"]] == ["AWSPREVIOUS"]


async def test_aws_a_writer_whose_check_passed_before_another_wrote_is_still_refused(
    aws: tuple[Callable[[], Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the check leaves: B checks, A writes, B puts. B's put names the same new version: refused."""
    make, client = aws
    name = f"mcp/writes-{uuid.uuid4().hex[:10]}/bob"
    client.create_secret(Name=name, SecretString=json.dumps({"refresh_token": "r0"}))
    a, b = await make(), await make()
    read = await b.fetch(name)
    stale_answer = b._read_answer(name)
    first, second = make_secret("aws-race-a"), make_secret("aws-race-b")
    assert isinstance(await a.write(name, {"refresh_token": first}, version_of(read)), Written)

    real = b._read_answer
    answers = iter([stale_answer])
    monkeypatch.setattr(b, "_read_answer", lambda secret_id: next(answers, None) or real(secret_id))
    assert await b.write(name, {"refresh_token": second}, version_of(read)) == WriteConflict()
    assert json.loads(client.get_secret_value(SecretId=name)["SecretString"]) == {"refresh_token": first}


async def test_aws_a_write_whose_answer_was_lost_lands_once_when_retried(aws: tuple[Callable[[], Any], Any]) -> None:
    make, client = aws
    name = f"mcp/writes-{uuid.uuid4().hex[:10]}/carol"
    created = client.create_secret(Name=name, SecretString=json.dumps({"refresh_token": "r0"}))
    backend = await make()
    text = json.dumps({"refresh_token": make_secret("aws-retry")})
    token = next_version_id(created["ARN"], created["VersionId"])
    assert backend._put(name, created["ARN"], text, token) == backend._put(name, created["ARN"], text, token)
    assert len(client.list_secret_version_ids(SecretId=name)["Versions"]) == 2


async def test_aws_after_a_rollback_the_sidecar_can_write_again(aws: tuple[Callable[[], Any], Any]) -> None:
    """An operator moved AWSCURRENT back to the version before a sidecar's write: that version's successor id is taken."""
    make, client = aws
    name = f"mcp/writes-{uuid.uuid4().hex[:10]}/dave"
    created = client.create_secret(Name=name, SecretString=json.dumps({"refresh_token": "r0"}))
    backend = await make()
    written = await backend.write(name, {"refresh_token": "r1"}, created["VersionId"])
    assert isinstance(written, Written)
    client.update_secret_version_stage(
        SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=created["VersionId"],
        RemoveFromVersionId=str(written.version),
    )
    read = await backend.fetch(name)
    assert version_of(read) == created["VersionId"]
    again = await backend.write(name, {"refresh_token": "r2"}, version_of(read))
    assert isinstance(again, Written) and again.version != written.version
    assert json.loads(client.get_secret_value(SecretId=name)["SecretString"]) == {"refresh_token": "r2"}


async def test_aws_a_missing_secret_is_created_by_name_never_by_arn(aws: tuple[Callable[[], Any], Any]) -> None:
    make, _client = aws
    backend = await make()
    arn = f"arn:aws:secretsmanager:us-east-1:123456789012:secret:mcp/writes-{uuid.uuid4().hex[:10]}/erin"
    with pytest.raises(StoreError) as info:
        await backend.write(arn, {"refresh_token": "r0"}, None)
    assert info.value.kind == "invalid"


@pytest.mark.parametrize(("fault", "kind"), [("denied", "access_denied"), ("throttle", "throttled")])
async def test_aws_write_failures_are_the_reads_store_errors(
    fault: str, kind: str, aws_env: dict[str, str]
) -> None:
    fake = FakeSecretsManager(values={"mcp/x/alice": "{}"}, faults={"mcp/x/alice": fault}).start()
    backend = AwsBackend(AwsBackendSettings(region="us-east-1", endpoint_url=fake.url))
    backend.backoff_seconds = 0.0
    await backend.start()
    try:
        with pytest.raises(StoreError) as info:
            await backend.write("mcp/x/alice", {"refresh_token": make_secret(f"aws-fault-{fault}")}, "v1")
        assert info.value.kind == kind
        assert "arn:aws" not in str(info.value)  # AWS's message names the role and resource: not ours to repeat
    finally:
        await backend.close()
        fake.stop()
