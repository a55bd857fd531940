"""Secrets from a local YAML/JSON file, reread when it changes (local runs, mounted Secrets).

Writes (an OAuth grant rotated, ``oauth login``) rewrite the whole file atomically:
under an exclusive ``flock`` on a lock file beside it (``.<name>.lock``), the file is
read again from disk, the entry compared with the version the writer read, and the
new content written to a temporary file in the same directory, fsynced, given the
file's mode, and renamed over the file (``os.replace``), then the directory fsynced.
So a reader (this process's watcher, another sidecar, an editor) sees the old file
or the new one, never half of one; and of two writers, in one process or in two,
that read the same version, the one that takes the lock second finds the entry
changed and gets WriteConflict. The lock is on a separate file because the rename
replaces the keys file's inode: a lock on the file itself would be on the old one.

An entry's version is a keyed hash (HMAC-SHA256 with a key made at start) of its
value, computed when the file is loaded, so a read costs a dict get as before. The
key is per process: a version never leaves the process that read it, and the hash
of a short API key is no guess-checking oracle for anyone who sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hmac
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import yaml

from sidecar.secrets.base import (
    RawSecret,
    SecretNotFound,
    StoreError,
    StoreVersion,
    VersionedObject,
    VersionedText,
    WriteConflict,
    WriteResult,
    Written,
    version_of,
)

log = logging.getLogger("sidecar.secrets.file")

#: How often the file's identity (inode, size, mtime) is compared. Kubernetes
#: updates mounted Secrets by swapping a symlink, which this catches too.
POLL_SECONDS = 1.0
#: How long a write waits for another writer's lock on the file before giving up.
LOCK_TIMEOUT_SECONDS = 5.0


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


def entry_version(key: bytes, value: RawSecret) -> str:
    """The version of one entry: a keyed hash of its value (a string and a mapping never share one)."""
    if isinstance(value, str):
        canonical = "s" + value
    else:
        canonical = "o" + json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hmac.new(key, canonical.encode("utf-8", "surrogatepass"), "sha256").hexdigest()[:32]


def _versioned(key: bytes, data: Mapping[str, RawSecret]) -> dict[str, RawSecret]:
    """Each entry as what a read hands out: the value, carrying its version."""
    out: dict[str, RawSecret] = {}
    for secret_id, value in data.items():
        version = entry_version(key, value)
        out[secret_id] = VersionedText(value, version) if isinstance(value, str) else VersionedObject(value, version)
    return out


def _is_json(path: Path, text: str) -> bool:
    """Whether the file is JSON (kept JSON on a rewrite) rather than YAML."""
    if path.suffix.lower() == ".json":
        return True
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _dump(data: Mapping[str, RawSecret], as_json: bool) -> str:
    if as_json:
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    # SafeDumper quotes every string an implicit type would claim (0123, yes, 2024-01-01):
    # read back with _KeysLoader, each value is the same text.
    text: str = yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, default_flow_style=False, width=1 << 20)
    return text


@contextlib.contextmanager
def _locked(lock_path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on ``lock_path`` (made if missing, empty), given up after ``timeout``.

    Opened read-only: flock needs no write access, so another user who may write
    the keys file (the CLI run by a person, the sidecar as its own user) can lock it too.
    """
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError("unavailable", f"cannot open the lock file {lock_path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreError("timeout", f"another writer held {lock_path}", transient=True) from None
                time.sleep(0.01)  # a writer holds it for one read and one rename
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class FileBackend:
    """Keeps the file's mapping in memory; a watcher task swaps it when the file changes."""

    name = "file"

    def __init__(self, path: Path, on_change: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_change = on_change
        self._data: dict[str, RawSecret] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: versions are keyed hashes under this process's own key
        self._key = os.urandom(32)
        #: one reload or write at a time: a reload that read the file before a write must not land after it
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._stamp = _identity(self.path)
        self._data = _versioned(self._key, load_secret_file(self.path))  # a bad file at start is fatal
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def fetch(self, secret_id: str) -> RawSecret:
        # The file as it is now, not as the watcher last saw it: another sidecar or the CLI
        # on the same file may have rotated a grant a moment ago, and a replica told
        # invalid_grant reads the store again for exactly that grant. One stat; the file
        # is reread only when it changed. (The secret cache stands in front of this.)
        if _identity(self.path) != self._stamp:
            await self.reload_if_changed()
        try:
            return self._data[secret_id]
        except KeyError:
            raise SecretNotFound(secret_id) from None

    async def reload_if_changed(self) -> bool:
        """Reread the file when its identity changed; keep the old data if it is broken.

        The watcher calls it every POLL_SECONDS, and ``fetch`` before each read.
        """
        if _identity(self.path) == self._stamp:
            return False
        async with self._lock:
            stamp = _identity(self.path)  # again: a write may have landed (and noted its own stamp) meanwhile
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                data = await asyncio.get_running_loop().run_in_executor(None, self._load)
            except FileLoadError as exc:
                log.error("secrets file not reloaded, keeping the previous contents: %s", exc)
                return False
            self._data = data
        log.info("secrets file reloaded", extra={"entries": len(data)})
        if self.on_change is not None:
            self.on_change()
        return True

    def _load(self) -> dict[str, RawSecret]:
        return _versioned(self._key, load_secret_file(self.path))

    async def write(self, secret_id: str, value: Mapping[str, str], expected: StoreVersion | None) -> WriteResult:
        """Set the entry to the object ``value`` if it is still the version read (None: if there is none).

        The file on disk is what is compared, not this process's copy: another process
        may have written since. On success this process's copy is the new file at
        once, and the watcher does not take the rename for someone else's change;
        when the file had changed on disk besides, ``on_change`` is called as the
        watcher would have.
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            result, data, stamp, others = await loop.run_in_executor(
                None, self._write_locked, secret_id, dict(value), expected
            )
            if data is not None:
                self._data, self._stamp = data, stamp
        if others and self.on_change is not None:
            self.on_change()
        return result

    def _write_locked(
        self, secret_id: str, value: dict[str, str], expected: StoreVersion | None
    ) -> tuple[WriteResult, dict[str, RawSecret] | None, tuple[int, int, int] | None, bool]:
        """In a thread: compare and replace under the lock file; the result, the new data and stamp, and
        whether the file had changed on disk since this process last read it."""
        real = Path(os.path.realpath(self.path))  # a symlinked file stays a symlink: its target is replaced
        with _locked(real.with_name(f".{real.name}.lock"), LOCK_TIMEOUT_SECONDS):
            before = _identity(self.path)
            # As in load_secret_file, raised after the except block: the decoder's error holds the file's bytes.
            problem = None
            text, current = "", {}
            try:
                text = real.read_text(encoding="utf-8")
                current = load_secret_file(real)
            except FileLoadError as exc:
                problem = str(exc)
            except (OSError, UnicodeDecodeError):
                problem = f"cannot read {self.path} as UTF-8 text"
            if problem is not None:
                raise StoreError("invalid", problem)
            others = before != self._stamp
            entry = current.get(secret_id)
            if (expected is None) != (entry is None) or (
                entry is not None and not hmac.compare_digest(entry_version(self._key, entry), str(expected))
            ):
                return WriteConflict(), None, None, False
            current[secret_id] = dict(value)
            self._replace(real, _dump(current, _is_json(real, text)))
            stamp = _identity(self.path)
        data = _versioned(self._key, current)
        return Written(version_of(data[secret_id])), data, stamp, others

    @staticmethod
    def _replace(real: Path, text: str) -> None:
        """``text`` as the file's new content: temp file, fsync, the file's mode, rename, directory fsync."""
        directory = real.parent
        try:
            st = os.stat(real)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{real.name}.", suffix=".tmp")
        except OSError as exc:
            raise StoreError("unavailable", f"cannot write beside {real}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fchmod(out.fileno(), st.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):  # only root may give the file to another owner
                    os.fchown(out.fileno(), st.st_uid, st.st_gid)
                os.fsync(out.fileno())
            os.replace(tmp, real)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            hint = " (a file bind-mounted on its own cannot be replaced: mount its directory)" if (
                exc.errno == errno.EBUSY
            ) else ""
            raise StoreError("unavailable", f"cannot replace {real}: {exc.strerror}{hint}") from None
        # The rename has landed: the write is done. Making the rename itself survive a crash
        # is best effort (some network and FUSE file systems refuse a directory fsync), never
        # a reason to report a landed write as failed, which would drop a rotated grant.
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

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
