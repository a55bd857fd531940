"""The backend protocol, the redacting ``Secret`` type and the store's own errors."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from sidecar.errors import NoCredential

#: What a backend hands back: a string, or a mapping (a JSON object secret).
RawSecret = str | Mapping[str, Any]


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
        return "Secret('********')"

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


class SecretBackend(Protocol):
    """Where secrets live. Implementations never block the event loop."""

    name: str
    #: called after the store's contents changed on their own (the file was edited)
    on_change: Callable[[], None] | None

    async def start(self) -> None: ...

    async def fetch(self, secret_id: str) -> RawSecret:
        """Return the secret or raise SecretNotFound / StoreError. Never logs the value."""
        ...

    async def close(self) -> None: ...


class EmptyStore:
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
    if field is None:
        if isinstance(raw, str):
            return Secret(raw)
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
