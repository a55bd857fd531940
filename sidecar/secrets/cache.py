"""The secret cache: TTL, stale-while-revalidate, negative caching, stale-if-error, bounded size, single flight.

States of one entry (key: secret id and field, compared exactly: ids that differ
in case or in one trailing character are two entries and two store calls)::

    fresh ──ttl──▶ expired: served at once ("stale"), one refresh in the background
                      │
                      ├─ refresh ok ─▶ fresh (the new value)
                      ├─ not found, or another secret ─▶ negative (for negative_ttl)
                      ├─ scheduled for deletion ─▶ dropped (refused, not remembered)
                      └─ store error ─▶ still served, refresh retried every STALE_RETRY_SECONDS,
                                         until stale_if_error_seconds past expiry

A warm lookup is a dict get and a clock read. Only a lookup with nothing usable in
memory (no entry, an expired "not found", a value past its stale window) awaits the
store, concurrent ones for one key share one store call, and that wait ends within
``secrets.lookup_timeout_seconds`` whatever the backend does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sidecar import metrics
from sidecar.config import DEFAULT_LOOKUP_TIMEOUT_SECONDS, CacheSettings
from sidecar.errors import NoCredential, SecretStoreUnavailable
from sidecar.secrets.base import RawSecret, Secret, SecretBackend, SecretNotFound, StoreError, extract

log = logging.getLogger("sidecar.secrets.cache")

#: After a background refresh failed, how long until the next one may start. Without
#: it a failing store would get one call per key back to back for the whole outage.
STALE_RETRY_SECONDS = 5.0
#: At most one "serving stale" warning per this many seconds.
STALE_WARNING_INTERVAL = 30.0
#: After an upstream refused a value and the store still returned that same value,
#: further refusals of it do not go to the store for this long (a revoked key
#: must not turn every request into a store call).
REJECTED_BACKOFF_SECONDS = 30.0
#: Background refreshes in flight at once, over all keys. A store that hangs holds
#: each one for lookup_timeout_seconds; past this many, expired values are served
#: without starting another (a later request starts it), so refreshes never take
#: every store connection or thread from lookups that have nothing to serve.
MAX_BACKGROUND_REFRESHES = 4

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
    stale_until: float  # a value is served until then, past fresh_until only while refreshed
    refresh_after: float  # no background refresh starts before this
    failing: bool = False  # the last refresh of this value failed
    reason: str = "not_found"
    rejected_until: float = 0.0


def _drop_outcome(task: asyncio.Task[RawSecret]) -> None:
    """A backend call nobody awaits any more: its outcome is dropped (retrieved, so never logged)."""
    if not task.cancelled():
        task.exception()


class SecretCache:
    """Front of a SecretBackend; ``get`` returns the Secret and the cache outcome."""

    def __init__(
        self,
        backend: SecretBackend,
        settings: CacheSettings,
        clock: Callable[[], float] = time.monotonic,
        lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT_SECONDS,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.lookup_timeout = lookup_timeout
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._inflight: dict[CacheKey, asyncio.Task[_Entry]] = {}
        self._refreshing = 0  # background refreshes in flight
        self._fetch_duration = metrics.SECRET_FETCH_DURATION.labels(backend.name)
        self._refresh_duration = metrics.SECRET_REFRESH_DURATION.labels(backend.name)
        self._last_stale_warning = -STALE_WARNING_INTERVAL
        self.store_calls = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        """Store calls under way (lookups and background refreshes)."""
        return len(self._inflight)

    async def get(
        self,
        secret_id: str,
        field: str | None = None,
        key_wait: Callable[[str, int], None] | None = None,
        caller: str = "",
    ) -> tuple[Secret, str]:
        """The secret for ``secret_id`` (and ``field``), and hit/miss/stale/negative.

        A value past its TTL is returned at once ("stale") while one background refresh
        runs; only a lookup with nothing usable cached waits for the store, at most
        ``lookup_timeout`` seconds. ``key_wait(caller, 1)`` is called before that wait and
        ``key_wait(caller, -1)`` when it ends, however it ends (the proxy's upstream opens
        connections for that caller meanwhile); never when nothing is awaited. ``caller``
        is passed through as it is, so a warm lookup builds nothing for it.
        """
        key = (secret_id, field)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and now < entry.fresh_until:
            self._entries.move_to_end(key)
            result = "hit" if entry.secret is not None else "negative"
        elif entry is not None and entry.secret is not None and now < entry.stale_until:
            # Past its TTL: served as it is; the store is asked behind this request.
            self._entries.move_to_end(key)
            if now >= entry.refresh_after:
                self._refresh(key)
            result = "stale"
        else:
            if key_wait is not None:
                key_wait(caller, 1)
            try:
                entry = await self._load(key)
            except SecretStoreUnavailable as err:
                metrics.bump(_LOOKUPS["error"])
                err.lookup = "error"  # the access log's cache word, as for NoCredential
                raise
            finally:
                if key_wait is not None:
                    key_wait(caller, -1)
            result = "stale" if entry.failing else "miss"
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
        once), waiting at most ``lookup_timeout``; a value the store confirms unchanged
        is not asked about again for REJECTED_BACKOFF_SECONDS.
        """
        key = (secret_id, field)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and entry.secret is not None and not entry.secret == rejected:
            return entry.secret  # another request already fetched the rotated value
        if entry is not None and entry.rejected_until > now:
            return None
        joined = key in self._inflight
        try:
            fresh = await self._load(key)  # keeps the old entry for stale-if-error
            if joined and not fresh.failing and fresh.secret is not None and fresh.secret == rejected:
                # The read joined began before the upstream refused this value (a background
                # refresh, say): it may predate a rotation. One read that starts now decides.
                fresh = await self._load(key)
        except SecretStoreUnavailable:
            return None
        if fresh.secret is None or fresh.failing:
            return None
        if fresh.secret == rejected:
            fresh.rejected_until = now + REJECTED_BACKOFF_SECONDS
            return None
        return fresh.secret

    def clear(self) -> None:
        """Forget everything (the file backend's contents changed)."""
        self._entries.clear()
        metrics.SECRET_CACHE_ENTRIES.set(0)

    def close(self) -> None:
        """Cancel the store calls in flight (the sidecar stops, or a reload replaced this cache)."""
        for task in list(self._inflight.values()):
            task.cancel()

    def _refresh(self, key: CacheKey) -> None:
        """Start one background refresh of ``key`` unless one runs or too many do.

        It belongs to no request: a request that goes away does not cancel it, and the
        requests that arrive meanwhile are served the old value without waiting.
        """
        if key in self._inflight or self._refreshing >= MAX_BACKGROUND_REFRESHES:
            return
        self._refreshing += 1
        task = self._start(key, background=True)
        task.add_done_callback(self._refresh_done)

    def _refresh_done(self, task: asyncio.Task[_Entry]) -> None:
        self._refreshing -= 1

    async def _load(self, key: CacheKey) -> _Entry:
        """One store call per key at a time; every caller awaits the same task.

        The fetch runs in its own task so that a caller going away (a cancelled
        request) cannot cancel the lookup the other callers are waiting for.
        """
        task = self._inflight.get(key)
        if task is None:
            task = self._start(key, background=False)
        return await asyncio.shield(task)

    def _start(self, key: CacheKey, background: bool) -> asyncio.Task[_Entry]:
        task = asyncio.get_running_loop().create_task(self._fetch(key, background))
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._fetch_done(key, done))
        return task

    def _fetch_done(self, key: CacheKey, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone away

    async def _call_store(self, secret_id: str) -> RawSecret:
        """The backend's answer, or StoreError("timeout") once ``lookup_timeout`` has passed.

        The bound holds for every backend, whatever its own timeouts and retries: the
        call runs in a task that is abandoned (cancelled, its outcome dropped) when
        time is up, so even a backend that ignored cancellation could not hold the
        lookup longer.
        """
        call = asyncio.get_running_loop().create_task(self.backend.fetch(secret_id))
        try:
            done, _ = await asyncio.wait((call,), timeout=self.lookup_timeout)
        finally:
            if not call.done():
                call.cancel()
                call.add_done_callback(_drop_outcome)
        if not done:
            raise StoreError("timeout", f"no answer within lookup_timeout_seconds ({self.lookup_timeout:g} s)")
        return call.result()

    async def _fetch(self, key: CacheKey, background: bool) -> _Entry:
        started = time.perf_counter()
        self.store_calls += 1
        outcome = "error"
        try:
            entry = await self._fetch_entry(key)
            # failing: the store failed and the old value is kept (stale-if-error)
            outcome = "error" if entry.failing else "ok" if entry.secret is not None else "missing"
            return entry
        finally:
            elapsed = time.perf_counter() - started
            self._fetch_duration.observe(elapsed)
            if background:
                self._refresh_duration.observe(elapsed)
                metrics.SECRET_REFRESHES.labels(outcome).inc()

    async def _fetch_entry(self, key: CacheKey) -> _Entry:
        secret_id, field = key
        s = self.settings
        try:
            raw = await self._call_store(secret_id)
        except SecretNotFound as missing:
            # Also a SecretMismatch (the store answered with another secret): negatively
            # cached like a missing one, since the store reads that id the same way again.
            # A secret scheduled for deletion is refused too, but not remembered: it can
            # be restored any moment. Either way an old value for it is not served again.
            now = self._clock()
            until = now + s.negative_ttl_seconds if missing.negative_cacheable else now
            entry = _Entry(None, until, until, until, reason=missing.reason)
            if missing.negative_cacheable:
                self._store(key, entry)
            else:
                self.invalidate(secret_id, field)
            return entry
        except StoreError as exc:
            # Every backend's failure passes here. Whatever library error it was raised
            # inside (a decode error holding the stored bytes, say) stops here too: the
            # refusal raised next would otherwise carry it along as context.
            exc.__context__ = None
            metrics.SECRET_STORE_ERRORS.labels(self.backend.name, exc.kind).inc()
            return self._on_store_error(key, exc)
        now = self._clock()
        try:
            secret = extract(raw, field)
        except NoCredential as unusable:  # not "exc": mypyc types a name by its first binding (StoreError)
            log.warning(
                "stored secret cannot be used",
                extra={"secret_id": secret_id, "reason": unusable.reason},
            )
            until = now + s.negative_ttl_seconds
            entry = _Entry(None, until, until, until, reason=unusable.reason)
            self._store(key, entry)
            return entry
        fresh_until = now + s.ttl_seconds
        entry = _Entry(secret, fresh_until, fresh_until + s.stale_if_error_seconds, fresh_until)
        self._store(key, entry)
        return entry

    def _on_store_error(self, key: CacheKey, exc: StoreError) -> _Entry:
        """The entry to keep serving, or SecretStoreUnavailable when nothing usable is left.

        Judged when the store call ended: a request that arrived inside the stale window
        was served at once and never waits here; one that arrived after it waits for
        this call, and gets the old value only if the window is still open.
        """
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and entry.secret is not None and now < entry.stale_until:
            entry.failing = True
            entry.refresh_after = now + STALE_RETRY_SECONDS
            if now - self._last_stale_warning >= STALE_WARNING_INTERVAL:
                self._last_stale_warning = now
                log.warning(
                    "secret store failing; serving cached values past their TTL",
                    extra={"kind": exc.kind, "stale_entries": self._count_failing()},
                )
            return entry
        log.error("secret store failed and nothing usable is cached", extra={"kind": exc.kind})
        raise SecretStoreUnavailable(reason=exc.kind) from None

    def _count_failing(self) -> int:
        return sum(1 for e in self._entries.values() if e.failing)

    def _store(self, key: CacheKey, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)
        metrics.SECRET_CACHE_ENTRIES.set(len(self._entries))
