"""The backend protocol, the redacting ``Secret`` type and the store's own errors."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.errors import NoCredential

#: What a backend hands back: a string, or a mapping (a JSON object secret).
RawSecret = str | Mapping[str, Any]
#: Which version of a secret a read saw, in the store's own terms (Vault KV: the version
#: number); a check-and-set write names it to replace exactly that version.
StoreVersion = int | str

#: What a masked value prints as.
MASK = "********"


def _fields_repr(raw: Mapping[str, Any], version: StoreVersion | None) -> str:
    """A read's field names and version, never a value: what its repr, a log line or a traceback shows."""
    return f"{type(raw).__name__}(fields={[str(name) for name in raw]!r}, version={version!r})"


class StoredFields(dict[str, Any]):
    """A secret that is always a set of named fields (a Vault KV v2 entry), with the version read.

    Such a store has no plain-string secrets: ``vault kv put .../alice api_key=...`` is the
    simplest entry there is. So with no ``secret_field``, an entry of exactly one field
    is that field's value; one of several fields is refused (``secret_field_needed``),
    since which one is meant cannot be guessed. A plain mapping (a file backend's nested
    object) keeps needing ``secret_field``: there a plain string was an option.
    """

    __slots__ = ("version",)

    def __init__(self, fields: Mapping[str, Any], version: StoreVersion | None = None) -> None:
        super().__init__(fields)
        #: the version this read saw; a later write_secret(..., expected=version) replaces exactly it
        self.version = version

    def __repr__(self) -> str:
        # dict's repr (and so str, format and %r) would print every value.
        return _fields_repr(self, self.version)


class VersionedText(str):
    """A string secret with the version the read saw (an AWS VersionId, a file entry's hash).

    Still a plain string to everything else: ``extract`` and the injectors see a str,
    and ``str(text)`` is the value (an exact str). What only shows it, ``repr`` (so
    ``%r``, ``!r``, a traceback's locals) and ``format`` (f-strings, ``str.format``),
    prints it masked: nothing formats a raw read to use it.
    """

    version: StoreVersion | None

    def __new__(cls, value: str, version: StoreVersion | None) -> VersionedText:
        text = super().__new__(cls, value)
        text.version = version
        return text

    def __repr__(self) -> str:
        return f"VersionedText({MASK!r}, version={self.version!r})"

    def __format__(self, spec: str) -> str:
        return format(MASK, spec)


class VersionedObject(dict[str, Any]):
    """A JSON-object secret (a file backend's mapping) with the version read.

    Unlike StoredFields, an object the store could have held as a plain string: it
    needs ``secret_field`` like any mapping.
    """

    __slots__ = ("version",)

    def __init__(self, fields: Mapping[str, Any], version: StoreVersion | None = None) -> None:
        super().__init__(fields)
        self.version = version

    def __repr__(self) -> str:
        return _fields_repr(self, self.version)


def version_of(raw: RawSecret) -> StoreVersion | None:
    """The version a read saw, when the backend says (Vault KV, AWS, the file); None otherwise."""
    if isinstance(raw, StoredFields | VersionedText | VersionedObject):
        return raw.version
    return None


@dataclass(frozen=True, slots=True)
class Written:
    """A check-and-set write landed: ``version`` is the store's version of it now."""

    version: StoreVersion | None


@dataclass(frozen=True, slots=True)
class WriteConflict:
    """Another writer replaced the version read first: nothing was written; read again."""


#: What a check-and-set write comes back with.
WriteResult = Written | WriteConflict


