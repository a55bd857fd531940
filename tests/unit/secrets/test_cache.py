"""The secret cache: TTL, stale-while-revalidate, negative caching, stale-if-error, the lookup
bound, bounded size and single flight.

Time is a fake clock the tests move by hand (the lookup bound alone is real time, kept
short); the backend is an in-test class whose fetch can be held open with an
``asyncio.Event`` so concurrency is deterministic.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from sidecar.config import CacheSettings
from sidecar.errors import NoCredential, SecretStoreUnavailable
from sidecar.metrics import REGISTRY, apply_pending
from sidecar.secrets.base import RawSecret, Secret, SecretBackend, SecretNotFound, SecretPendingDeletion, StoreError
from sidecar.secrets.cache import MAX_BACKGROUND_REFRESHES, STALE_RETRY_SECONDS, SecretCache
from tests.support.leaks import make_secret

TTL = 60.0
NEGATIVE_TTL = 10.0
STALE_IF_ERROR = 120.0


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """Implements SecretBackend; values, failures and a gate are set by the test."""

    name = "fake"

    def __init__(self, values: Mapping[str, RawSecret] | None = None) -> None:
        self.values: dict[str, RawSecret] = dict(values or {})
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.calls: list[str] = []
        self.waiting = 0
        self.on_change: Callable[[], None] | None = None
        #: read the value when the call starts, not when the gate opens (a store read in flight)
        self.read_before_gate = False

    async def start(self) -> None:
        pass

    async def fetch(self, secret_id: str) -> RawSecret:
        self.calls.append(secret_id)
        early = self.values.get(secret_id) if self.read_before_gate else None
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        if self.error is not None:
            raise self.error
        value = early if self.read_before_gate else self.values.get(secret_id)
        if value is None:
            raise SecretNotFound(secret_id)
        return value

    async def close(self) -> None:
        pass


def make_cache(
    backend: FakeBackend,
    clock: FakeClock,
    *,
    ttl: float = TTL,
    negative_ttl: float = NEGATIVE_TTL,
    stale_if_error: float = STALE_IF_ERROR,
    max_entries: int = 100,
    lookup_timeout: float = 5.0,
) -> SecretCache:
    settings = CacheSettings(
        ttl_seconds=ttl,
        negative_ttl_seconds=negative_ttl,
        stale_if_error_seconds=stale_if_error,
        max_entries=max_entries,
    )
    store: SecretBackend = backend  # the in-test class satisfies the protocol (checked by mypy)
    return SecretCache(store, settings, clock=clock, lookup_timeout=lookup_timeout)


def lookups(result: str) -> float:
    apply_pending()  # hot-path counts are applied in batches
    return REGISTRY.get_sample_value("sidecar_secret_lookups_total", {"result": result}) or 0.0


def refreshes(result: str) -> float:
    return REGISTRY.get_sample_value("sidecar_secret_refreshes_total", {"result": result}) or 0.0


def store_errors(kind: str) -> float:
    return REGISTRY.get_sample_value("sidecar_secret_store_errors_total", {"backend": "fake", "kind": kind}) or 0.0


async def bounded(awaitable: Any, seconds: float = 5.0) -> Any:
    """``awaitable``'s result; a wait for a store the test holds shut fails instead of hanging."""
    return await asyncio.wait_for(awaitable, seconds)


async def settled(cache: SecretCache) -> None:
    """Let background refreshes (and every other store call) finish."""
    await until(lambda: cache.in_flight == 0)


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (no wall-clock sleeps)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def alice() -> str:
    return make_secret("cache-alice")


@pytest.fixture
def backend(alice: str) -> FakeBackend:
    return FakeBackend({"mcp/polygon/alice": alice})


# ------------------------------------------------------------------ hit, miss, TTL


async def test_miss_then_hit(backend: FakeBackend, clock: FakeClock, alice: str) -> None:
    cache = make_cache(backend, clock)
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (alice, "miss")
    clock.advance(TTL - 1)
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (alice, "hit")
    assert backend.calls == ["mcp/polygon/alice"]
    assert len(cache) == 1


