"""The batched request metrics give the same series as counting each request as it ends."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import metrics
from sidecar.metrics import REGISTRY, REQUEST_DURATION, apply_pending, observe_many, record_request

# The sidecar's own bounds; the assertions below name 0.0005, 0.1, 0.25 and 30 among them.
BUCKETS = REQUEST_DURATION._upper_bounds[:-1]  # without +Inf, which Histogram adds itself
# On a bound, between bounds, below the first and beyond the last (+Inf), repeated.
DURATIONS = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.003, 0.05, 0.07, 0.5, 2.5, 29.9, 30.0, 30.01, 400.0] * 3

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def histogram_samples(registry: CollectorRegistry, prefix: str, upstream: str) -> Samples:
    """(sample name, labels other than upstream) -> value, for one upstream's child of a histogram."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name.startswith(prefix) and s.labels.get("upstream") == upstream and not s.name.endswith("_created"):
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "upstream")))] = s.value
    return out


def test_observe_many_matches_observe_one_at_a_time() -> None:
    assert {0.0005, 0.1, 0.25, 30} <= set(BUCKETS)
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    a = Histogram("d", "d", ["upstream"], buckets=BUCKETS, registry=one_by_one).labels("u")
    b = Histogram("d", "d", ["upstream"], buckets=BUCKETS, registry=batched).labels("u")
    for value in DURATIONS:
        a.observe(value)
    observe_many(b, DURATIONS)
    expected = histogram_samples(one_by_one, "d_", "u")
    assert expected[("d_count", ())] == len(DURATIONS)
    assert expected[("d_bucket", (("le", "0.0005"),))] == 9  # 0.0, 0.0004 and 0.0005 itself, three times
    got = histogram_samples(batched, "d_", "u")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) < 1e-9, key


async def test_recorded_requests_reach_the_registry_by_upstream() -> None:
    apply_pending()
    for value in DURATIONS:
        record_request("metrics-a", 200, value)
    record_request("metrics-b", 502, 0.2)
    assert metrics._pending  # not applied yet: in a running loop the hot path only appends
    await asyncio.sleep(metrics.APPLY_SECONDS * 4)  # the batch timer applies them
    assert not metrics._pending
    a = histogram_samples(REGISTRY, "sidecar_request_duration", "metrics-a")
    b = histogram_samples(REGISTRY, "sidecar_request_duration", "metrics-b")
    assert a[("sidecar_request_duration_seconds_count", ())] == len(DURATIONS)
    assert a[("sidecar_request_duration_seconds_bucket", (("le", "30.0"),))] == len(DURATIONS) - 6  # 30.01, 400
    assert abs(a[("sidecar_request_duration_seconds_sum", ())] - sum(DURATIONS)) < 1e-6
    assert b[("sidecar_request_duration_seconds_count", ())] == 1
    assert b[("sidecar_request_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert b[("sidecar_request_duration_seconds_bucket", (("le", "0.1"),))] == 0
