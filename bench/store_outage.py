"""Request latency while the secret store black-holes (issue 17): cached-but-expired and cold clients.

    python bench/store_outage.py                       # 60 s outage, 4 callers, the defaults
    python bench/store_outage.py --duration 20 --aws-timeout 2 --json /tmp/outage.json

Runs the real CLI (whatever ``sidecar`` the import path finds: set PYTHONPATH to
the tree under test) against moto's Secrets Manager behind a TCP proxy. One
client's key is fetched, its TTL is let run out, then the proxy starts to
black-hole (accept, never answer) and ``--callers`` threads ask for that client
in a loop for ``--duration`` seconds. It prints p50/p99/max of those requests and
their statuses, then the time a client with nothing cached takes to get its 503.
Only cache and AWS settings of this version's defaults are written (no newer
keys), so the same command measures an older tree too. Everything is on
127.0.0.1 and every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.aws import AWS_ENV  # noqa: E402
from tests.support.process import SidecarProcess  # noqa: E402
from tests.support.raw_http import address, exchange, get  # noqa: E402
from tests.support.store_faults import FaultProxy, put_secret, secrets_manager  # noqa: E402
from tests.support.upstream import EchoUpstream  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of outage to measure")
    ap.add_argument("--callers", type=int, default=4, help="threads asking for the cached client")
    ap.add_argument("--ttl", type=float, default=2.0, help="secrets.cache.ttl_seconds (short, to expire it)")
    ap.add_argument("--aws-timeout", type=float, default=None, help="secrets.aws.timeout_seconds (default: unset)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    workdir = tempfile.TemporaryDirectory(prefix="store-outage-")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    proxy = FaultProxy(address(endpoint)).start()
    echo = EchoUpstream()
    echo.start()
    sc: SidecarProcess | None = None
    try:
        sm = secrets_manager(endpoint)
        put_secret(sm, "bench-outage/warm", SecretString="bench-warm-key")
        put_secret(sm, "bench-outage/cold", SecretString="bench-cold-key")
        aws: dict[str, Any] = {"region": "us-east-1", "endpoint_url": proxy.url}
        if args.aws_timeout is not None:
            aws["timeout_seconds"] = args.aws_timeout
        config = {
            "log": {"level": "info"},  # the "listening" line the harness reads is info
            "secrets": {"backend": "aws", "aws": aws, "cache": {"ttl_seconds": args.ttl}},
            "upstreams": {
                "api": {"url": echo.url + "/status/200", "secret": "bench-outage/{client_id}",
                        "inject": {"query": "apiKey"}, "allow_private": True},
            },
        }
        sc = SidecarProcess(config, Path(workdir.name), env=AWS_ENV, name="outage")
        sc.start()
        first = exchange(sc.url, get("/api", "warm"), timeout=30).first
        assert first.status == 200, first.text()
        time.sleep(args.ttl + 0.5)  # the key is now past its TTL
        proxy.mode = "blackhole"

        latencies: list[float] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        end = time.monotonic() + args.duration

        def caller() -> None:
            while time.monotonic() < end:
                ex = exchange(sc.url, get("/api", "warm"), timeout=60)
                status = ex.responses[0].status if ex.responses else 0
                with lock:
                    latencies.append(ex.elapsed)
                    statuses[status] = statuses.get(status, 0) + 1
                time.sleep(0.05)

        threads = [threading.Thread(target=caller, daemon=True) for _ in range(args.callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + 120)
        cold = exchange(sc.url, get("/api", "cold"), timeout=60)
        cold_status = cold.responses[0].status if cold.responses else 0
        result = {
            "requests": len(latencies),
            "statuses": statuses,
            "p50_s": round(statistics.median(latencies), 4),
            "p99_s": round(statistics.quantiles(latencies, n=100, method="inclusive")[98], 4),
            "max_s": round(max(latencies), 4),
            "cold_status": cold_status,
            "cold_retry_after": cold.responses[0].header("Retry-After") if cold.responses else None,
            "cold_s": round(cold.elapsed, 3),
        }
        print(f"cached-but-expired client, {args.duration:g} s of black-holed store, {args.callers} callers:")
        print(f"  {result['requests']} requests, statuses {statuses}")
        print(f"  p50 {result['p50_s']:.3f} s   p99 {result['p99_s']:.3f} s   max {result['max_s']:.3f} s")
        print(f"cold client: {cold_status} after {result['cold_s']:.2f} s (Retry-After {result['cold_retry_after']})")
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    finally:
        if sc is not None:
            try:
                sc.stop(timeout=10)
            except Exception:
                sc.kill()
        proxy.stop()
        echo.stop()
        moto.stop()
        workdir.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
