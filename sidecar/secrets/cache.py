"""The secret cache: TTL, negative caching, stale-if-error, bounded size, single flight.

States of one entry (key: secret id and field, compared exactly: ids that differ
in case or in one trailing character are two entries and two store calls)::

    fresh ──ttl──▶ expired ──fetch ok──▶ fresh
                      │
                      ├─ not found, or another secret ─▶ negative (for negative_ttl)
                      └─ store error ─▶ stale: served, retried every STALE_RETRY_SECONDS,
                                         until stale_if_error_seconds past expiry

A warm lookup is a dict get and a clock read; only a miss awaits the store, and
concurrent misses for one key share one store call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sidecar import metrics
from sidecar.config import CacheSettings
from sidecar.errors import NoCredential, SecretStoreUnavailable
from sidecar.secrets.base import Secret, SecretBackend, SecretNotFound, StoreError, extract

log = logging.getLogger("sidecar.secrets.cache")

#: While serving stale values, how long until the store is tried again. Without
#: it every request in an outage would wait for a failing store call.
STALE_RETRY_SECONDS = 5.0
#: At most one "serving stale" warning per this many seconds.
STALE_WARNING_INTERVAL = 30.0
#: After an upstream refused a value and the store still returned that same value,
#: further refusals of it do not go to the store for this long (a revoked key
#: must not turn every request into a store call).
REJECTED_BACKOFF_SECONDS = 30.0

CacheKey = tuple[str, str | None]

_LOOKUPS = {result: metrics.SECRET_LOOKUPS.labels(result) for result in ("hit", "miss", "stale", "negative", "error")}


def _no_credential(reason: str, lookup: str) -> NoCredential:
    """The refusal, carrying the cache outcome for the access log (same word as the metric)."""
    err = NoCredential(reason=reason)
    err.lookup = lookup
    return err


@dataclass(slots=True)
class _Entry:
    secret: Secret | None  # None: the store said there is no such secret
    fresh_until: float
    stale_until: float
    stale: bool = False
    reason: str = "not_found"
    rejected_until: float = 0.0


class SecretCache:
    """Front of a SecretBackend; ``get`` returns the Secret and the cache outcome."""

    def __init__(
        self,
        backend: SecretBackend,
        settings: CacheSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._inflight: dict[CacheKey, asyncio.Task[_Entry]] = {}
        self._fetch_duration = metrics.SECRET_FETCH_DURATION.labels(backend.name)
        self._last_stale_warning = -STALE_WARNING_INTERVAL
        self.store_calls = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(
        self, secret_id: str, field: str | None = None, key_wait: Callable[[int], None] | None = None
    ) -> tuple[Secret, str]:
        """The secret for ``secret_id`` (and ``field``), and hit/miss/stale/negative.

        ``key_wait(1)`` is called before waiting for the store and ``key_wait(-1)`` when
        the wait ends, however it ends (the proxy's upstream opens connections meanwhile).
        """
        key = (secret_id, field)
        entry = self._entries.get(key)
        if entry is not None and self._clock() < entry.fresh_until:
            self._entries.move_to_end(key)
            result = "hit" if entry.secret is not None else "negative"
        else:
            if key_wait is not None:
                key_wait(1)
            try:
                entry = await self._load(key)
            except SecretStoreUnavailable as err:
                metrics.bump(_LOOKUPS["error"])
                err.lookup = "error"  # the access log's cache word, as for NoCredential
                raise
            finally:
                if key_wait is not None:
                    key_wait(-1)
            result = "miss"
        if entry.stale:
            result = "stale"
        metrics.bump(_LOOKUPS[result])
        if entry.secret is None:
            raise _no_credential(entry.reason, result)
        return entry.secret, result

    def invalidate(self, secret_id: str, field: str | None = None) -> None:
        """Forget one entry (an upstream refused its value)."""
        self._entries.pop((secret_id, field), None)
        metrics.SECRET_CACHE_ENTRIES.set(len(self._entries))

    async def refresh_rejected(self, secret_id: str, field: str | None, rejected: Secret) -> Secret | None:
        """An upstream refused ``rejected``: return a different current value, or None.

        The first refusal always asks the store again (a rotation is picked up at
        once); a value the store confirms unchanged is not asked about again for
        REJECTED_BACKOFF_SECONDS.
        """
        key = (secret_id, field)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and entry.secret is not None and not entry.secret == rejected:
            return entry.secret  # another request already fetched the rotated value
        if entry is not None and entry.rejected_until > now:
            return None
        try:
            fresh = await self._load(key)  # keeps the old entry for stale-if-error
        except SecretStoreUnavailable:
            return None
        if fresh.secret is None or fresh.stale:
            return None
        if fresh.secret == rejected:
            fresh.rejected_until = now + REJECTED_BACKOFF_SECONDS
            return None
        return fresh.secret

    def clear(self) -> None:
        """Forget everything (the file backend's contents changed)."""
        self._entries.clear()
        metrics.SECRET_CACHE_ENTRIES.set(0)

    async def _load(self, key: CacheKey) -> _Entry:
        """One store call per key at a time; every caller awaits the same task.

        The fetch runs in its own task so that a caller going away (a cancelled
        request) cannot cancel the lookup the other callers are waiting for.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._fetch_done(key, done))
        return await asyncio.shield(task)

    def _fetch_done(self, key: CacheKey, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone away

    async def _fetch(self, key: CacheKey) -> _Entry:
        secret_id, field = key
        s = self.settings
        started = time.perf_counter()
        self.store_calls += 1
        try:
            raw = await self.backend.fetch(secret_id)
        except SecretNotFound as missing:
            # Also a SecretMismatch (the store answered with another secret): negatively
            # cached like a missing one, since the store reads that id the same way again.
            now = self._clock()
            entry = _Entry(None, now + s.negative_ttl_seconds, now + s.negative_ttl_seconds, reason=missing.reason)
            self._store(key, entry)
            return entry
        except StoreError as exc:
            # Every backend's failure passes here. Whatever library error it was raised
            # inside (a decode error holding the stored bytes, say) stops here too: the
            # refusal raised next would otherwise carry it along as context.
            exc.__context__ = None
            metrics.SECRET_STORE_ERRORS.labels(self.backend.name, exc.kind).inc()
            return self._on_store_error(key, exc)
        finally:
            self._fetch_duration.observe(time.perf_counter() - started)
        now = self._clock()
        try:
            secret = extract(raw, field)
        except NoCredential as unusable:  # not "exc": mypyc types a name by its first binding (StoreError)
            log.warning(
                "stored secret cannot be used",
                extra={"secret_id": secret_id, "reason": unusable.reason},
            )
            entry = _Entry(None, now + s.negative_ttl_seconds, now + s.negative_ttl_seconds, reason=unusable.reason)
            self._store(key, entry)
            return entry
        fresh_until = now + s.ttl_seconds
        entry = _Entry(secret, fresh_until, fresh_until + s.stale_if_error_seconds)
        self._store(key, entry)
        return entry

    def _on_store_error(self, key: CacheKey, exc: StoreError) -> _Entry:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and entry.secret is not None and now < entry.stale_until:
            entry.stale = True
            entry.fresh_until = min(now + STALE_RETRY_SECONDS, entry.stale_until)
            if now - self._last_stale_warning >= STALE_WARNING_INTERVAL:
                self._last_stale_warning = now
                log.warning(
                    "secret store failing; serving cached values past their TTL",
                    extra={"kind": exc.kind, "stale_entries": self._count_stale()},
                )
            return entry
        log.error("secret store failed and nothing usable is cached", extra={"kind": exc.kind})
        raise SecretStoreUnavailable(reason=exc.kind) from None

    def _count_stale(self) -> int:
        return sum(1 for e in self._entries.values() if e.stale)

    def _store(self, key: CacheKey, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)
        metrics.SECRET_CACHE_ENTRIES.set(len(self._entries))
