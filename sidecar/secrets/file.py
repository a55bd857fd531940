"""Secrets from a local YAML/JSON file, reread when it changes (local runs, mounted Secrets)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

from sidecar.secrets.base import RawSecret, ReadOnlyStore, SecretNotFound, StoreError

log = logging.getLogger("sidecar.secrets.file")

#: How often the file's identity (inode, size, mtime) is compared. Kubernetes
#: updates mounted Secrets by swapping a symlink, which this catches too.
POLL_SECONDS = 1.0


class _KeysLoader(yaml.SafeLoader):
    """YAML without the implicit int, float, bool and date types: a key is text exactly as written.

    With them, ``alice: 0123`` would load as 83, ``bob: 1_000`` as 1000, and
    ``carol: 2024-01-01`` as a date (which made the whole file invalid).
    """


_TEXT_ONLY = {
    "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp",
}
_KeysLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _TEXT_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class FileLoadError(Exception):
    """The file is unreadable or not a mapping; the message holds no value from it."""


def load_secret_file(path: Path) -> dict[str, RawSecret]:
    """Read the mapping ``secret id -> string or mapping``; number values become strings, keys stay text."""
    # Each failure is raised after its except block: raised inside one, our error would
    # carry the library's (which quotes bytes or a line of the file: a key) as __context__.
    problem = None
    text = ""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = f"cannot read {path}: {exc.strerror}"
    except UnicodeDecodeError:
        problem = f"{path} is not UTF-8 text"
    if problem is not None:
        raise FileLoadError(problem)
    try:
        data = yaml.load(text, Loader=_KeysLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        problem = f"{path} is not valid YAML or JSON"
    if problem is not None:
        raise FileLoadError(problem)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise FileLoadError(f"{path} must hold a mapping of secret id to value")
    out: dict[str, RawSecret] = {}
    for key, value in data.items():
        problem = _not_text(key, "a secret id")
        if problem is not None:
            raise FileLoadError(f"{path}: {problem}")
        if isinstance(value, Mapping):
            for field in value:
                problem = _not_text(field, f"a field name of {key!r}")
                if problem is not None:
                    raise FileLoadError(f"{path}: {problem}")
            out[key] = dict(value)
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            out[key] = str(value)
        else:
            raise FileLoadError(f"{path}: the value of {key!r} must be a string or a mapping")
    return out


def _not_text(key: object, what: str) -> str | None:
    """Why ``key`` cannot be looked up by its text, or None when it is text.

    Lookups are exact (no case folding, no trimming), so a key must be the very text
    asked for. A key YAML turns into something else would answer to another id:
    ``null:`` (or ``~:``) would become "None", ``!!int 0123:`` "83", ``!!bool yes:``
    "True", and two keys could land on one id. The file is refused instead.
    """
    if isinstance(key, str):
        return None
    kind = "null" if key is None else type(key).__name__
    shown = "null, ~ or an empty key" if key is None else repr(key)
    return f"{what} is read by YAML as {kind} ({shown}), not as text; write it in quotes"


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FileBackend(ReadOnlyStore):
    """Keeps the file's mapping in memory; a watcher task swaps it when the file changes."""

    name = "file"

    def __init__(self, path: Path, on_change: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_change = on_change
        self._data: dict[str, RawSecret] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._stamp = _identity(self.path)
        self._data = load_secret_file(self.path)  # a bad file at start is fatal
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def fetch(self, secret_id: str) -> RawSecret:
        try:
            return self._data[secret_id]
        except KeyError:
            raise SecretNotFound(secret_id) from None

    async def reload_if_changed(self) -> bool:
        """Reread the file when its identity changed; keep the old data if it is broken."""
        stamp = _identity(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, load_secret_file, self.path)
        except FileLoadError as exc:
            log.error("secrets file not reloaded, keeping the previous contents: %s", exc)
            return False
        self._data = data
        log.info("secrets file reloaded", extra={"entries": len(data)})
        if self.on_change is not None:
            self.on_change()
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.reload_if_changed()
            except Exception:  # the watcher must outlive any surprise
                log.exception("secrets file watcher failed")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None


__all__ = ["FileBackend", "FileLoadError", "StoreError", "load_secret_file"]
