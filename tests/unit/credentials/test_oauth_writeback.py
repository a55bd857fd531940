"""A rotated grant the store did not take: written again until it lands, and once more at close.

The provider has revoked the old grant when it answers with a rotated one, so the rotated
one must reach the store: a pod restarted or rolled before it did would leave the user
with no grant, and the other replicas read the revoked one meanwhile.

Real parts: the tests' authorization server (tests/support/oauth_server.py) rotating every
refresh, the file backend on a real file. The store fails for real: a directory where the
file backend takes its lock file makes every write fail (``unavailable``) while reads go
on; removing it mends the store. Waits are bounded polls on what the test needs to see.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import parse_settings
from sidecar.credentials.oauth import RefreshToken, build_oauth_provider
from sidecar.identity.base import Identity
from sidecar.metrics import REGISTRY, apply_pending
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.file import FileBackend
from tests.support.leaks import OUTPUT_DIR, output_file, scan
from tests.support.oauth_server import OAuthServer

ALICE = "mcp/api/alice"
#: secrets.lookup_timeout_seconds here: each write is bounded by it
LOOKUP_TIMEOUT = 2.0
#: how long a test waits for what the background write must bring about (the first retry is ~1 s away)
WAIT_SECONDS = 15.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Make = Callable[[], Any]


@pytest.fixture
async def make(tmp_path: Path, oauth_server: OAuthServer) -> AsyncIterator[Make]:
    """``await make()``: a refresh-token provider over a new file backend on ``tmp_path/keys.yaml`` (a restart)."""
    app = oauth_server.register_client("app", grant_types=("refresh_token",))
    made: list[tuple[RefreshToken, FileBackend]] = []

    async def build() -> RefreshToken:
        keys = tmp_path / "keys.yaml"
        raw = {
            "secrets": {"file": {"path": str(keys)}, "lookup_timeout_seconds": LOOKUP_TIMEOUT},
            "upstreams": {"api": {
                "url": oauth_server.resource_url,
                "secret": "mcp/api/{client_id}",
                "allow_private": True,
                "timeout_seconds": 2,
                "credential": {
                    "type": "oauth2_refresh_token", "token_url": oauth_server.token_url,
                    "client_id": "app", "client_secret": app.client_secret,
                },
            }},
        }
        settings = parse_settings(raw, base_dir=tmp_path, env={})
        backend = FileBackend(keys)
        await backend.start()
        clock = Clock()
        p = build_oauth_provider(
            settings.upstreams["api"], SecretCache(backend, settings.secrets.cache, clock=clock), clock=clock
        )
        assert isinstance(p, RefreshToken)
        made.append((p, backend))
        return p

    yield build
    for p, backend in made:
        await p.close()
        await backend.close()


def seed(tmp_path: Path, refresh_token: str) -> Path:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({ALICE: {"refresh_token": refresh_token}}))
    return keys


def break_writes(keys: Path) -> None:
    """Every write fails (the lock file cannot be opened); reads still work."""
    (keys.parent / f".{keys.name}.lock").mkdir()


def mend_writes(keys: Path) -> None:
    (keys.parent / f".{keys.name}.lock").rmdir()


def stored(keys: Path) -> str:
    value = yaml.safe_load(keys.read_text())[ALICE]["refresh_token"]
    assert isinstance(value, str)
    return value


def which(value: str, **known: str) -> str:
    """Which of the ``known`` grants ``value`` is, by name (an assertion never shows a token)."""
    return next((name for name, token in known.items() if value == token), "another")


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not condition():
        assert loop.time() < deadline, f"not within {WAIT_SECONDS} s: {what}"
        await asyncio.sleep(0.02)


def store_errors(kind: str) -> float:
    apply_pending()
    return REGISTRY.get_sample_value("sidecar_secret_store_errors_total", {"backend": "file", "kind": kind}) or 0.0


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sidecar.credentials.oauth"]


def assert_nothing_leaked(caplog: pytest.LogCaptureFixture, name: str) -> None:
    """Every field of every log record, and the metrics page, hold no registered secret (tests/support/leaks.py).

    The session's log file keeps only message and args; the fields (``extra``) are checked here.
    """
    apply_pending()
    from prometheus_client import generate_latest

    lines = [json.dumps({k: str(v) for k, v in vars(r).items()}) for r in caplog.records]
    out = output_file(f"{name}.txt")
    out.write_text("\n".join(lines) + "\n" + generate_latest(REGISTRY).decode())
    mine = str(out.relative_to(OUTPUT_DIR))
    assert [leak for leak in scan() if leak.startswith(mine + ":")] == []


async def test_a_rotated_grant_the_store_refused_lands_once_the_store_is_back_without_another_request(
    make: Make, oauth_server: OAuthServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar")
    first = oauth_server.issue_grant("app", "alice")
    keys = seed(tmp_path, first)
    p = await make()
    break_writes(keys)
    errors = store_errors("unavailable")
    await p.get(Identity("alice"))  # served: the access token is good, the rotated grant is unsaved
    (rotated,) = oauth_server.live_grants("alice")
    assert which(stored(keys), first=first, rotated=rotated) == "first"  # revoked at the provider
    # The store comes back; nobody calls: the rotated grant reaches it anyway.
    mend_writes(keys)
    await until(lambda: stored(keys) == rotated, "the rotated grant is stored")
    assert store_errors("unavailable") > errors  # the failed write counted as the store failure it is
    await until(lambda: not p._writebacks.retries, "the retry ends once it landed")
    assert oauth_server.requests["refresh_token"] == 1
    assert "the rotated refresh token was written back" in messages(caplog)
    # A restart (a new backend and provider over the same file) refreshes with what is stored.
    q = await make()
    await q.get(Identity("alice"))
    (now,) = oauth_server.live_grants("alice")
    assert which(stored(keys), now=now, rotated=rotated) == "now"
    assert_nothing_leaked(caplog, "writeback-lands")


@pytest.mark.parametrize("back_by_close", [True, False], ids=["store-back", "store-still-failing"])
async def test_close_writes_an_unsaved_grant_once_more(
    make: Make, oauth_server: OAuthServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, back_by_close: bool
) -> None:
    """A reload's grace end or a shutdown (SIGTERM, a rolled pod) closes the provider: the only
    copy of a rotated grant must not go with it while one more write could still land."""
    caplog.set_level(logging.INFO, logger="sidecar")
    first = oauth_server.issue_grant("app", "alice")
    keys = seed(tmp_path, first)
    p = await make()
    break_writes(keys)
    await p.get(Identity("alice"))
    (rotated,) = oauth_server.live_grants("alice")
    if back_by_close:
        mend_writes(keys)  # before the first retry (~1 s away): only close() writes it
    loop = asyncio.get_running_loop()
    started = loop.time()
    await p.close()
    assert loop.time() - started < 2 * LOOKUP_TIMEOUT + 1.5
    if back_by_close:
        assert which(stored(keys), first=first, rotated=rotated) == "rotated"
    else:
        assert which(stored(keys), first=first, rotated=rotated) == "first"
        assert any("before the provider closed" in m for m in messages(caplog))
        mend_writes(keys)
    assert not p._writebacks.retries  # and the background writes are stopped
    assert_nothing_leaked(caplog, f"writeback-close-{back_by_close}")


async def test_a_grant_another_writer_stored_meanwhile_is_adopted_and_the_retry_stops(
    make: Make, oauth_server: OAuthServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's grant changed after the version the unsaved rotation follows (the user
    consented again through the gateway, or ``oauth login``): writing ours over it would
    undo that writer; the provider uses the store's grant and stops writing its own."""
    caplog.set_level(logging.INFO, logger="sidecar")
    first = oauth_server.issue_grant("app", "alice")
    keys = seed(tmp_path, first)
    p = await make()
    break_writes(keys)
    await p.get(Identity("alice"))
    (rotated,) = oauth_server.live_grants("alice")
    again = oauth_server.issue_grant("app", "alice")
    seed(tmp_path, again)  # another writer, straight to the file
    mend_writes(keys)
    await until(lambda: not p._writebacks.retries, "the retry stops at the conflict")
    known = {"first": first, "rotated": rotated, "again": again}
    assert which(stored(keys), **known) == "again"
    assert which(p._grants["alice"].refresh_token.reveal(), **known) == "again"
    assert not p._grants["alice"].unsaved
    assert any("another writer stored a grant" in m for m in messages(caplog))
    # The next refresh (the access token expired) uses the store's grant, and stores its rotation.
    p._clock.now += 4000
    await p.get(Identity("alice"))
    assert oauth_server.requests["refresh_token"] == 2
    assert which(stored(keys), **known) == "another"
    assert stored(keys) in oauth_server.live_grants("alice")
    assert again not in oauth_server.live_grants("alice")
    assert_nothing_leaked(caplog, "writeback-conflict")


