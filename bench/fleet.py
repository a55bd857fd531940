"""How many secret-store calls a fleet of sidecars makes: N pods, M clients, the real cache.

    python bench/fleet.py                                  # 50 pods, 200 clients, 1 h, defaults
    python bench/fleet.py --pods 500 --clients 1000 --ttl 900 --hours 2 --json out.json
    python bench/fleet.py --restarts-per-hour 1 --prefetch    # rolling deploys, prefetch on

Each pod gets its own ``SecretCache`` (sidecar/secrets/cache.py, the code the
sidecar runs) in front of a counting in-memory store, with the cache's clock
replaced by a simulated one, so an hour of traffic runs in seconds and no real
time passes. Every client calls through every pod (a Service spreads them),
each at ``--interval`` seconds on average (exponential gaps). Optional: pod
restarts (an empty cache; with ``--prefetch`` every client's secret is fetched at
start) and rotations where the old key is revoked at once (every pod holding it
sees a 401 and asks the store again: ``refresh_rejected``). Prints the measured
call rate beside the closed form of docs/operations.md ("Fleet arithmetic") and
what it costs on AWS Secrets Manager; ``--json`` also writes it.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sidecar.config import CacheSettings  # noqa: E402
from sidecar.secrets.base import RawSecret, ReadOnlyStore, Secret, SecretNotFound  # noqa: E402
from sidecar.secrets.cache import SecretCache  # noqa: E402

#: AWS Secrets Manager: USD per 10,000 API calls, and the per-account, per-Region ceiling of
#: GetSecretValue + DescribeSecret requests a second (docs/operations.md cites both pages).
PRICE_PER_10K_CALLS = 0.05
THROTTLE_PER_SECOND = 10_000
SECONDS_PER_MONTH = 30 * 24 * 3600


class Clock:
    """The simulated time every cache reads."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingStore(ReadOnlyStore):
    """An in-memory store that counts every fetch; a rotation bumps a secret's version."""

    name = "fleet"

    def __init__(self, clients: int) -> None:
        self.on_change = None
        self.versions = {f"mcp/polygon/client-{i}": 0 for i in range(clients)}
        self.calls = 0

    async def start(self) -> None:
        return None

    async def fetch(self, secret_id: str) -> RawSecret:
        self.calls += 1
        if secret_id not in self.versions:
            raise SecretNotFound(secret_id)
        return f"key-{secret_id}-v{self.versions[secret_id]}"

    async def close(self) -> None:
        return None


async def settle(caches: list[SecretCache]) -> None:
    """Let background refreshes finish before the clock moves (the store answers at once)."""
    for _ in range(100):
        if not any(cache.in_flight for cache in caches):
            return
        await asyncio.sleep(0)


