"""``workers: N``: several processes behind one port, one admin listener, summed metrics."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess, metric
from tests.support.tls import TlsEchoUpstream
from tests.support.upstream import EchoUpstream

Start = Callable[..., SidecarProcess]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_two_workers_share_the_port_and_the_metrics(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    key = make_secret("workers")
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"alice": key}), encoding="utf-8")
    config = {
        "workers": 2,
        "shutdown_grace_seconds": 5,
        "secrets": {"backend": "file", "file": {"path": str(keys)}},
        "upstreams": {
            "p": {"url": echo.url + "/echo", "secret": "{client_id}", "inject": {"query": "apiKey"}, "allow_private": True}
        },
    }
    sc = start_sidecar(config)
    assert sc.proc is not None
    workers = children(sc.proc.pid)
    assert len(workers) == 2

    def call(_: int) -> int:
        # A new connection each time, so the kernel spreads them over both workers.
        return requests.get(sc.url + "/p/x", headers={"X-Client-Id": "alice", "Connection": "close"}, timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(call, range(200))) == {200}
    assert echo.last().query == f"apiKey={key}"
    # Summed over both processes; a worker adds its counts within metrics.APPLY_SECONDS.
    deadline = time.monotonic() + 5
    while metric(sc, "sidecar_requests_total") != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(sc, "sidecar_requests_total") == 200
    # The duration histogram too (each worker adds a batch per bucket touched).
    assert metric(sc, "sidecar_request_duration_seconds_count", {"upstream": "p"}) == 200
    assert metric(sc, "sidecar_request_duration_seconds_bucket", {"upstream": "p", "le": "+Inf"}) == 200
    assert metric(sc, "sidecar_request_duration_seconds_bucket", {"upstream": "p", "le": "10.0"}) == 200
    assert 0 < metric(sc, "sidecar_request_duration_seconds_sum", {"upstream": "p"}) < 200 * 10
    served_by = {line.get("pid") for line in sc.lines() if line.get("message") == "worker listening"}
    assert len(served_by) == 2
    # The supervisor's listening line names the build too, as a single process's does.
    (listening,) = [line for line in sc.lines() if line.get("message") == "listening"]
    assert listening["workers"] == 2 and listening["build"] in ("compiled", "python")

    # A worker that dies is replaced, and readiness comes back.
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (
        workers[0] not in children(sc.proc.pid) and len(children(sc.proc.pid)) == 2 and sc.readyz() == 200
    ):
        time.sleep(0.1)
    assert sc.readyz() == 200
    assert set(children(sc.proc.pid)) - set(workers)
    assert call(0) == 200

    # SIGHUP reaches the workers.
    config["upstreams"]["q"] = {**config["upstreams"]["p"], "url": echo.url + "/echo/q"}
    sc.write_config({**config, "listen": sc.url.split("//")[1], "admin_listen": sc.admin_url.split("//")[1]})
    sc.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(1 for line in sc.lines() if line.get("message") == "config reloaded") < 2:
        time.sleep(0.1)
    assert requests.get(sc.url + "/q/y", headers={"X-Client-Id": "alice"}, timeout=10).status_code == 200

    current = children(sc.proc.pid)
    assert sc.stop() == 0
    for pid in current:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.parametrize("own_ca", [False, True], ids=["generated-ca", "own-ca"])
def test_workers_share_one_interception_ca(
    configured_sidecar: Start, tls: TlsEchoUpstream, tmp_path: Path, own_ca: bool
) -> None:
    from cryptography.hazmat.primitives import serialization

    from sidecar.mitm import _generate_ca

    key = make_secret("workers-mitm")
    ca_out = tmp_path / "ca.pem"
    mitm: dict[str, object] = {"enabled": True, "ca_cert_out": str(ca_out)}
    if own_ca:
        ca_key, cert = _generate_ca()
        (tmp_path / "own-ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "own-ca.key").write_bytes(
            ca_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        mitm |= {"ca_cert": str(tmp_path / "own-ca.pem"), "ca_key": str(tmp_path / "own-ca.key")}
    sc = configured_sidecar(
        {
            "api": {
                "url": tls.url, "secret": "{client_id}", "inject": {"query": "apiKey"},
                "allow_private": True, "ca_file": str(tls.ca_file),
            }
        },
        {"alice": key},
        workers=2,
        forward_proxy={"mitm": mitm},
    )
    for _ in range(12):  # new CONNECT each time, spread over both workers
        with requests.Session() as session:
            resp = session.get(
                f"https://localhost:{tls.port}/x", proxies={"https": sc.url},
                headers={"X-Client-Id": "alice"}, verify=str(ca_out), timeout=10,
            )
        assert resp.status_code == 200
    assert tls.last().query == f"apiKey={key}"
    assert sc.stop() == 0


def test_a_worker_that_cannot_start_stops_the_sidecar(tmp_path: Path) -> None:
    import subprocess
    import sys

    keys = tmp_path / "keys.yaml"
    keys.write_text("- not\n- a mapping\n", encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "workers": 2,
                "secrets": {"backend": "file", "file": {"path": str(keys)}},
                "upstreams": {"p": {"url": "https://api.example.com", "secret": "{client_id}", "inject": {"query": "k"}}},
            }
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "worker failed to start" in result.stdout


def test_importing_the_supervisor_leaves_prometheus_client_unloaded() -> None:
    # cli imports workers (and so lifecycle) before prepare_multiprocess_metrics sets the
    # folder that prometheus_client reads when it is first imported.
    import subprocess
    import sys

    code = "import sys, sidecar.workers, sidecar.lifecycle; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "False", result.stderr