async def test_a_newer_rotation_takes_over_and_two_writes_never_overlap(
    make: Make, oauth_server: OAuthServer, tmp_path: Path
) -> None:
    """The access token expires while the store still fails: the next refresh rotates the
    unsaved grant again. The newer grant is the one written once the store is back."""
    first = oauth_server.issue_grant("app", "alice")
    keys = seed(tmp_path, first)
    p = await make()
    break_writes(keys)
    await p.get(Identity("alice"))
    p._clock.now += 4000
    await p.get(Identity("alice"))  # refreshed with the unsaved grant: rotated again, unsaved again
    assert oauth_server.requests["refresh_token"] == 2
    (newest,) = oauth_server.live_grants("alice")
    assert len(p._writebacks.retries) == 1  # one task per secret id
    mend_writes(keys)
    await until(lambda: stored(keys) == newest, "the newest grant is stored")
    await until(lambda: not p._writebacks.retries, "the retry ends")
    assert not p._writebacks.locks


async def test_a_reload_hands_the_background_write_to_the_new_provider(
    make: Make, oauth_server: OAuthServer, tmp_path: Path
) -> None:
    """A reload over the same store shares the grants with the new provider: the replaced
    one, closed at the grace end, leaves the write to it; a reload that failed (its provider
    built, adopted and closed) takes nothing away from the running one."""
    first = oauth_server.issue_grant("app", "alice")
    keys = seed(tmp_path, first)
    p = await make()
    break_writes(keys)
    await p.get(Identity("alice"))
    (rotated,) = oauth_server.live_grants("alice")
    failed = build_oauth_provider(p.settings, p.cache, clock=p._clock)
    failed.adopt(p)
    await failed.close()  # the reload was refused: p runs on
    assert p._writebacks.retries
    new = build_oauth_provider(p.settings, p.cache, clock=p._clock)
    new.adopt(p)
    p.retire()
    await p.close()  # the grace period ended
    assert p._writebacks.retries  # still written, now for the new provider
    mend_writes(keys)
    await until(lambda: stored(keys) == rotated, "the rotated grant is stored")
    await new.close()