async def simulate(
    *,
    pods: int,
    clients: int,
    interval: float,
    ttl: float,
    hours: float,
    restarts_per_hour: float = 0.0,
    rotations_per_hour: float = 0.0,
    prefetch: bool = False,
    seed: int = 1,
) -> dict[str, Any]:
    """Run the fleet for ``hours`` of simulated time; the counts and rates."""
    rng = random.Random(seed)
    clock = Clock()
    store = CountingStore(clients)
    settings = CacheSettings(ttl_seconds=ttl)
    ids = list(store.versions)
    duration = hours * 3600

    def new_cache() -> SecretCache:
        return SecretCache(store, settings, clock=clock)

    caches = [new_cache() for _ in range(pods)]
    requests = rejected = 0
    # Events: (time, order, kind, pod, client). kind: 0 request, 1 restart, 2 rotation.
    events: list[tuple[float, int, int, int, int]] = []
    order = 0
    for pod in range(pods):
        for client in range(clients):
            events.append((rng.expovariate(1 / interval), order, 0, pod, client))
            order += 1
        if restarts_per_hour:
            events.append((rng.expovariate(restarts_per_hour / 3600), order, 1, pod, 0))
            order += 1
    if rotations_per_hour:
        events.append((rng.expovariate(rotations_per_hour / 3600), order, 2, 0, 0))
        order += 1
    heapq.heapify(events)
    if prefetch:
        for cache in caches:
            for secret_id in ids:
                await cache.get(secret_id)
    half = duration / 2
    calls_at_half: int | None = None
    while events:
        at, _, kind, pod, client = heapq.heappop(events)
        if at >= duration:
            break
        if calls_at_half is None and at >= half:
            calls_at_half = store.calls
        clock.now = at
        if kind == 0:
            requests += 1
            cache = caches[pod]
            secret, _ = await cache.get(ids[client])
            current = f"key-{ids[client]}-v{store.versions[ids[client]]}"
            if not secret == Secret(current):
                # The old key was revoked at once: the upstream answers 401, the sidecar asks again.
                rejected += 1
                await cache.refresh_rejected(ids[client], None, secret)
            await settle(caches)
            heapq.heappush(events, (at + rng.expovariate(1 / interval), order, 0, pod, client))
        elif kind == 1:
            caches[pod].close()
            caches[pod] = new_cache()
            if prefetch:
                for secret_id in ids:
                    await caches[pod].get(secret_id)
            heapq.heappush(events, (at + rng.expovariate(restarts_per_hour / 3600), order, 1, pod, 0))
        else:
            victim = ids[rng.randrange(clients)]
            store.versions[victim] += 1
            heapq.heappush(events, (at + rng.expovariate(rotations_per_hour / 3600), order, 2, 0, 0))
        order += 1
    await settle(caches)
    rate = store.calls / duration
    # Steady state: the second half, when every pair's cold miss is long past.
    steady = (store.calls - (calls_at_half or 0)) / (duration - half)
    # The closed form: each (pod, client) pair refreshes on its first request after the TTL,
    # on average `interval` seconds later (exponential gaps are memoryless).
    predicted = pods * clients / (ttl + interval)
    return {
        "pods": pods,
        "clients": clients,
        "interval_seconds": interval,
        "ttl_seconds": ttl,
        "hours": hours,
        "restarts_per_hour": restarts_per_hour,
        "rotations_per_hour": rotations_per_hour,
        "prefetch": prefetch,
        "requests": requests,
        "store_calls": store.calls,
        "rejected_after_rotation": rejected,
        "calls_per_second": rate,
        "steady_calls_per_second": steady,
        "predicted_calls_per_second": predicted,
        "hit_ratio": 1 - store.calls / requests if requests else 0.0,
        "usd_per_month": steady * SECONDS_PER_MONTH / 10_000 * PRICE_PER_10K_CALLS,
        "share_of_throttle": steady / THROTTLE_PER_SECOND,
    }


def report(result: Mapping[str, Any]) -> str:
    return (
        f"{result['pods']} pods x {result['clients']} clients, a call per pair every {result['interval_seconds']:g} s,"
        f" ttl {result['ttl_seconds']:g} s, {result['hours']:g} h simulated"
        f" (restarts/h/pod {result['restarts_per_hour']:g}, rotations/h {result['rotations_per_hour']:g},"
        f" prefetch {'on' if result['prefetch'] else 'off'})\n"
        f"  requests           {result['requests']:>12,}\n"
        f"  store calls        {result['store_calls']:>12,}   hit ratio {result['hit_ratio']:.4f}\n"
        f"  store calls/s      {result['calls_per_second']:>12.2f}   whole run, cold misses included\n"
        f"  steady calls/s     {result['steady_calls_per_second']:>12.2f}   second half; closed form N*M/(ttl+interval)"
        f" {result['predicted_calls_per_second']:.2f}\n"
        f"  Secrets Manager    ${result['usd_per_month']:>11,.2f} a month at the steady rate;"
        f" {result['share_of_throttle']:.2%} of the 10,000/s per account and Region"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument(
        "--interval", type=float, default=60.0, help="mean seconds between calls of one client via one pod"
    )
    parser.add_argument("--ttl", type=float, default=300.0, help="secrets.cache.ttl_seconds")
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--restarts-per-hour", type=float, default=0.0, help="per pod")
    parser.add_argument("--rotations-per-hour", type=float, default=0.0, help="fleet-wide, old key revoked at once")
    parser.add_argument("--prefetch", action="store_true", help="every client's secret fetched at each pod start")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = asyncio.run(
        simulate(
            pods=args.pods, clients=args.clients, interval=args.interval, ttl=args.ttl, hours=args.hours,
            restarts_per_hour=args.restarts_per_hour, rotations_per_hour=args.rotations_per_hour,
            prefetch=args.prefetch, seed=args.seed,
        )
    )
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