class Secret:
    """A secret value that never prints itself; ``reveal()`` is the one way to read it."""

    __slots__ = ("_memo", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._memo: dict[object, Any] = {}

    def memo(self, key: object, derive: Callable[[Secret], Any]) -> Any:
        """``derive(self)``, computed once per key (per-upstream renderings of the value)."""
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = derive(self)
            return value

    def reveal(self) -> str:
        """The value, for the injector and nothing else."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        raise TypeError("Secret is not hashable")

    def __reduce__(self) -> Any:
        raise TypeError("Secret cannot be pickled")


class SecretNotFound(Exception):
    """The store has no secret under this id (negative-cacheable)."""

    #: the access log's ``reason`` for the refusal this becomes
    reason = "not_found"
    #: whether the cache remembers the answer for ``negative_ttl_seconds``
    negative_cacheable = True


class SecretMismatch(SecretNotFound):
    """The store answered with another secret than the one asked for (an alias): no secret.

    Secrets Manager reads an ARN ending in ``-`` and six characters as a complete ARN,
    so ``...:secret:mcp/polygon/{client_id}`` with client ``alice-AbCdEf`` can select
    alice's secret. Refused like a missing secret, and negatively cached like one: the
    store answers that id the same way every time, and the app must not be able to
    tell "another tenant's secret exists" from "nothing here".
    """

    reason = "secret_mismatch"


class SecretPendingDeletion(SecretNotFound):
    """The secret exists but is scheduled for deletion: refused like a missing one, never remembered.

    Its deletion can still be cancelled (Secrets Manager's RestoreSecret): the next
    lookup must see the restored secret at once, not after ``negative_ttl_seconds``.
    """

    reason = "pending_deletion"
    negative_cacheable = False


class StoreError(Exception):
    """The store failed; ``kind`` is a bounded word for metrics and logs.

    ``transient``: the same call may well succeed if made again at once (a timeout, a
    dropped connection, throttling, a 5xx), so a backend may retry it within the lookup.
    """

    def __init__(self, kind: str, detail: str = "", *, transient: bool = False) -> None:
        self.kind = kind
        self.detail = detail
        self.transient = transient
        super().__init__(f"secret store error: {kind}" + (f" ({detail})" if detail else ""))


class WritesUnsupported(StoreError):
    """This backend does not write secrets (yet): a write-back cannot happen here."""

    def __init__(self, backend: str) -> None:
        super().__init__("unsupported", f"the {backend} backend does not write secrets")


class SecretBackend(Protocol):
    """Where secrets live. Implementations never block the event loop."""

    name: str
    #: called after the store's contents changed on their own (the file was edited)
    on_change: Callable[[], None] | None

    async def start(self) -> None: ...

    async def fetch(self, secret_id: str) -> RawSecret:
        """Return the secret or raise SecretNotFound / StoreError. Never logs the value."""
        ...

    async def write(self, secret_id: str, value: Mapping[str, str], expected: StoreVersion | None) -> WriteResult:
        """Replace the secret with ``value`` if its current version is still ``expected``.

        ``expected`` is what ``version_of`` gave for the read this write follows; None
        writes only when there is no such secret yet. Returns Written, or WriteConflict
        when another writer got there first; raises StoreError (WritesUnsupported for a
        backend that cannot write). Never logs the value.
        """
        ...

    async def close(self) -> None: ...


class ReadOnlyStore:
    """For a backend that does not write: ``write`` refuses with WritesUnsupported."""

    name: str

    async def write(self, secret_id: str, value: Mapping[str, str], expected: StoreVersion | None) -> WriteResult:
        raise WritesUnsupported(self.name)


class EmptyStore(ReadOnlyStore):
    """The file backend with no file configured (allowed only with no upstreams): it holds nothing.

    A sidecar that only tunnels ``forward_proxy.passthrough_hosts`` needs no keys.
    """

    name = "file"

    def __init__(self) -> None:
        self.on_change: Callable[[], None] | None = None

    async def start(self) -> None:
        return None

    async def fetch(self, secret_id: str) -> RawSecret:
        raise SecretNotFound(secret_id)

    async def close(self) -> None:
        return None


def extract(raw: RawSecret, field: str | None) -> Secret:
    """Turn a stored value into the Secret to inject, taking ``field`` from JSON objects."""
    secret = _extract(raw, field)
    value = secret.reveal()
    # A key with CR, LF or NUL would split a header line; an empty one injects nothing.
    # Printable ASCII only: the lean client reads an upstream's headers as latin-1, so a
    # UTF-8 echo of a non-ASCII key would not match any spelling the scrubber knows.
    if not value or not value.isascii() or not value.isprintable():
        raise NoCredential(
            "The stored secret is empty or holds characters other than printable ASCII.", reason="secret_invalid"
        )
    return secret


def _json_or_none(text: str) -> Any:
    """The parsed JSON, or None; the parser's error (which holds the text) is dropped here."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _extract(raw: RawSecret, field: str | None) -> Secret:
    if field is None and isinstance(raw, StoredFields):
        if not raw:
            raise NoCredential("The stored secret has no fields.", reason="secret_field_missing")
        if len(raw) > 1:
            raise NoCredential(
                "The stored secret has several fields; the upstream needs secret_field to pick one.",
                reason="secret_field_needed",
            )
        field = next(iter(raw))
    if field is None:
        if isinstance(raw, str):
            return Secret(str(raw))  # an exact str: a VersionedText would be copied by every render
        raise NoCredential(
            "The stored secret is an object; the upstream needs secret_field.", reason="secret_is_object"
        )
    obj: Any = raw
    if isinstance(raw, str):
        obj = _json_or_none(raw)
        if obj is None:  # raised out here: inside the except, the error would keep the value as context
            raise NoCredential("The stored secret is not a JSON object.", reason="secret_not_json")
    if not isinstance(obj, Mapping) or field not in obj:
        raise NoCredential("The stored secret has no such field.", reason="secret_field_missing")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise NoCredential("The stored secret field is not a string.", reason="secret_field_type")
    return Secret(str(value))