async def test_key_wait_brackets_the_store_call_and_never_runs_on_a_hit(backend: FakeBackend, clock: FakeClock) -> None:
    """The proxy warms upstream connections while requests wait for the store (key_wait +1),
    and must hear when each wait ends, however it ends (-1): a wait never settled would keep
    the pool warming for requests that will never come."""
    events: list[str] = []
    cache = make_cache(backend, clock)

    def key_wait(caller: str, delta: int) -> None:
        events.append(f"{caller} {delta:+d} with {len(backend.calls)} store calls made")

    await cache.get("mcp/polygon/alice", key_wait=key_wait, caller="alice")
    await cache.get("mcp/polygon/alice", key_wait=key_wait, caller="alice")  # a hit: no wait
    assert events == ["alice +1 with 0 store calls made", "alice -1 with 1 store calls made"]
    clock.advance(TTL + 1)
    assert (await cache.get("mcp/polygon/alice", key_wait=key_wait, caller="alice"))[1] == "stale"
    assert len(events) == 2  # served at once, refreshed behind the request: no wait
    await settled(cache)
    clock.advance(TTL + STALE_IF_ERROR)
    await cache.get("mcp/polygon/alice", key_wait=key_wait, caller="alice")  # past the stale window: waits
    assert len(events) == 4

    events.clear()
    with pytest.raises(NoCredential):
        await cache.get("mcp/polygon/nobody", key_wait=key_wait, caller="alice")  # not in the store
    backend.error = StoreError("throttled")
    with pytest.raises(SecretStoreUnavailable):
        await cache.get("mcp/polygon/bob", key_wait=key_wait, caller="alice")  # the store fails, nothing cached
    assert [e.split()[1] for e in events] == ["+1", "-1", "+1", "-1"]


async def test_secret_does_not_print_itself(backend: FakeBackend, clock: FakeClock, alice: str) -> None:
    secret, _ = await make_cache(backend, clock).get("mcp/polygon/alice")
    assert alice not in repr(secret)
    assert alice not in str(secret)
    assert alice not in f"{secret}"


