"""Every metric the sidecar exports, declared in one place.

Labels are bounded by construction: upstream names come from the config,
statuses are HTTP codes, reasons are error codes or short fixed words. A client
ID, a path or a secret never becomes a label.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sidecar.errors import ERROR_CODES, SidecarError

REGISTRY = CollectorRegistry(auto_describe=True)

#: Set (by the supervisor, before this module is imported) when ``workers > 1``:
#: every process then writes its samples to files there and /metrics sums them.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def exposition() -> bytes:
    """The text exposition of every metric, across worker processes when there are several."""
    apply_pending()
    if MULTIPROCESS_DIR:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Requests the data plane answered, by upstream ("-" when none matched) and status.
REQUESTS = Counter(
    "sidecar_requests", "Proxied or refused requests.", ["upstream", "status"], registry=REGISTRY
)
# Time from request start to the end of the streamed response.
REQUEST_DURATION = Histogram(
    "sidecar_request_duration_seconds",
    "Request duration including the streamed body.",
    ["upstream"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
# Secret cache outcomes: hit, miss, stale, negative, error.
SECRET_LOOKUPS = Counter(
    "sidecar_secret_lookups", "Secret lookups by cache outcome.", ["result"], registry=REGISTRY
)
# Time spent in the secret store per fetch.
SECRET_FETCH_DURATION = Histogram(
    "sidecar_secret_fetch_duration_seconds",
    "Secret store fetch duration.",
    ["backend"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
# Background refreshes of values served past their TTL, by result: ok, error (the store failed;
# the old value is still served while stale_if_error_seconds lasts), missing (the store has no
# usable secret any more: not found, scheduled for deletion or unusable).
SECRET_REFRESHES = Counter(
    "sidecar_secret_refreshes", "Background refreshes of expired secrets by result.", ["result"], registry=REGISTRY
)
# Time each background refresh took, at most secrets.lookup_timeout_seconds.
SECRET_REFRESH_DURATION = Histogram(
    "sidecar_secret_refresh_duration_seconds",
    "Background refresh duration.",
    ["backend"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
# Store failures by kind: access_denied, auth, throttled, timeout, unreachable, unavailable, invalid, config.
SECRET_STORE_ERRORS = Counter(
    "sidecar_secret_store_errors", "Secret store failures by kind.", ["backend", "kind"], registry=REGISTRY
)
# Entries currently held by the secret cache (positive and negative).
SECRET_CACHE_ENTRIES = Gauge(
    "sidecar_secret_cache_entries", "Entries in the secret cache.", registry=REGISTRY, multiprocess_mode="livesum"
)
# Refusals by the contract's error code.
DENIED = Counter("sidecar_denied", "Requests refused or failed by the sidecar.", ["reason"], registry=REGISTRY)
#: One child per refusal code, made at start so every series exists from the first scrape.
_DENIED = {code: DENIED.labels(code) for code in (*ERROR_CODES, SidecarError.code)}
# Requests in flight on the data plane.
INFLIGHT = Gauge(
    "sidecar_inflight_requests", "Requests being handled.", registry=REGISTRY, multiprocess_mode="livesum"
)
# Connection-level failures talking to upstreams: connect, tls, timeout, protocol, forbidden_address.
UPSTREAM_ERRORS = Counter(
    "sidecar_upstream_errors", "Upstream connection failures by kind.", ["upstream", "kind"], registry=REGISTRY
)
# Upstream 401/403 answers that led to a refetch of the client's secret; result: replayed, unchanged, not_replayable.
ROTATIONS = Counter(
    "sidecar_secret_rotations", "Credential refreshes after an upstream refused a key.", ["upstream", "result"],
    registry=REGISTRY,
)
# OAuth token requests by upstream, grant (client_credentials, refresh_token, token_exchange) and
# result: ok, refused (the endpoint said no: invalid_client, invalid_grant, ...), error (unreachable,
# 5xx, 408, 429, temporarily_unavailable or server_error, a malformed answer), timeout.
TOKEN_REQUESTS = Counter(
    "sidecar_token_requests", "OAuth token endpoint requests by grant and result.", ["upstream", "grant", "result"],
    registry=REGISTRY,
)
# JWKS fetches by result: ok, error, cooldown (a refresh that was skipped).
JWKS_REFRESHES = Counter("sidecar_jwks_refreshes", "JWKS fetches by result.", ["result"], registry=REGISTRY)
# Verified-token cache outcomes: hit, miss.
TOKEN_CACHE = Counter("sidecar_token_cache", "Verified token cache lookups.", ["result"], registry=REGISTRY)
# Config reloads by result: ok, invalid.
CONFIG_RELOADS = Counter("sidecar_config_reloads", "SIGHUP config reloads.", ["result"], registry=REGISTRY)
# 1 while /readyz answers 200.
# With workers only the supervisor sets it (to 1 when every worker is ready).
READY = Gauge("sidecar_ready", "1 when ready to serve.", registry=REGISTRY, multiprocess_mode="livemax")
# 1 from SIGTERM (or SIGINT) until the process exits: a drain that outlasts
# shutdown_grace_seconds shows as a series that stays 1. With workers the supervisor sets it.
DRAINING = Gauge(
    "sidecar_draining", "1 while draining after SIGTERM.", registry=REGISTRY, multiprocess_mode="livemax"
)
#: sidecar_jwks_keys_loaded, made by the first set_jwks_keys_loaded in JWT mode: header mode
#: and the supervisor of workers (which verifies nothing) have no such series, so an alert
#: on 0 means what it says. With workers the lowest worker's value is shown (livemin).
_KEYS_LOADED: list[Gauge] = []


def set_jwks_keys_loaded(loaded: bool | None) -> None:
    """JWT mode: 1 once the identity provider's signing keys are loaded, 0 while none are.

    ``None`` (header mode): nothing is missing, so an existing series (JWT mode was turned
    off by a reload) goes to 1; none is made.
    """
    if not _KEYS_LOADED:
        if loaded is None:
            return
        _KEYS_LOADED.append(
            Gauge(
                "sidecar_jwks_keys_loaded",
                "JWT mode: 1 when the identity provider's signing keys are loaded, 0 while none are.",
                registry=REGISTRY,
                multiprocess_mode="livemin",
            )
        )
    _KEYS_LOADED[0].set(0 if loaded is False else 1)


# ---- per-request counts, applied in batches

#: Requests counted but not yet added to REQUESTS and REQUEST_DURATION: (upstream, status, seconds).
_pending: list[tuple[str, int, float]] = []
#: Other hot-path increments not yet applied: metric child -> amount (a gauge's amount may be negative).
_bumps: dict[Any, float] = {}
_applying: list[Any] = [None, None]  # [event loop, timer]
#: Pending counts are applied this often (and before every /metrics answer of this process).
APPLY_SECONDS = 0.05
_counters: dict[tuple[str, int], Any] = {}
_histograms: dict[str, Any] = {}


def bump(child: Any, amount: float = 1) -> None:
    """Add ``amount`` to a counter or gauge child within APPLY_SECONDS (see record_request).

    The in-flight gauge goes through here too: it is then right to within
    APPLY_SECONDS, which a scrape never notices, and costs a dict update instead of
    a locked (with workers, memory-mapped) write at both ends of every request.
    """
    _bumps[child] = _bumps.get(child, 0) + amount
    if _applying[1] is None:
        _schedule()


def _schedule() -> None:
    loop = _applying[0]
    if loop is None or loop.is_closed():
        try:
            loop = _applying[0] = asyncio.get_running_loop()  # looked up once: each lookup is a getpid()
        except RuntimeError:
            apply_pending()
            return
    _applying[1] = loop.call_later(APPLY_SECONDS, apply_pending)


def count_refusal(code: str) -> None:
    """One refusal with the contract's error ``code`` (an unknown code counts as internal_error)."""
    bump(_DENIED.get(code) or _DENIED[SidecarError.code])


