#!/usr/bin/env python3
"""The sidecar's benchmark: one run on 127.0.0.1, side by side with nginx.

    python bench/run.py                 # full run (about 6 minutes on 2 cores)
    python bench/run.py --smoke         # every phase with tiny durations (< 60 s)
    python bench/run.py --profile 10    # also py-spy the sidecar at c=16 for 10 s

Phases (see bench/README.md for what each number means):

1. load      wrk at c=1/16/64 against direct (upstream nginx), nginx-proxy, the
             sidecar in header mode and in JWT mode; interleaved, repeated, median.
2. https     a client opening a new connection per request: directly to the HTTPS
             upstream vs plain HTTP to the sidecar, which keeps pooled TLS upstream.
3. stream    1 GiB download and upload through the sidecar (MB/s, RSS growth).
4. cold      500 simultaneous first requests for one uncached client, AWS backend
             against a fake Secrets Manager with 50 ms latency (store calls, p99).
5. floors    wrk at c=16/64 against a bare aiohttp server and a bare aiohttp
             passthrough beside the sidecar: what aiohttp alone costs.
6. profile   optional: py-spy on the header-mode sidecar at c=16.

Every server listens on 127.0.0.1 only; every loop and child is bounded in time;
every child process is stopped in ``finally``. The harness it shares with the other
benchmarks (processes, ports, wrk, /proc, the fixture) is bench/harness.py; the tables
and verdicts it prints are bench/report.py.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    BODY,
    CLIENT_ID,
    CLK_TCK,
    HERE,
    JWT_ISSUER,
    MB,
    MIB,
    PY,
    REPO,
    Child,
    Children,
    children_of,
    cpu_ticks,
    free_port,
    http_get,
    machine,
    make_jwt,
    make_tls,
    median_of,
    port_open,
    raise_nofile,
    render_nginx,
    rss_bytes,
    run_wrk,
    wait_until,
)
from report import in_mib, report

API_KEY = "bk-0123456789abcdef0123456789abcdef"
QUERY_PATH = "/v1/quote?symbol=AAPL&adjusted=true"
STORE_LATENCY = 0.05

# Each pair a target compares is measured back to back within a repeat (nginx then
# sidecar-w2, sidecar then sidecar-jwt), so the per-repeat ratio sees the same VM hour.
TARGETS = ("direct", "nginx", "sidecar-w2", "sidecar", "sidecar-jwt")


# --------------------------------------------------------------------------- setup


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    children: Children
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Child] = field(default_factory=dict)
    token: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    def port(self, name: str) -> int:
        if name not in self.ports:
            while True:
                p = free_port()
                if p not in self.ports.values():
                    break
            self.ports[name] = p
        return self.ports[name]


def start_nginx(b: Bench, name: str, conf: Path, port: int) -> Child:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    child = b.children.start(name, [nginx, "-p", str(b.tmp), "-e", str(b.tmp / f"{name}-startup.log"), "-c", str(conf)])
    wait_until(lambda: port_open(port), child, "listening port", 15)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(children_of(child.pid)) < 1:
        time.sleep(0.05)
    child.pids = [child.pid, *children_of(child.pid)]
    return child


def sidecar_config(b: Bench, name: str, *, jwt: bool = False, aws: bool = False, workers: int = 1) -> Path:
    upstream = {"url": f"http://127.0.0.1:{b.port('upstream')}", "secret": "bench/{client_id}",
                "inject": {"query": "apiKey"}, "allow_private": True}
    upstreams: dict[str, Any] = {"polygon": upstream}
    if not aws:
        upstreams["bulk"] = {**upstream, "url": f"http://127.0.0.1:{b.port('upstream')}/files"}
        upstreams["sink"] = {**upstream, "url": f"http://127.0.0.1:{b.port('sink')}"}
        upstreams["tls"] = {**upstream, "url": f"https://127.0.0.1:{b.port('upstream_tls')}",
                            "ca_file": str(b.tmp / "tls" / "ca.pem")}
        # The same TLS upstream behind the latency relay: an API a network away.
        upstreams["tlsfar"] = {**upstreams["tls"], "url": f"https://127.0.0.1:{b.port('relay')}"}
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{b.port(name)}",
        "admin_listen": f"127.0.0.1:{b.port(name + '-admin')}",
        "shutdown_grace_seconds": 1,
        "workers": workers,
        "log": {"level": "warning", "format": "json"},
        "upstreams": upstreams,
    }
    if aws:
        config["secrets"] = {
            "backend": "aws",
            "aws": {"region": "us-east-1", "endpoint_url": f"http://127.0.0.1:{b.port('sm')}"},
        }
    else:
        config["secrets"] = {"backend": "file", "file": {"path": str(b.tmp / "keys.yaml")}}
    if jwt:
        config["identity"] = {"jwt": {"jwks_url": f"http://127.0.0.1:{b.port('jwks')}/jwks.json",
                                      "issuer": JWT_ISSUER}}
    path = b.tmp / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_sidecar(b: Bench, name: str, config: Path) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    # stdout (the JSON logs, and one access line per proxied request even at level
    # warning) goes to a file in the temp dir, like a container runtime's log pipe.
    child = b.children.start(name, [PY, "-m", "sidecar", "run", "--config", str(config)], env=env)
    admin = b.port(name + "-admin")
    wait_until(lambda: http_get(admin, "/readyz", timeout=1)[0] == 200, child, "/readyz 200", 30)
    return child


def setup(b: Bench) -> None:
    tmp = b.tmp
    os.chmod(tmp, 0o755)
    make_tls(tmp)
    b.token = make_jwt(tmp)
    (tmp / "keys.yaml").write_text(json.dumps({f"bench/{CLIENT_ID}": API_KEY}))
    files = tmp / "files"
    files.mkdir()
    with open(files / "big.bin", "wb") as f:
        f.truncate(b.args.stream_bytes)  # sparse: reads as zeros, costs no disk
    for p in tmp.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)

    up_conf = render_nginx("upstream.conf", tmp, HTTP_PORT=b.port("upstream"), TLS_PORT=b.port("upstream_tls"))
    b.procs["upstream"] = start_nginx(b, "upstream", up_conf, b.port("upstream"))
    px_conf = render_nginx("proxy.conf", tmp, HTTP_PORT=b.port("nginx"), UPSTREAM_PORT=b.port("upstream"), KEY=API_KEY)
    b.procs["nginx"] = start_nginx(b, "nginx", px_conf, b.port("nginx"))

    helper = b.children.start("helpers", [
        PY, str(HERE / "support" / "servers.py"), "--jwks-port", str(b.port("jwks")),
        "--jwks-file", str(tmp / "jwks.json"), "--sink-port", str(b.port("sink")),
        "--sm-port", str(b.port("sm")), "--sm-delay", str(STORE_LATENCY),
    ])
    b.procs["helpers"] = helper
    wait_until(lambda: "ready" in helper.log.read_text(), helper, "helper servers", 20)
    relay = b.children.start("relay", [
        PY, str(HERE / "support" / "relay.py"), "--port", str(b.port("relay")),
        "--target", str(b.port("upstream_tls")), "--one-way-ms", str(b.args.rtt_ms / 2),
    ])
    b.procs["relay"] = relay
    wait_until(lambda: "ready" in relay.log.read_text(), relay, "latency relay", 20)

    for name, kw in (
        ("sidecar", {}), ("sidecar-jwt", {"jwt": True}), ("sidecar-aws", {"aws": True}), ("sidecar-w2", {"workers": 2}),
    ):
        b.procs[name] = start_sidecar(b, name, sidecar_config(b, name, **kw))

    # Idle RSS right after readiness, before any request (AWS: boto3 client built at start).
    time.sleep(0.5)
    idle = {name: rss_bytes([b.procs[name].pid]) for name in ("sidecar", "sidecar-jwt", "sidecar-aws")}

    # Correctness first: every path answers 200 with the fixture, the key reaches the upstream.
    checks = {
        "direct": http_get(b.port("upstream"), QUERY_PATH + "&apiKey=" + API_KEY),
        "nginx": http_get(b.port("nginx"), "/polygon" + QUERY_PATH, {"X-Client-Id": CLIENT_ID}),
        "sidecar": http_get(b.port("sidecar"), "/polygon" + QUERY_PATH, {"X-Client-Id": CLIENT_ID}),
        "sidecar-w2": http_get(b.port("sidecar-w2"), "/polygon" + QUERY_PATH, {"X-Client-Id": CLIENT_ID}),
        "sidecar-jwt": http_get(b.port("sidecar-jwt"), "/polygon" + QUERY_PATH,
                                {"Authorization": "Bearer " + b.token}),
        # A client of its own, so the cold-burst clients stay uncached.
        "sidecar-aws": http_get(b.port("sidecar-aws"), "/polygon" + QUERY_PATH, {"X-Client-Id": "aws-check"}),
    }
    for name, (status, body) in checks.items():
        if status != 200 or body != BODY.encode():
            raise RuntimeError(f"{name}: warm-up answered {status} {body[:200]!r}")
    status, body = http_get(b.port("sidecar"), "/sink/check?x=1", {"X-Client-Id": CLIENT_ID})
    if status != 200 or not json.loads(body).get("query_has_key"):
        raise RuntimeError(f"sidecar did not inject the key: {status} {body[:200]!r}")
    time.sleep(0.3)
    b.results["rss_idle"] = {
        "sidecar_file_start": idle["sidecar"],
        "sidecar_jwt_start": idle["sidecar-jwt"],
        "sidecar_aws_start": idle["sidecar-aws"],
        "sidecar_file_warm": rss_bytes([b.procs["sidecar"].pid]),
        "sidecar_jwt_warm": rss_bytes([b.procs["sidecar-jwt"].pid]),
        "sidecar_aws_warm": rss_bytes([b.procs["sidecar-aws"].pid]),
        "nginx_proxy": rss_bytes(b.procs["nginx"].pids),
        "nginx_upstream": rss_bytes(b.procs["upstream"].pids),
    }
    b.results["boto3_imported_by_file_backend"] = boto3_imported_by_file_start(b)


def boto3_imported_by_file_start(b: Bench) -> bool:
    """Build the file-backend runtime in a fresh interpreter and see whether boto3 got imported."""
    code = (
        "import asyncio, sys\n"
        "from sidecar.config import load_settings\n"
        "from sidecar.app import Sidecar\n"
        "async def main():\n"
        "    s = Sidecar(load_settings(sys.argv[1]))\n"
        "    parts = await s._build(s.settings, None)\n"
        "    await s._close_parts(parts)\n"
        "asyncio.run(main())\n"
        "print(any(m == 'boto3' or m.startswith(('boto3.', 'botocore')) for m in sys.modules))\n"
    )
    out = subprocess.run([PY, "-c", code, str(b.tmp / "sidecar.yaml")], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=False)
    return out.stdout.strip().endswith("True")


# --------------------------------------------------------------------------- phases


def target_request(b: Bench, target: str) -> tuple[str, list[str], list[int]]:
    """URL, headers and measured PIDs for a load target."""
    if target == "direct":
        return (f"http://127.0.0.1:{b.port('upstream')}{QUERY_PATH}&apiKey={API_KEY}", [],
                b.procs["upstream"].pids)
    if target == "nginx":
        return (f"http://127.0.0.1:{b.port('nginx')}/polygon{QUERY_PATH}", [f"X-Client-Id: {CLIENT_ID}"],
                b.procs["nginx"].pids)
    if target == "sidecar":
        return (f"http://127.0.0.1:{b.port('sidecar')}/polygon{QUERY_PATH}", [f"X-Client-Id: {CLIENT_ID}"],
                [b.procs["sidecar"].pid])
    if target == "sidecar-w2":
        # The supervisor and its two workers: CPU per request counts all three.
        pid = b.procs["sidecar-w2"].pid
        return (f"http://127.0.0.1:{b.port('sidecar-w2')}/polygon{QUERY_PATH}", [f"X-Client-Id: {CLIENT_ID}"],
                [pid, *children_of(pid)])
    return (f"http://127.0.0.1:{b.port('sidecar-jwt')}/polygon{QUERY_PATH}",
            [f"Authorization: Bearer {b.token}"], [b.procs["sidecar-jwt"].pid])


def phase_load(b: Bench) -> None:
    runs: dict[str, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    conc = b.args.concurrency
    total = b.args.repeat * len(conc) * len(TARGETS)
    done = 0
    for rep in range(b.args.repeat):
        for c in conc:
            for target in TARGETS:
                url, headers, pids = target_request(b, target)
                extra = b.procs["upstream"].pids if target != "direct" else None
                r = run_wrk(url, c, b.args.duration, headers, pids, extra)
                runs[target][c].append(r)
                done += 1
                print(f"  load {done}/{total} rep={rep + 1} c={c:<3} {target:<12} {r['rps']:>9.0f} rps "
                      f"p50={r.get('p50_ms', 0):.3f}ms cpu={r['cpu_us_per_req']:.0f}us/req", flush=True)
    b.results["load"] = {t: {str(c): median_of(rs) for c, rs in by_c.items()} for t, by_c in runs.items()}
    b.results["load_runs"] = {t: {str(c): rs for c, rs in by_c.items()} for t, by_c in runs.items()}
    b.results["rss_after_load"] = {
        "sidecar": rss_bytes([b.procs["sidecar"].pid]),
        "sidecar_jwt": rss_bytes([b.procs["sidecar-jwt"].pid]),
        "sidecar_peak": rss_bytes([b.procs["sidecar"].pid], "VmHWM"),
        "nginx_proxy": rss_bytes(b.procs["nginx"].pids),
    }


def phase_https(b: Bench) -> None:
    """A client opening a new connection per request: TLS handshake per call vs the sidecar's pool."""
    runs: dict[str, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    direct = f"https://127.0.0.1:{b.port('upstream_tls')}{QUERY_PATH}&apiKey={API_KEY}"
    via = f"http://127.0.0.1:{b.port('sidecar')}/tls{QUERY_PATH}"
    far = f"https://127.0.0.1:{b.port('relay')}{QUERY_PATH}&apiKey={API_KEY}"
    via_far = f"http://127.0.0.1:{b.port('sidecar')}/tlsfar{QUERY_PATH}"
    sidecar_headers = ["Connection: close", f"X-Client-Id: {CLIENT_ID}"]
    for rep in range(b.args.repeat):
        for c in b.args.https_concurrency:
            for name, url, headers, pids in (
                ("direct-https", direct, ["Connection: close"], b.procs["upstream"].pids),
                ("sidecar-pooled-tls", via, sidecar_headers, [b.procs["sidecar"].pid]),
                (f"direct-https-rtt{b.args.rtt_ms:g}ms", far, ["Connection: close"], b.procs["upstream"].pids),
                (f"sidecar-pooled-tls-rtt{b.args.rtt_ms:g}ms", via_far, sidecar_headers, [b.procs["sidecar"].pid]),
            ):
                if "rtt" in name and c != 1:
                    continue  # the Python relay itself would be the bottleneck beyond one connection
                # Upstream CPU per request tells whether the sidecar really reuses its TLS
                # connections (a few µs) or handshakes per call (like direct-https).
                r = run_wrk(url, c, b.args.duration, headers, pids, b.procs["upstream"].pids)
                r["mean_ms_per_call"] = c / r["rps"] * 1000 if r["rps"] else float("nan")
                runs[name][c].append(r)
                print(f"  https rep={rep + 1} c={c:<3} {name:<19} {r['rps']:>8.0f} rps "
                      f"p50={r.get('p50_ms', 0):.3f}ms", flush=True)
    b.results["https"] = {t: {str(c): median_of(rs) for c, rs in by_c.items()} for t, by_c in runs.items()}


def phase_floors(b: Bench) -> None:
    """aiohttp's own floor: a bare low-level server, and a bare server + pooled client passthrough."""
    for mode in ("server", "passthrough"):
        name = f"aiohttp-{mode}"
        child = b.children.start(name, [PY, str(HERE / "support" / "floors.py"), mode, "--port", str(b.port(name)),
                                        "--upstream", f"http://127.0.0.1:{b.port('upstream')}"])
        b.procs[name] = child
        wait_until(lambda child=child: "ready" in child.log.read_text(), child, "ready", 20)
    targets = {
        "aiohttp-server": (f"http://127.0.0.1:{b.port('aiohttp-server')}{QUERY_PATH}", []),
        "aiohttp-passthrough": (f"http://127.0.0.1:{b.port('aiohttp-passthrough')}{QUERY_PATH}&apiKey={API_KEY}",
                                []),
        "sidecar": target_request(b, "sidecar")[:2],
    }
    runs: dict[str, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for rep in range(b.args.repeat):
        for c in (16, 64):
            for name, (url, headers) in targets.items():
                r = run_wrk(url, c, b.args.duration, headers, [b.procs[name].pid])
                runs[name][c].append(r)
                print(f"  floors rep={rep + 1} c={c:<3} {name:<20} {r['rps']:>8.0f} rps "
                      f"cpu={r['cpu_us_per_req']:.0f}us/req", flush=True)
    b.results["floors"] = {t: {str(c): median_of(rs) for c, rs in by_c.items()} for t, by_c in runs.items()}
    for name in ("aiohttp-server", "aiohttp-passthrough"):
        b.children.stop(b.procs.pop(name))


class RssSampler:
    """Samples a process's VmRSS every 50 ms in a thread until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss_bytes([pid])
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes([self.pid]))
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.peak = max(self.peak, rss_bytes([self.pid]))


def download(port: int, path: str, headers: dict[str, str], timeout: float) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    buf = bytearray(MIB)
    view = memoryview(buf)
    total = 0
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"download {path}: {resp.status}")
        while True:
            n = resp.readinto(view)
            if not n:
                break
            total += n
    finally:
        conn.close()
    return total


def upload(port: int, path: str, headers: dict[str, str], size: int, timeout: float) -> int:
    chunk = bytes(MIB)

    def body() -> Iterator[bytes]:
        left = size
        while left > 0:
            n = min(left, MIB)
            yield chunk if n == MIB else chunk[:n]
            left -= n

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body(), headers={**headers, "Content-Length": str(size),
                                                          "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"upload {path}: {resp.status} {data[:200]!r}")
        return int(json.loads(data)["received"])
    finally:
        conn.close()


def phase_stream(b: Bench) -> None:
    size = b.args.stream_bytes
    timeout = max(60.0, size / (20 * MB))
    sc = b.procs["sidecar"].pid
    hdr = {"X-Client-Id": CLIENT_ID}
    out: dict[str, Any] = {"bytes": size}
    cases: list[tuple[str, Callable[[], int], bool]] = [
        ("download-direct", lambda: download(b.port("upstream"), "/files/big.bin", {}, timeout), False),
        ("download-sidecar", lambda: download(b.port("sidecar"), "/bulk/big.bin", hdr, timeout), True),
        ("upload-direct", lambda: upload(b.port("sink"), "/upload", {}, size, timeout), False),
        ("upload-sidecar", lambda: upload(b.port("sidecar"), "/sink/upload", hdr, size, timeout), True),
    ]
    for name, fn, through_sidecar in cases:
        ticks = cpu_ticks([sc])
        with RssSampler(sc) as sampler:
            started = time.perf_counter()
            moved = fn()
            elapsed = time.perf_counter() - started
        if moved != size:
            raise RuntimeError(f"{name}: moved {moved} of {size} bytes")
        out[name] = {
            "mb_per_s": size / elapsed / MB,
            "seconds": elapsed,
            "rss_before": sampler.baseline,
            "rss_peak": sampler.peak,
            "rss_growth": sampler.peak - sampler.baseline,
            "samples": sampler.samples,
            "sidecar_cpu_s": (cpu_ticks([sc]) - ticks) / CLK_TCK if through_sidecar else None,
        }
        print(f"  stream {name:<17} {out[name]['mb_per_s']:>7.0f} MB/s  sidecar RSS growth "
              f"{out[name]['rss_growth'] / MIB:.1f} MiB", flush=True)
    b.results["stream"] = out


def run_burst(b: Bench, port: int, client: str, path: str) -> dict[str, Any]:
    """bench/support/burst.py against ``port``: its JSON (latencies, statuses, the warm repeat)."""
    proc = subprocess.run(
        [PY, str(HERE / "support" / "burst.py"), "--port", str(port), "--n", str(b.args.burst),
         "--client", client, "--path", path],
        capture_output=True, text=True, timeout=120, check=False, preexec_fn=raise_nofile,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"burst at port {port} failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def phase_cold(b: Bench) -> None:
    """N simultaneous first requests for one uncached client; count store calls at the emulator."""
    runs = []
    admin = b.port("sidecar-aws-admin")
    for rep in range(b.args.repeat):
        client = f"cold-{rep + 1}-{os.getpid()}"
        fetch_before = store_fetch_seconds(admin)
        r = run_burst(b, b.port("sidecar-aws"), client, "/polygon" + QUERY_PATH)
        _, body = http_get(b.port("sm"), "/__calls")
        r["store_calls"] = json.loads(body).get(f"bench/{client}", 0)
        fetch_after = store_fetch_seconds(admin)
        # What the sidecar itself timed for the store call(s): boto3 in its thread pool,
        # competing for the GIL with the event loop that is handling the burst.
        calls = max(fetch_after[1] - fetch_before[1], 1)
        r["sidecar_store_fetch_ms"] = (fetch_after[0] - fetch_before[0]) / calls * 1000
        r["client"] = client
        # The same burst straight at the upstream nginx: the client's and loopback's own floor.
        floor = run_burst(b, b.port("upstream"), client, QUERY_PATH)
        if floor["statuses"] != {"200": b.args.burst}:
            raise RuntimeError(f"direct burst answered {floor['statuses']}")
        r["direct_p99_ms"] = floor["p99_ms"]
        runs.append(r)
        print(f"  cold rep={rep + 1} n={r['n']} store_calls={r['store_calls']} "
              f"fetch={r['sidecar_store_fetch_ms']:.1f}ms min={r['min_ms']:.1f}ms p50={r['p50_ms']:.1f}ms "
              f"p99={r['p99_ms']:.1f}ms max={r['max_ms']:.1f}ms statuses={r['statuses']}; "
              f"warm again: p50={r['warm_p50_ms']:.1f}ms p99={r['warm_p99_ms']:.1f}ms; "
              f"direct to nginx p99={r['direct_p99_ms']:.1f}ms", flush=True)
    b.results["cold"] = {"runs": runs, "store_latency_ms": STORE_LATENCY * 1000}
    b.results["rss_aws_after_cold"] = rss_bytes([b.procs["sidecar-aws"].pid])


def store_fetch_seconds(admin_port: int) -> tuple[float, float]:
    """(sum, count) of sidecar_secret_fetch_duration_seconds from the admin /metrics."""
    _, body = http_get(admin_port, "/metrics")
    total = count = 0.0
    for line in body.decode().splitlines():
        if line.startswith("sidecar_secret_fetch_duration_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("sidecar_secret_fetch_duration_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


# --------------------------------------------------------------------------- profile

# Leaf-to-root: the first frame whose file matches names the bucket that pays for the sample.
_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("access log (sidecar/access_log.py + json)", ("sidecar/access_log.py",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("stdlib logging", ("logging/",)),
    ("aiohttp client (request, connector, response)", (
        "aiohttp/client.py", "aiohttp/client_reqrep.py", "aiohttp/connector.py", "aiohttp/client_proto.py",
        "aiohttp/tracing.py", "aiohttp/helpers.py", "aiohttp/cookiejar.py", "aiohttp/client_middlewares.py",
    )),
    ("aiohttp server (protocol, request, response, writer)", (
        "aiohttp/web_protocol.py", "aiohttp/web_request.py", "aiohttp/web_response.py", "aiohttp/web_server.py",
        "aiohttp/http_writer.py", "aiohttp/base_protocol.py", "aiohttp/web_", "aiohttp/http_parser.py",
        "aiohttp/streams.py", "aiohttp/payload.py",
    )),
    ("sidecar proxy code (proxy, identity, inject, cache, upstream)", ("sidecar/",)),
    ("event loop (uvloop/asyncio)", ("uvloop/", "asyncio/")),
]


def _frame_file(frame: str) -> str:
    m = re.search(r"\(([^()]*?)(?::\d+)?\)$", frame)
    return m.group(1) if m else frame


def summarize_profile(raw: Path, top: int = 20) -> dict[str, Any]:
    """Self time by function, inclusive time of our functions, and cost buckets from py-spy raw stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        self_time[leaf] += count
        seen = set()
        for frame in frames:
            f = re.sub(r":\d+\)$", ")", frame)
            if ("sidecar/" in f or "aiohttp/" in f or "prometheus_client" in f or "yarl/" in f
                    or "multidict/" in f) and f not in seen:
                seen.add(f)
                inclusive[f] += count
        bucket = "other (yarl, multidict, json, ...)"
        for frame in reversed(frames):
            path = _frame_file(frame)
            hit = next((name for name, needles in _BUCKETS if any(n in path for n in needles)), None)
            if hit:
                bucket = hit
                break
        buckets[bucket] += count

    def pct(c: int) -> float:
        return round(100.0 * c / total, 1) if total else 0.0

    return {
        "samples": total,
        "buckets": [(name, pct(c)) for name, c in buckets.most_common()],
        "self": [(name, pct(c)) for name, c in self_time.most_common(top)],
        "inclusive": [(name, pct(c)) for name, c in inclusive.most_common(top * 2)],
    }


def phase_profile(b: Bench) -> None:
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(pyspy).exists():
        print("  profile: py-spy not installed; skipped", flush=True)
        return
    secs = b.args.profile
    raw = b.tmp / "profile.raw"
    cmd = [pyspy, "record", "--pid", str(b.procs["sidecar"].pid), "-d", str(secs), "-r", "200",
           "--format", "raw", "-o", str(raw)]
    if b.args.profile_native:
        cmd.append("--native")
    if b.args.profile_nonblocking:
        cmd.append("--nonblocking")
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, headers, pids = target_request(b, "sidecar")
        r = run_wrk(url, 16, secs + 2, headers, pids)
        out, _ = spy.communicate(timeout=secs + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        print(f"  profile: py-spy wrote nothing: {out.decode(errors='replace')[-500:]}", flush=True)
        return
    if b.args.profile_out:
        shutil.copy(raw, b.args.profile_out)
    summary = summarize_profile(raw)
    summary["rps_while_sampled"] = r["rps"]
    summary["cpu_us_per_req_while_sampled"] = r["cpu_us_per_req"]
    b.results["profile"] = summary
    print(f"  profile: {summary['samples']} samples at {r['rps']:.0f} rps", flush=True)


# --------------------------------------------------------------------------- report


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the sidecar against nginx on 127.0.0.1.")
    p.add_argument("--smoke", action="store_true", help="every phase, tiny durations and sizes (< 60 s)")
    p.add_argument("--duration", type=int, help="seconds per wrk point (default 5; smoke 1)")
    p.add_argument("--repeat", type=int, help="repeats per point, median reported (default 3; smoke 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--https-concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--stream-mib", type=int, help="MiB streamed each way (default 1024; smoke 20)")
    p.add_argument("--rtt-ms", type=float, default=2.0,
                   help="round trip of the latency relay in front of the TLS upstream (https phase; default 2)")
    p.add_argument("--burst", type=int, default=500, help="simultaneous cold requests (default 500)")
    p.add_argument("--phases", nargs="+", default=["load", "https", "stream", "cold", "floors"],
                   choices=["load", "https", "stream", "cold", "floors"])
    p.add_argument("--profile", type=int, default=0, help="py-spy the sidecar at c=16 for N seconds (0: off)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--profile-nonblocking", action="store_true",
                   help="py-spy --nonblocking (read without pausing; cross-checks stop-point bias)")
    p.add_argument("--profile-out", help="copy py-spy's raw collapsed stacks here")
    p.add_argument("--json", help="write every number (medians and single runs) to this file")
    p.add_argument("--markdown", help="write the result tables to this file")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    args.duration = args.duration or (1 if args.smoke else 5)
    args.repeat = args.repeat or (1 if args.smoke else 3)
    args.stream_bytes = (args.stream_mib or (20 if args.smoke else 1024)) * MIB
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        print(f"missing binaries: {', '.join(missing)} (Debian: apt-get install -y nginx-light wrk)", file=sys.stderr)
        return 3
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    children = Children(tmp)
    b = Bench(args, tmp, children)
    b.results["machine"] = machine()
    b.results["command"] = " ".join([Path(PY).name, "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    b.results["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    b.results["loadavg_start"] = Path("/proc/loadavg").read_text().strip()
    print(f"bench: temp dir {tmp}; machine {b.results['machine']}; loadavg {b.results['loadavg_start']}", flush=True)
    try:
        setup(b)
        print(f"  setup done in {time.monotonic() - started:.1f}s; idle RSS "
              + ", ".join(f"{k}={in_mib(v)}MiB" for k, v in b.results["rss_idle"].items()), flush=True)
        for phase in args.phases:
            t0 = time.monotonic()
            {"load": phase_load, "https": phase_https, "stream": phase_stream, "cold": phase_cold,
             "floors": phase_floors}[phase](b)
            print(f"  phase {phase} done in {time.monotonic() - t0:.1f}s", flush=True)
        if args.profile:
            phase_profile(b)
        for name in ("sidecar", "sidecar-jwt", "sidecar-aws"):
            out = b.procs[name].log
            b.results.setdefault("sidecar_stdout_bytes", {})[name] = out.stat().st_size if out.exists() else 0
    finally:
        children.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    b.results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    b.results["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    text, _checks = report(b.results, b.args, TARGETS)
    print()
    print(text)
    print()
    print(f"bench: done in {b.results['elapsed_seconds']}s; loadavg at start {b.results['loadavg_start']}, "
          f"at end {b.results['loadavg_end']} (other work on the machine skews every number)")
    if args.json:
        Path(args.json).write_text(json.dumps(b.results, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