async def test_ttl_expiry_refetches_the_new_value(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    rotated = make_secret("cache-rotated")
    backend.values["mcp/polygon/alice"] = rotated
    clock.advance(TTL - 0.001)
    assert (await cache.get("mcp/polygon/alice"))[1] == "hit"
    clock.advance(0.001)
    secret, result = await cache.get("mcp/polygon/alice")
    assert result == "stale"  # the old value at once, the new one asked for behind it
    assert secret.reveal() != rotated
    await settled(cache)
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (rotated, "hit")
    assert len(backend.calls) == 2


async def test_ids_and_fields_are_cached_separately(clock: FakeClock) -> None:
    a, b = make_secret("cache-a"), make_secret("cache-b")
    backend = FakeBackend({"a": a, "obj": {"k1": a, "k2": b}})
    cache = make_cache(backend, clock)
    assert (await cache.get("a"))[0].reveal() == a
    assert (await cache.get("obj", "k1"))[0].reveal() == a
    assert (await cache.get("obj", "k2"))[0].reveal() == b
    assert (await cache.get("obj", "k2"))[1] == "hit"
    assert backend.calls == ["a", "obj", "obj"]


# ------------------------------------------------------------------ single flight


async def test_single_flight_50_concurrent_callers(backend: FakeBackend, clock: FakeClock, alice: str) -> None:
    backend.gate = asyncio.Event()
    cache = make_cache(backend, clock)
    tasks = [asyncio.create_task(cache.get("mcp/polygon/alice")) for _ in range(50)]
    await until(lambda: backend.waiting == 1)
    await asyncio.sleep(0)
    assert not any(t.done() for t in tasks)  # all 50 are really waiting together
    backend.gate.set()
    results = await asyncio.gather(*tasks)
    assert backend.calls == ["mcp/polygon/alice"]
    assert cache.store_calls == 1
    assert {secret.reveal() for secret, _ in results} == {alice}
    assert {result for _, result in results} == {"miss"}
    # And the value is cached for the next one.
    assert (await cache.get("mcp/polygon/alice"))[1] == "hit"
    assert len(backend.calls) == 1


async def test_single_flight_of_a_missing_secret(backend: FakeBackend, clock: FakeClock) -> None:
    backend.gate = asyncio.Event()
    cache = make_cache(backend, clock)
    tasks = [asyncio.create_task(cache.get("mcp/polygon/nobody")) for _ in range(50)]
    await until(lambda: backend.waiting == 1)
    backend.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert backend.calls == ["mcp/polygon/nobody"]
    assert all(isinstance(r, NoCredential) for r in results), results


async def test_single_flight_of_a_store_error(backend: FakeBackend, clock: FakeClock) -> None:
    backend.gate = asyncio.Event()
    backend.error = StoreError("throttled", "ThrottlingException")
    cache = make_cache(backend, clock)
    tasks = [asyncio.create_task(cache.get("mcp/polygon/alice")) for _ in range(20)]
    await until(lambda: backend.waiting == 1)
    backend.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(backend.calls) == 1
    assert all(isinstance(r, SecretStoreUnavailable) for r in results), results
    assert {r.reason for r in results if isinstance(r, SecretStoreUnavailable)} == {"throttled"}


async def test_distinct_ids_are_fetched_concurrently(clock: FakeClock) -> None:
    values = {f"id{i}": make_secret(f"cache-id{i}") for i in range(3)}
    backend = FakeBackend(values)
    backend.gate = asyncio.Event()
    cache = make_cache(backend, clock)
    tasks = [asyncio.create_task(cache.get(k)) for k in values]
    await until(lambda: backend.waiting == 3)  # one lookup does not block another
    backend.gate.set()
    got = await asyncio.gather(*tasks)
    assert [s.reveal() for s, _ in got] == list(values.values())


async def test_cancelling_the_first_caller_does_not_fail_the_others(
    backend: FakeBackend, clock: FakeClock, alice: str
) -> None:
    backend.gate = asyncio.Event()
    cache = make_cache(backend, clock)
    first = asyncio.create_task(cache.get("mcp/polygon/alice"))
    await until(lambda: backend.waiting == 1)
    second = asyncio.create_task(cache.get("mcp/polygon/alice"))
    await asyncio.sleep(0)
    first.cancel()  # e.g. the app that sent the first request went away
    await asyncio.sleep(0)
    backend.gate.set()
    try:
        secret, _ = await second
    except asyncio.CancelledError:
        pytest.fail("a caller that was not cancelled got CancelledError")
    assert secret.reveal() == alice


# ------------------------------------------------------------------ negative caching


async def test_negative_ttl(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    with pytest.raises(NoCredential):
        await cache.get("mcp/polygon/bob")
    bob = make_secret("cache-bob")
    backend.values["mcp/polygon/bob"] = bob
    clock.advance(NEGATIVE_TTL - 0.001)
    with pytest.raises(NoCredential):
        await cache.get("mcp/polygon/bob")
    assert backend.calls == ["mcp/polygon/bob"]  # remembered, not asked again
    clock.advance(0.001)
    secret, result = await cache.get("mcp/polygon/bob")
    assert (secret.reveal(), result) == (bob, "miss")
    assert len(backend.calls) == 2


async def test_negative_entry_counts_as_negative(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    before_miss, before_negative = lookups("miss"), lookups("negative")
    with pytest.raises(NoCredential):
        await cache.get("mcp/polygon/nobody")
    with pytest.raises(NoCredential):
        await cache.get("mcp/polygon/nobody")
    assert lookups("miss") == before_miss + 1
    assert lookups("negative") == before_negative + 1


# ------------------------------------------------------------------ stale-if-error


async def test_stale_if_error_serves_the_expired_value(backend: FakeBackend, clock: FakeClock, alice: str) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    backend.error = StoreError("unavailable", "ServiceUnavailable")
    clock.advance(TTL + 1)
    before = lookups("stale")
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (alice, "stale")
    await settled(cache)
    secret, result = await cache.get("mcp/polygon/alice")  # the refresh failed: still served
    assert (secret.reveal(), result) == (alice, "stale")
    assert lookups("stale") == before + 2
    assert len(backend.calls) == 2


async def test_stale_retry_interval_spares_the_failing_store(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    backend.error = StoreError("timeout")
    clock.advance(TTL + 1)
    assert (await cache.get("mcp/polygon/alice"))[1] == "stale"
    await settled(cache)
    calls = len(backend.calls)
    for _ in range(20):
        clock.advance((STALE_RETRY_SECONDS - 0.01) / 20)
        assert (await cache.get("mcp/polygon/alice"))[1] == "stale"
    assert len(backend.calls) == calls  # not one store call per request
    clock.advance(0.02)
    assert (await cache.get("mcp/polygon/alice"))[1] == "stale"
    await settled(cache)
    assert len(backend.calls) == calls + 1  # tried again after the retry interval


async def test_store_recovery_replaces_the_stale_value(backend: FakeBackend, clock: FakeClock, alice: str) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    backend.error = StoreError("timeout")
    clock.advance(TTL + 1)
    assert (await cache.get("mcp/polygon/alice"))[1] == "stale"
    await settled(cache)
    rotated = make_secret("cache-recovered")
    backend.values["mcp/polygon/alice"] = rotated
    backend.error = None
    clock.advance(STALE_RETRY_SECONDS)
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (alice, "stale")  # this one starts the refresh
    await settled(cache)
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (rotated, "hit")


async def test_stale_ends_after_stale_if_error_seconds(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    expired_at = clock.now + TTL
    backend.error = StoreError("unreachable")
    clock.now = expired_at + STALE_IF_ERROR - 0.01
    assert (await cache.get("mcp/polygon/alice"))[1] == "stale"
    clock.now = expired_at + STALE_IF_ERROR
    before = lookups("error")
    with pytest.raises(SecretStoreUnavailable) as info:
        await cache.get("mcp/polygon/alice")
    assert info.value.reason == "unreachable"
    assert lookups("error") == before + 1


async def test_store_error_with_nothing_cached(backend: FakeBackend, clock: FakeClock) -> None:
    backend.error = StoreError("access_denied", "AccessDeniedException")
    cache = make_cache(backend, clock)
    before_errors, before_lookups = store_errors("access_denied"), lookups("error")
    with pytest.raises(SecretStoreUnavailable) as info:
        await cache.get("mcp/polygon/alice")
    assert info.value.status == 503
    assert info.value.code == "secret_store_unavailable"
    assert info.value.reason == "access_denied"
    assert store_errors("access_denied") == before_errors + 1
    assert lookups("error") == before_lookups + 1
    # Errors are not cached: the next request asks the store again.
    backend.error = None
    assert (await cache.get("mcp/polygon/alice"))[1] == "miss"


async def test_store_error_after_negative_entry_is_unavailable(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    with pytest.raises(NoCredential):
        await cache.get("mcp/polygon/nobody")
    clock.advance(NEGATIVE_TTL)
    backend.error = StoreError("timeout")
    with pytest.raises(SecretStoreUnavailable):
        await cache.get("mcp/polygon/nobody")


async def test_zero_stale_if_error_disables_stale(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock, stale_if_error=0)
    await cache.get("mcp/polygon/alice")
    backend.error = StoreError("timeout")
    clock.advance(TTL)
    with pytest.raises(SecretStoreUnavailable):
        await cache.get("mcp/polygon/alice")


# ------------------------------------------------------------------ stale-while-revalidate


async def test_expired_value_is_served_while_one_background_refresh_runs(
    backend: FakeBackend, clock: FakeClock, alice: str
) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    backend.gate = asyncio.Event()  # the store now hangs until the test lets it answer
    rotated = make_secret("cache-swr-new")
    backend.values["mcp/polygon/alice"] = rotated
    clock.advance(TTL + 1)
    waits: list[int] = []
    for _ in range(50):  # none of these awaits the store, and they make one call between them
        secret, result = await bounded(
            cache.get("mcp/polygon/alice", key_wait=lambda _caller, delta: waits.append(delta))
        )
        assert (secret.reveal(), result) == (alice, "stale")
    assert waits == []
    await until(lambda: backend.waiting == 1)
    assert len(backend.calls) == 2
    backend.gate.set()
    await settled(cache)
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (rotated, "hit")


async def test_the_background_refresh_outlives_the_request_that_started_it(
    backend: FakeBackend, clock: FakeClock
) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    backend.gate = asyncio.Event()
    clock.advance(TTL + 1)
    assert (await bounded(cache.get("mcp/polygon/alice")))[1] == "stale"  # answered, and gone
    await until(lambda: backend.waiting == 1)
    rotated = make_secret("cache-swr-outlived")
    backend.values["mcp/polygon/alice"] = rotated
    backend.gate.set()
    await settled(cache)
    assert (await cache.get("mcp/polygon/alice"))[0].reveal() == rotated


async def test_a_request_inside_the_stale_window_is_served_even_if_the_window_closes_meanwhile(
    backend: FakeBackend, clock: FakeClock, alice: str
) -> None:
    """Issue 17: a request that arrived inside the window waited for the store, the window
    closed during the wait, and it got 503. Now it is served on arrival; only a request that
    arrives after the window waits (for the refresh under way) and gets its outcome."""
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    end_of_window = clock.now + TTL + STALE_IF_ERROR
    backend.error = StoreError("timeout")
    backend.gate = asyncio.Event()
    clock.now = end_of_window - 0.01
    secret, result = await bounded(cache.get("mcp/polygon/alice"))
    assert (secret.reveal(), result) == (alice, "stale")
    await until(lambda: backend.waiting == 1)
    clock.now = end_of_window + 1  # the refresh outlives the window
    late = asyncio.create_task(cache.get("mcp/polygon/alice"))
    await asyncio.sleep(0)
    assert not late.done()  # it waits for the refresh in flight: no second store call
    backend.gate.set()
    with pytest.raises(SecretStoreUnavailable):
        await late
    assert len(backend.calls) == 2


async def test_a_request_after_the_window_gets_the_value_if_the_refresh_under_way_succeeds(
    backend: FakeBackend, clock: FakeClock
) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    end_of_window = clock.now + TTL + STALE_IF_ERROR
    backend.gate = asyncio.Event()
    clock.now = end_of_window - 0.01
    await bounded(cache.get("mcp/polygon/alice"))  # starts the refresh
    clock.now = end_of_window + 1
    rotated = make_secret("cache-swr-late")
    backend.values["mcp/polygon/alice"] = rotated
    late = asyncio.create_task(cache.get("mcp/polygon/alice"))
    await until(lambda: backend.waiting == 1)
    backend.gate.set()
    secret, result = await late
    assert (secret.reveal(), result) == (rotated, "miss")
    assert len(backend.calls) == 2


async def test_background_refreshes_in_flight_are_bounded(clock: FakeClock) -> None:
    """A hung store holds each refresh for lookup_timeout_seconds: only a few may hang at
    once, so a client with nothing cached still gets a store call of its own."""
    values = {f"k{i}": make_secret(f"cache-bg-{i}") for i in range(MAX_BACKGROUND_REFRESHES + 3)}
    backend = FakeBackend(values)
    cache = make_cache(backend, clock)
    for key in values:
        await cache.get(key)
    backend.gate = asyncio.Event()
    clock.advance(TTL + 1)
    for key in values:
        assert (await bounded(cache.get(key)))[1] == "stale"
    await until(lambda: backend.waiting == MAX_BACKGROUND_REFRESHES)
    backend.values["cold"] = make_secret("cache-bg-cold")
    cold = asyncio.create_task(cache.get("cold"))
    await until(lambda: backend.waiting == MAX_BACKGROUND_REFRESHES + 1)
    backend.gate.set()
    assert (await cold)[1] == "miss"
    await settled(cache)
    # The ones left out start with their next request.
    for key in values:
        await cache.get(key)
    await settled(cache)
    assert len(backend.calls) == 2 * len(values) + 1


async def test_zero_ttl_serves_the_last_value_and_refreshes_every_time(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock, ttl=0)
    assert (await cache.get("mcp/polygon/alice"))[1] == "miss"
    for n in range(3):
        assert (await cache.get("mcp/polygon/alice"))[1] == "stale"
        await settled(cache)
        assert len(backend.calls) == n + 2


async def test_refresh_metrics(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    await cache.get("mcp/polygon/alice")
    before = {r: refreshes(r) for r in ("ok", "error", "missing")}
    durations = REGISTRY.get_sample_value("sidecar_secret_refresh_duration_seconds_count", {"backend": "fake"}) or 0.0
    clock.advance(TTL + 1)
    await cache.get("mcp/polygon/alice")
    await settled(cache)  # ok
    backend.error = StoreError("timeout")
    clock.advance(TTL + 1)
    await cache.get("mcp/polygon/alice")
    await settled(cache)  # error
    backend.error = None
    del backend.values["mcp/polygon/alice"]
    clock.advance(STALE_RETRY_SECONDS)
    await cache.get("mcp/polygon/alice")
    await settled(cache)  # missing
    assert {r: refreshes(r) - before[r] for r in before} == {"ok": 1, "error": 1, "missing": 1}
    after = REGISTRY.get_sample_value("sidecar_secret_refresh_duration_seconds_count", {"backend": "fake"})
    assert after == durations + 3
    with pytest.raises(NoCredential):  # the missing answer replaced the old value
        await cache.get("mcp/polygon/alice")


# ------------------------------------------------------------------ the lookup bound


class HangingBackend(FakeBackend):
    """While ``hanging``, a store that never answers; with ``stubborn`` it even ignores cancellation."""

    def __init__(self, values: Mapping[str, RawSecret] | None = None, stubborn: bool = False) -> None:
        super().__init__(values)
        self.hanging = True
        self.stubborn = stubborn
        self.release = asyncio.Event()

    async def fetch(self, secret_id: str) -> RawSecret:
        if not self.hanging:
            return await super().fetch(secret_id)
        self.calls.append(secret_id)
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                if not self.stubborn:
                    raise
        raise StoreError("unreachable")


@pytest.mark.parametrize("stubborn", [False, True])
async def test_a_lookup_ends_within_lookup_timeout_whatever_the_backend_does(clock: FakeClock, stubborn: bool) -> None:
    backend = HangingBackend(stubborn=stubborn)
    cache = make_cache(backend, clock, lookup_timeout=0.2)
    before = store_errors("timeout")
    try:
        with pytest.raises(SecretStoreUnavailable) as info:
            await bounded(cache.get("mcp/polygon/alice"), 0.2 + 2)  # generous: a busy machine
        assert info.value.reason == "timeout"
        assert store_errors("timeout") == before + 1
        assert cache.in_flight == 0
    finally:
        backend.release.set()  # the abandoned call ends later; nobody hears of it
        await asyncio.sleep(0.01)


async def test_refresh_after_rejection_obeys_the_lookup_timeout(clock: FakeClock) -> None:
    alice = make_secret("cache-rej-bound")
    backend = HangingBackend({"a": alice})
    backend.hanging = False
    cache = make_cache(backend, clock, lookup_timeout=0.2)
    old, _ = await cache.get("a")
    backend.hanging = True
    try:
        assert await bounded(cache.refresh_rejected("a", None, old), 0.2 + 2) is None
        assert (await cache.get("a"))[0].reveal() == alice  # still served: the store failed, it did not say no
    finally:
        backend.release.set()


# ------------------------------------------------------------------ pending deletion


class DoomedBackend(FakeBackend):
    """Answers "scheduled for deletion" for the ids in ``doomed``."""

    def __init__(self, values: Mapping[str, RawSecret]) -> None:
        super().__init__(values)
        self.doomed: set[str] = set()

    async def fetch(self, secret_id: str) -> RawSecret:
        if secret_id in self.doomed:
            self.calls.append(secret_id)
            raise SecretPendingDeletion(secret_id)
        return await super().fetch(secret_id)


async def test_pending_deletion_is_refused_but_not_remembered(clock: FakeClock) -> None:
    alice = make_secret("cache-doomed")
    backend = DoomedBackend({"a": alice})
    backend.doomed.add("a")
    cache = make_cache(backend, clock)
    for _ in range(2):
        with pytest.raises(NoCredential) as info:
            await cache.get("a")
        assert (info.value.reason, info.value.lookup) == ("pending_deletion", "miss")
    assert len(backend.calls) == 2  # asked each time: not negatively cached
    backend.doomed.clear()  # restored
    secret, result = await cache.get("a")
    assert (secret.reveal(), result) == (alice, "miss")


async def test_a_cached_value_scheduled_for_deletion_stops_being_served(clock: FakeClock) -> None:
    alice = make_secret("cache-doomed-cached")
    backend = DoomedBackend({"a": alice})
    cache = make_cache(backend, clock)
    await cache.get("a")
    backend.doomed.add("a")
    clock.advance(TTL + 1)
    assert (await cache.get("a"))[1] == "stale"  # served once more while the refresh asks
    await settled(cache)
    with pytest.raises(NoCredential) as info:
        await cache.get("a")
    assert info.value.reason == "pending_deletion"


# ------------------------------------------------------------------ bounded size


async def test_max_entries_evicts_the_least_recently_used(clock: FakeClock) -> None:
    values = {k: make_secret(f"cache-lru-{k}") for k in ("a", "b", "c")}
    backend = FakeBackend(values)
    cache = make_cache(backend, clock, max_entries=2)
    await cache.get("a")
    await cache.get("b")
    assert (await cache.get("a"))[1] == "hit"  # a is now more recent than b
    await cache.get("c")  # evicts b
    assert len(cache) == 2
    assert (await cache.get("a"))[1] == "hit"
    assert (await cache.get("c"))[1] == "hit"
    assert (await cache.get("b"))[1] == "miss"
    assert backend.calls == ["a", "b", "c", "b"]
    assert len(cache) == 2
    assert REGISTRY.get_sample_value("sidecar_secret_cache_entries") == 2


async def test_negative_entries_count_towards_the_bound(clock: FakeClock) -> None:
    backend = FakeBackend()
    cache = make_cache(backend, clock, max_entries=3)
    for i in range(10):
        with pytest.raises(NoCredential):
            await cache.get(f"missing-{i}")
    assert len(cache) == 3


# ------------------------------------------------------------------ secret_field


async def test_secret_field_from_a_json_string(clock: FakeClock) -> None:
    key = make_secret("cache-json")
    backend = FakeBackend({"s": json.dumps({"apiKey": key, "other": "x"})})
    secret, _ = await make_cache(backend, clock).get("s", "apiKey")
    assert secret.reveal() == key


async def test_secret_field_from_a_mapping(clock: FakeClock) -> None:
    key = make_secret("cache-map")
    backend = FakeBackend({"s": {"apiKey": key}, "n": {"pin": 123456}})
    cache = make_cache(backend, clock)
    assert (await cache.get("s", "apiKey"))[0].reveal() == key
    assert (await cache.get("n", "pin"))[0].reveal() == "123456"


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ('{"other": "x"}', "apiKey", "secret_field_missing"),
        ({"other": "x"}, "apiKey", "secret_field_missing"),
        ("not json at all", "apiKey", "secret_not_json"),
        ('["apiKey"]', "apiKey", "secret_field_missing"),
        ({"apiKey": {"nested": "x"}}, "apiKey", "secret_field_type"),
        ({"apiKey": None}, "apiKey", "secret_field_type"),
        ({"apiKey": True}, "apiKey", "secret_field_type"),
        ({"apiKey": "x"}, None, "secret_is_object"),
    ],
)
async def test_unusable_secret_shapes_are_cached_negative(
    raw: RawSecret, field: str | None, reason: str, clock: FakeClock
) -> None:
    backend = FakeBackend({"s": raw})
    cache = make_cache(backend, clock)
    with pytest.raises(NoCredential) as info:
        await cache.get("s", field)
    assert info.value.reason == reason
    assert info.value.status == 403
    with pytest.raises(NoCredential) as again:
        await cache.get("s", field)
    assert again.value.reason == reason
    assert backend.calls == ["s"]  # negative: not asked again within negative_ttl
    clock.advance(NEGATIVE_TTL)
    with pytest.raises(NoCredential):
        await cache.get("s", field)
    assert backend.calls == ["s", "s"]


@pytest.mark.parametrize("suffix", ["\r\nX-Evil: 1", "\n", "\r", "\0", "mid\x00dle", "\t", "\x7f", "\u00e9", "\u20ac"])
async def test_secrets_that_are_not_printable_ascii_are_refused(suffix: str, clock: FakeClock) -> None:
    value = make_secret("cache-ctl") + suffix
    backend = FakeBackend({"s": value, "obj": {"k": value}})
    cache = make_cache(backend, clock)
    for field in (None, "k"):
        with pytest.raises(NoCredential) as info:
            await cache.get("s" if field is None else "obj", field)
        assert info.value.reason == "secret_invalid"
        assert value not in str(info.value)
        assert value not in info.value.message


@pytest.mark.parametrize("raw", ["", {"k": ""}])
async def test_empty_secret_is_refused(raw: RawSecret, clock: FakeClock) -> None:
    cache = make_cache(FakeBackend({"s": raw}), clock)
    with pytest.raises(NoCredential) as info:
        await cache.get("s", None if isinstance(raw, str) else "k")
    assert info.value.reason == "secret_invalid"


# ------------------------------------------------------------------ invalidate, refresh, clear


async def test_invalidate_forgets_one_entry(clock: FakeClock) -> None:
    values = {"a": make_secret("cache-inv-a"), "b": make_secret("cache-inv-b")}
    backend = FakeBackend(values)
    cache = make_cache(backend, clock)
    await cache.get("a")
    await cache.get("b")
    cache.invalidate("a")
    cache.invalidate("never-seen")  # harmless
    assert (await cache.get("a"))[1] == "miss"
    assert (await cache.get("b"))[1] == "hit"
    assert backend.calls == ["a", "b", "a"]


async def test_invalidate_is_per_field(clock: FakeClock) -> None:
    backend = FakeBackend({"o": {"x": make_secret("cache-fx"), "y": make_secret("cache-fy")}})
    cache = make_cache(backend, clock)
    await cache.get("o", "x")
    await cache.get("o", "y")
    cache.invalidate("o", "x")
    assert (await cache.get("o", "y"))[1] == "hit"
    assert (await cache.get("o", "x"))[1] == "miss"


async def test_clear_forgets_everything(clock: FakeClock) -> None:
    backend = FakeBackend({"a": make_secret("cache-clr-a"), "b": make_secret("cache-clr-b")})
    cache = make_cache(backend, clock)
    await cache.get("a")
    with pytest.raises(NoCredential):
        await cache.get("missing")
    cache.clear()
    assert len(cache) == 0
    assert REGISTRY.get_sample_value("sidecar_secret_cache_entries") == 0
    assert (await cache.get("a"))[1] == "miss"
    backend.values["missing"] = make_secret("cache-clr-new")
    assert (await cache.get("missing"))[1] == "miss"  # the negative entry went too


async def test_refresh_after_rejection_returns_a_rotated_value(
    backend: FakeBackend, clock: FakeClock, alice: str
) -> None:
    cache = make_cache(backend, clock)
    old, _ = await cache.get("mcp/polygon/alice")
    rotated = make_secret("cache-rotated")
    backend.values["mcp/polygon/alice"] = rotated
    new = await cache.refresh_rejected("mcp/polygon/alice", None, old)
    assert new is not None
    assert new.reveal() == rotated
    assert len(backend.calls) == 2  # asked the store although the entry was still fresh
    secret, result = await cache.get("mcp/polygon/alice")
    assert (secret.reveal(), result) == (rotated, "hit")


async def test_refresh_after_rejection_with_unchanged_value_backs_off(
    backend: FakeBackend, clock: FakeClock, alice: str
) -> None:
    cache = make_cache(backend, clock)
    old, _ = await cache.get("mcp/polygon/alice")
    assert await cache.refresh_rejected("mcp/polygon/alice", None, old) is None
    assert len(backend.calls) == 2
    for _ in range(10):  # a revoked key must not turn every request into a store call
        assert await cache.refresh_rejected("mcp/polygon/alice", None, old) is None
    assert len(backend.calls) == 2
    # The value itself keeps being served (the upstream decides, not the cache).
    secret, _ = await cache.get("mcp/polygon/alice")
    assert secret.reveal() == alice


async def test_refresh_after_rejection_uses_a_value_another_request_fetched(
    backend: FakeBackend, clock: FakeClock
) -> None:
    cache = make_cache(backend, clock)
    old, _ = await cache.get("mcp/polygon/alice")
    rotated = make_secret("cache-other-req")
    backend.values["mcp/polygon/alice"] = rotated
    first = await cache.refresh_rejected("mcp/polygon/alice", None, old)
    second = await cache.refresh_rejected("mcp/polygon/alice", None, old)
    assert first is not None
    assert second is not None
    assert second.reveal() == rotated
    assert len(backend.calls) == 2


@pytest.mark.parametrize("failure", ["not_found", "store_error"])
async def test_refresh_after_rejection_when_the_store_has_nothing_usable(
    failure: str, backend: FakeBackend, clock: FakeClock
) -> None:
    cache = make_cache(backend, clock)
    old, _ = await cache.get("mcp/polygon/alice")
    if failure == "not_found":
        del backend.values["mcp/polygon/alice"]
    else:
        backend.error = StoreError("timeout")
    assert await cache.refresh_rejected("mcp/polygon/alice", None, old) is None


# ------------------------------------------------------------------ metrics


async def test_lookup_metrics(backend: FakeBackend, clock: FakeClock) -> None:
    cache = make_cache(backend, clock)
    names = ("hit", "miss", "stale", "negative", "error")
    before: dict[str, Any] = {n: lookups(n) for n in names}
    await cache.get("mcp/polygon/alice")  # miss
    await cache.get("mcp/polygon/alice")  # hit
    await cache.get("mcp/polygon/alice")  # hit
    with pytest.raises(NoCredential):
        await cache.get("nobody")  # miss (the store said no)
    with pytest.raises(NoCredential):
        await cache.get("nobody")  # negative
    backend.error = StoreError("timeout")
    clock.advance(TTL)
    await cache.get("mcp/polygon/alice")  # stale
    with pytest.raises(SecretStoreUnavailable):
        await cache.get("other")  # error
    delta = {n: lookups(n) - before[n] for n in names}
    assert delta == {"hit": 2, "miss": 2, "stale": 1, "negative": 1, "error": 1}
    fetches = REGISTRY.get_sample_value("sidecar_secret_fetch_duration_seconds_count", {"backend": "fake"})
    assert fetches is not None
    assert fetches >= 4


async def test_the_secret_type_compares_by_value(alice: str) -> None:
    assert Secret(alice) == Secret(alice)
    assert Secret(alice) != Secret(alice + "x")
    with pytest.raises(TypeError):
        hash(Secret(alice))


async def test_refresh_after_rejection_does_not_trust_a_read_that_began_before_it(
    clock: FakeClock, alice: str
) -> None:
    """A background refresh that read the store just before a rotation is no answer to the
    upstream's refusal: the rotated key must be fetched, not the old one called unchanged."""
    backend = FakeBackend({"mcp/polygon/alice": alice})
    backend.read_before_gate = True
    cache = make_cache(backend, clock)
    old, _ = await cache.get("mcp/polygon/alice")
    clock.advance(TTL + 1)
    backend.gate = asyncio.Event()
    served, result = await cache.get("mcp/polygon/alice")  # stale: refreshed in the background
    assert (served.reveal(), result) == (alice, "stale")
    await until(lambda: backend.waiting == 1)  # that refresh has read the old value
    rotated = make_secret("cache-rotated-mid-read")
    backend.values["mcp/polygon/alice"] = rotated
    refusal = asyncio.create_task(cache.refresh_rejected("mcp/polygon/alice", None, old))
    await asyncio.sleep(0)
    backend.gate.set()
    new = await refusal
    assert new is not None and new.reveal() == rotated
    assert len(backend.calls) == 3  # the first get, the background refresh, one read after the refusal