def count_request(upstream: str, status: int) -> None:
    """One request counted without a duration (a CONNECT tunnel's lifetime is no request latency)."""
    bump(_counter(upstream, status))


def _counter(upstream: str, status: int) -> Any:
    counter = _counters.get((upstream, status))
    if counter is None:
        counter = _counters[(upstream, status)] = REQUESTS.labels(upstream, str(status))
    return counter


def record_request(upstream: str, status: int, seconds: float) -> None:
    """Count one finished request. Applied within APPLY_SECONDS, in a batch.

    Measured in a running sidecar (A/B, interleaved): updating the counter and the
    histogram as each request ended cost ~8 us of CPU a request, cold caches between
    requests; a loop over the batch costs a fraction of that. /metrics of this
    process applies what is pending first; with workers, the supervisor's /metrics
    sees a worker's counts at most APPLY_SECONDS late.
    """
    _pending.append((upstream, status, seconds))
    if _applying[1] is None:
        _schedule()


def apply_pending() -> None:
    """Add every pending request to REQUESTS and REQUEST_DURATION now."""
    timer = _applying[1]
    if timer is not None:
        timer.cancel()
        _applying[1] = None
    if _bumps:
        bumps = list(_bumps.items())
        _bumps.clear()
        for child, amount in bumps:
            if amount:
                child.inc(amount)
    if not _pending:
        return
    batch = _pending[:]
    _pending.clear()
    counts: dict[tuple[str, int], int] = {}
    durations: dict[str, list[float]] = {}
    for upstream, status, seconds in batch:
        key = (upstream, status)
        counts[key] = counts.get(key, 0) + 1
        by_upstream = durations.get(upstream)
        if by_upstream is None:
            by_upstream = durations[upstream] = []
        by_upstream.append(seconds)
    for (upstream, status), n in counts.items():
        _counter(upstream, status).inc(n)
    for upstream, values in durations.items():
        histogram = _histograms.get(upstream)
        if histogram is None:
            histogram = _histograms[upstream] = REQUEST_DURATION.labels(upstream)
        observe_many(histogram, values)


def observe_many(histogram: Any, values: list[float]) -> None:
    """``histogram.observe(v)`` for each value, as one add per bucket touched and one to the sum.

    With workers every add is a locked write to a memory-mapped file after a
    ``getpid()`` (prometheus_client checks for a fork each time): observing one
    request at a time made two of each per request. A value goes to the first
    bucket whose bound is >= it, as ``Histogram.observe`` does; the last bound is
    +Inf. The child's ``_sum``, ``_buckets`` and ``_upper_bounds`` are
    prometheus_client's own (unchanged since 0.4); tests/unit/test_metrics.py compares
    the result with ``observe`` sample by sample.
    """
    bounds = histogram._upper_bounds
    per_bucket = [0] * len(bounds)
    for value in values:
        per_bucket[bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))
    buckets = histogram._buckets
    for i, n in enumerate(per_bucket):
        if n:
            buckets[i].inc(n)
