"""A rotated grant as the other replicas on one keys file see it.

Two sidecars (or a sidecar and ``oauth login``) may share one keys file: its writes
are check-and-set under a lock file. A replica the provider answered ``invalid_grant``
reads the store again for the grant another replica just wrote; with the file backend
that read must be the file as it is now, not the copy the watcher last loaded (up to
POLL_SECONDS old), or the replica gives up and asks the user for consent again. The
end-to-end race is in tests/e2e/test_oauth.py; this is the same at the store, with no
timing in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.secrets import file as file_module
from sidecar.secrets.base import WriteConflict, Written, version_of
from sidecar.secrets.file import FileBackend
from tests.support.leaks import make_secret

ALICE = "mcp/api/alice"


def grant(raw: object, **known: str) -> str:
    """Which of the ``known`` grants the entry holds, by name (an assertion never shows a token)."""
    assert isinstance(raw, dict)
    return next((name for name, value in known.items() if raw.get("refresh_token") == value), "another")


async def test_a_replica_reads_the_grant_another_just_wrote_to_their_shared_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module, "POLL_SECONDS", 3600.0)  # the watcher is not what sees it
    first, rotated, third = make_secret("rt-first"), make_secret("rt-rotated"), make_secret("rt-third")
    known = {"first": first, "rotated": rotated, "third": third}
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({ALICE: {"refresh_token": first}, "bob": make_secret("file-bob")}))
    changes: list[str] = []
    a, b = FileBackend(path), FileBackend(path, on_change=lambda: changes.append("b"))
    await a.start()
    await b.start()
    try:
        read_a, read_b = await a.fetch(ALICE), await b.fetch(ALICE)
        assert isinstance(await a.write(ALICE, {"refresh_token": rotated}, version_of(read_a)), Written)
        # b reads again (after invalid_grant for ``first``): it gets the newer grant at once.
        now = await b.fetch(ALICE)
        assert grant(now, **known) == "rotated"
        assert changes == ["b"]  # and its secret cache is cleared, as for any change to the file
        # b's own rotation: from the version it read before, refused; from the one it reads now, written.
        assert isinstance(await b.write(ALICE, {"refresh_token": third}, version_of(read_b)), WriteConflict)
        assert isinstance(await b.write(ALICE, {"refresh_token": third}, version_of(now)), Written)
        assert grant(await a.fetch(ALICE), **known) == "third"
        assert grant(await b.fetch(ALICE), **known) == "third"
        assert changes == ["b"]  # b's own write is no change to b
    finally:
        await a.close()
        await b.close()
