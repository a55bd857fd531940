"""What a store read hands back never prints its value: not in a log line, an error, or a traceback's locals.

A read comes back as a ``StoredFields`` (a Vault KV entry), a ``VersionedObject`` (a
file's JSON object) or a ``VersionedText`` (an AWS or file string secret) before
``extract`` turns it into a ``Secret``. Each of them is a dict or a str underneath, so
without their own ``repr`` any ``%r``, ``!r`` or locals-showing traceback renderer
would print the credential. Each test also reads the value the way the code does, so
the masking never costs the value itself.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.credentials.oauth import TokenAnswer, _Client, _Grant, _Token
from sidecar.secrets.base import (
    RawSecret,
    Secret,
    StoredFields,
    VersionedObject,
    VersionedText,
    extract,
    version_of,
)
from sidecar.secrets.cache import _Entry
from sidecar.secrets.file import FileBackend
from sidecar.secrets.vault import VaultBackend, _Login
from tests.support.leaks import make_secret

log = logging.getLogger("tests.redaction")


def _renderings(carrier: object) -> dict[str, str]:
    """Every way a log line, an error message or an assertion shows an object it was not asked to reveal."""
    return {
        "repr": repr(carrier),
        "!r": f"{carrier!r}",
        "%r": "%r" % (carrier,),  # noqa: UP031 (the %-formatting a log line does is what is tested)
        "in a list": repr([carrier]),
        "in an error": repr(ValueError(carrier)),
    }


def _traceback_with_locals(carrier: object) -> str:
    """The traceback a renderer that shows locals (capture_locals) prints for a failure next to ``carrier``."""

    def fail(held: object) -> None:
        raise RuntimeError("the store answered something odd")

    try:
        fail(carrier)
    except RuntimeError as exc:
        return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
    raise AssertionError("fail() did not raise")


def _assert_masked(carrier: object, value: str, caplog: pytest.LogCaptureFixture) -> None:
    for how, text in _renderings(carrier).items():
        assert value not in text, f"{how} shows the value"
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("read %r", carrier)
        log.info("read %(secret)r", {"secret": carrier})
    assert caplog.records and value not in caplog.text
    assert value not in _traceback_with_locals(carrier)


@pytest.fixture
async def files() -> AsyncIterator[list[FileBackend]]:
    started: list[FileBackend] = []
    yield started
    for backend in started:
        await backend.close()


async def _read_file(started: list[FileBackend], path: Path, secret_id: str) -> RawSecret:
    backend = FileBackend(path, None)
    await backend.start()
    started.append(backend)
    return await backend.fetch(secret_id)


def _vault_read(fields: dict[str, Any], version: int) -> StoredFields:
    """What VaultBackend.fetch returns for a KV v2 answer (its parser, without the HTTP)."""
    body = {"data": {"data": fields, "metadata": {"version": version}}}
    return VaultBackend._fields(json.loads(json.dumps(body)), "mcp/alice")


def test_stored_fields_repr_names_the_fields_and_version_never_a_value(caplog: pytest.LogCaptureFixture) -> None:
    key = make_secret("redact-vault")
    raw = _vault_read({"api_key": key}, 3)
    _assert_masked(raw, key, caplog)
    assert repr(raw) == "StoredFields(fields=['api_key'], version=3)"
    # str() of a dict is its repr: masked as well.
    assert key not in str(raw) and key not in f"{raw}"
    # The code paths that read it still get the value.
    assert extract(raw, None).reveal() == key and version_of(raw) == 3
    assert raw == {"api_key": key} and dict(raw)["api_key"] == key


def test_stored_fields_of_several_fields_list_each_name_once(caplog: pytest.LogCaptureFixture) -> None:
    key, refresh = make_secret("redact-vault-a"), make_secret("redact-vault-r")
    raw = _vault_read({"api_key": key, "refresh_token": refresh, "seats": 5}, 7)
    _assert_masked(raw, key, caplog)
    _assert_masked(raw, refresh, caplog)
    assert repr(raw) == "StoredFields(fields=['api_key', 'refresh_token', 'seats'], version=7)"
    assert extract(raw, "refresh_token").reveal() == refresh


async def test_a_file_object_secret_never_prints_its_fields_values(
    tmp_path: Path, files: list[FileBackend], caplog: pytest.LogCaptureFixture
) -> None:
    key = make_secret("redact-file-obj")
    path = tmp_path / "keys.yaml"
    path.write_text(f"svc: {{api_key: {key}, nested: {{inner: {key}}}}}\n")
    raw = await _read_file(files, path, "svc")
    assert isinstance(raw, VersionedObject)
    _assert_masked(raw, key, caplog)
    assert key not in str(raw) and key not in f"{raw}"
    assert repr(raw) == f"VersionedObject(fields=['api_key', 'nested'], version={version_of(raw)!r})"
    assert extract(raw, "api_key").reveal() == key


async def test_a_file_string_secret_prints_masked_but_reads_as_its_value(
    tmp_path: Path, files: list[FileBackend], caplog: pytest.LogCaptureFixture
) -> None:
    key = make_secret("redact-file-text")
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {key}\n")
    raw = await _read_file(files, path, "alice")
    assert isinstance(raw, VersionedText)
    _assert_masked(raw, key, caplog)
    assert repr(raw) == f"VersionedText('********', version={version_of(raw)!r})"
    # f-strings and str.format mask it too: nothing formats a raw read on purpose.
    assert key not in f"{raw}" and key not in format(raw, ">80")
    assert key not in "{}".format(raw)  # noqa: UP032 (str.format is what is tested)
    # str() is the value: extract and the OAuth field reader take the text that way.
    assert str(raw) == key and type(str(raw)) is str
    assert raw == key and raw.encode() == key.encode()
    assert extract(raw, None).reveal() == key


def test_an_aws_string_secret_prints_masked_but_its_json_fields_still_read(caplog: pytest.LogCaptureFixture) -> None:
    key = make_secret("redact-aws")
    plain = VersionedText(key, "a1b2c3-version")
    _assert_masked(plain, key, caplog)
    assert repr(plain) == "VersionedText('********', version='a1b2c3-version')"
    assert extract(plain, None).reveal() == key
    # A SecretString that holds JSON: the field is parsed out of the text as before.
    obj = VersionedText(json.dumps({"api_key": key}), "v2")
    _assert_masked(obj, key, caplog)
    assert extract(obj, "api_key").reveal() == key and json.loads(obj) == {"api_key": key}


def test_the_secret_type_prints_masked_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    key = make_secret("redact-secret")
    secret = Secret(key)
    _assert_masked(secret, key, caplog)
    assert key not in str(secret) and key not in f"{secret}" and key not in "%s" % (secret,)  # noqa: UP031
    assert secret.reveal() == key


#: Every record in secrets/ and credentials/ that holds a store's or a token endpoint's value.
HOLDERS: dict[str, Callable[[Secret], object]] = {
    "cache entry": lambda s: _Entry(s, 1.0, 2.0, 1.5),
    "vault login": lambda s: _Login(s, 0.0, 60.0, True),
    "token answer": lambda s: TokenAnswer(s, 60.0, s),
    "oauth token": lambda s: _Token(s, 1.0, 2.0, 1.5, False, 0.0),
    "oauth client": lambda s: _Client("app-id", s),
    "refresh grant": lambda s: _Grant(s, 4),
}


@pytest.mark.parametrize("make", HOLDERS.values(), ids=HOLDERS.keys())
def test_records_holding_a_value_print_it_masked(
    make: Callable[[Secret], object], caplog: pytest.LogCaptureFixture
) -> None:
    key = make_secret("redact-holder")
    _assert_masked(make(Secret(key)), key, caplog)
