"""Operations through the real CLI: metrics, drain on SIGTERM, reload on SIGHUP, key rotation."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.store_faults import secrets_manager
from tests.support.upstream import EchoUpstream

Start = Callable[..., SidecarProcess]


def scrape(sc: SidecarProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(sc.admin_url + "/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def file_config(tmp_path: Path, echo: EchoUpstream, keys: dict[str, str], **extra: Any) -> dict[str, Any]:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys), encoding="utf-8")
    return {
        "secrets": {"backend": "file", "file": {"path": str(keys_file)}},
        "upstreams": {
            "polygon": {
                "url": echo.url,
                "secret": "{client_id}",
                "inject": {"query": "apiKey"},
                "allow_private": True,
                "clients": ["alice", "bob"],
            }
        },
        **extra,
    }


def expect_cut(sc: SidecarProcess, path: str) -> Callable[[], None]:
    """A request that the sidecar's exit must cut off."""

    def run() -> None:
        with pytest.raises(requests.RequestException):
            get(sc, path)

    return run


def get(sc: SidecarProcess, path: str, client: str | None = "alice", timeout: float = 15) -> requests.Response:
    headers = {"X-Client-Id": client} if client else {}
    return requests.get(sc.url + path, headers=headers, timeout=timeout)


def port_open(url: str) -> bool:
    host, port = url.split("//")[1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def test_metrics_count_requests_and_refusals(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    sc = start_sidecar(file_config(tmp_path, echo, {"alice": make_secret("m")}))
    for _ in range(3):
        assert get(sc, "/polygon/echo/x").status_code == 200
    assert get(sc, "/polygon/echo/x", "bob").status_code == 403  # no credential
    assert get(sc, "/polygon/echo/x", "carol").status_code == 403  # not allowed
    assert get(sc, "/polygon/echo/x", None).status_code == 401
    assert get(sc, "/nope/x").status_code == 404
    m = scrape(sc)
    assert value(m, "sidecar_requests_total", upstream="polygon", status="200") == 3
    assert value(m, "sidecar_requests_total", upstream="polygon", status="403") == 2
    assert value(m, "sidecar_requests_total", upstream="-", status="404") == 1
    assert value(m, "sidecar_denied_total", reason="no_credential") == 1
    assert value(m, "sidecar_denied_total", reason="client_not_allowed") == 1
    assert value(m, "sidecar_denied_total", reason="missing_identity") == 1
    assert value(m, "sidecar_denied_total", reason="unknown_upstream") == 1
    assert value(m, "sidecar_secret_lookups_total", result="hit") == 2
    assert value(m, "sidecar_secret_lookups_total", result="miss") == 2
    assert value(m, "sidecar_request_duration_seconds_count", upstream="polygon") == 6
    assert value(m, "sidecar_inflight_requests") == 0
    assert value(m, "sidecar_ready") == 1
    # Bounded labels: no client ID or path ever becomes a label value.
    labels = {v for (_, ls) in m for _, v in ls}
    assert not labels & {"alice", "bob", "carol", "/polygon/echo/x"}


def test_sigterm_drains_inflight_request_and_exits_0(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    sc = start_sidecar(file_config(tmp_path, echo, {"alice": make_secret("d")}, shutdown_grace_seconds=10))
    result: dict[str, Any] = {}

    def slow() -> None:
        result["resp"] = get(sc, "/polygon/slow?delay=1.5")

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.4)
    sc.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert sc.readyz() == 503
    assert not port_open(sc.url)
    t.join(10)
    assert result["resp"].status_code == 200
    assert sc.proc is not None and sc.proc.wait(10) == 0


def test_sigterm_lets_a_stream_finish(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    sc = start_sidecar(file_config(tmp_path, echo, {"alice": make_secret("s")}, shutdown_grace_seconds=10))
    with requests.get(
        sc.url + "/polygon/sse?events=8&delay=0.15", headers={"X-Client-Id": "alice"}, stream=True, timeout=10
    ) as resp:
        lines = resp.iter_lines(chunk_size=1)
        first = next(line for line in lines if line)
        sc.signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert first == b"data: event-0"
    assert len(rest) == 7
    assert sc.proc is not None and sc.proc.wait(10) == 0


def test_grace_bounds_the_drain(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    sc = start_sidecar(file_config(tmp_path, echo, {"alice": make_secret("g")}, shutdown_grace_seconds=1))
    t = threading.Thread(target=expect_cut(sc, "/polygon/slow?delay=8"))
    t.start()
    time.sleep(0.3)
    started = time.monotonic()
    sc.signal(signal.SIGTERM)
    assert sc.proc is not None and sc.proc.wait(10) == 0
    assert time.monotonic() - started < 4
    t.join(10)


def test_second_signal_exits_at_once(start_sidecar: Start, tmp_path: Path, echo: EchoUpstream) -> None:
    sc = start_sidecar(file_config(tmp_path, echo, {"alice": make_secret("x")}, shutdown_grace_seconds=30))
    t = threading.Thread(target=expect_cut(sc, "/polygon/slow?delay=8"))
    t.start()
    time.sleep(0.3)
    sc.signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    sc.signal(signal.SIGINT)
    assert sc.proc is not None and sc.proc.wait(5) != 0
    assert time.monotonic() - started < 2
    t.join(10)


def test_sighup_applies_valid_config_and_keeps_old_on_invalid(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream
) -> None:
    keys = {"alice": make_secret("h")}
    config = file_config(tmp_path, echo, keys)
    sc = start_sidecar(config)
    assert get(sc, "/extra/echo/x").status_code == 404
    config["upstreams"]["extra"] = {**config["upstreams"]["polygon"], "url": echo.url + "/echo/extra"}
    sc.write_config({**config, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"})
    sc.signal(signal.SIGHUP)
    sc.wait_for_line(lambda line: line.get("message") == "config reloaded")
    assert get(sc, "/extra/y").status_code == 200
    assert echo.last().path == "/echo/extra/y"

    sc.write_config({"upstreams": {"broken": {"url": "ftp://nope"}}, "lgo": 1})
    sc.signal(signal.SIGHUP)
    line = sc.wait_for_line(lambda line: "reload refused" in str(line.get("message")))
    assert any("upstreams.broken.url" in p for p in line["problems"])
    assert get(sc, "/extra/y").status_code == 200
    assert get(sc, "/polygon/echo/z").status_code == 200
    m = scrape(sc)
    assert value(m, "sidecar_config_reloads_total", result="ok") == 1
    assert value(m, "sidecar_config_reloads_total", result="invalid") == 1


def test_inflight_request_keeps_its_config_across_reload(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream
) -> None:
    config = file_config(tmp_path, echo, {"alice": make_secret("k")})
    sc = start_sidecar(config)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", get(sc, "/polygon/slow?delay=1.5")))
    t.start()
    time.sleep(0.3)
    sc.write_config({**config, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "upstreams": {}})
    sc.signal(signal.SIGHUP)
    sc.wait_for_line(lambda line: line.get("message") == "config reloaded")
    t.join(10)
    assert result["r"].status_code == 200
    assert get(sc, "/polygon/echo/x").status_code == 404


def test_a_reload_to_another_store_takes_keys_from_it_though_the_upstream_is_kept(
    start_sidecar: Start, tmp_path: Path, echo: EchoUpstream
) -> None:
    # The upstream's settings are unchanged, so the reload keeps its Upstream (and its
    # connections); the store and its cache are new, and so is the credential provider
    # built over them. A provider kept with the Upstream would serve the old store's key.
    old, new = make_secret("store-old"), make_secret("store-new")
    config = file_config(tmp_path, echo, {"alice": old})
    sc = start_sidecar(config)
    echo.accepted_key = old
    assert get(sc, "/polygon/keyed").status_code == 200  # the old key is cached now
    other = tmp_path / "other-keys.yaml"
    other.write_text(yaml.safe_dump({"alice": new}), encoding="utf-8")
    secrets = {"backend": "file", "file": {"path": str(other)}}
    sc.write_config({**config, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "secrets": secrets})
    sc.signal(signal.SIGHUP)
    sc.wait_for_line(lambda line: line.get("message") == "config reloaded")
    echo.accepted_key = new
    sent = len(echo.received)
    assert get(sc, "/polygon/keyed").status_code == 200
    assert len(echo.received) == sent + 1  # sent once, with the new store's key: no refusal, no replay


def test_rotation_in_secrets_manager_is_picked_up_and_replayed(
    configured_sidecar: Start, moto_endpoint: str, echo: EchoUpstream
) -> None:
    old, new = make_secret("rot-old"), make_secret("rot-new")
    api = {"url": echo.url, "secret": "rot/{client_id}", "inject": {"query": "apiKey"}, "allow_private": True}
    sc = configured_sidecar({"api": api}, {"rot/erin": old}, backend="aws")
    echo.accepted_key = old
    assert get(sc, "/api/keyed", "erin").status_code == 200
    # Rotate: the store gets a new value and the upstream accepts only that.
    secrets_manager(moto_endpoint).put_secret_value(SecretId="rot/erin", SecretString=new)
    echo.accepted_key = new
    resp = requests.post(sc.url + "/api/keyed", data=b"payload", headers={"X-Client-Id": "erin"}, timeout=15)
    assert resp.status_code == 200
    assert [r.body_size for r in echo.received[-2:]] == [7, 7]  # the body was replayed
    assert get(sc, "/api/keyed", "erin").status_code == 200
    m = scrape(sc)
    assert value(m, "sidecar_secret_rotations_total", upstream="api", result="replayed") == 1
    sc.wait_for_line(lambda line: "replaying once" in str(line.get("message")))
    # A key the store still holds is not refetched on every refusal.
    echo.accepted_key = "something-else"
    for _ in range(3):
        assert get(sc, "/api/keyed", "erin").status_code == 401
    m = scrape(sc)
    assert value(m, "sidecar_secret_rotations_total", upstream="api", result="unchanged") == 3
    assert value(m, "sidecar_secret_fetch_duration_seconds_count", backend="aws") == 3


def test_a_sidecar_without_upstreams_needs_no_secrets_file(start_sidecar: Start) -> None:
    # `check` accepts this (a sidecar that only tunnels passthrough hosts needs no keys);
    # `run` used to stop on an assertion about the missing path.
    sc = start_sidecar({"secrets": {"backend": "file"}})
    assert sc.readyz() == 200
    answer = get(sc, "/polygon/x")
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_upstream"
    assert sc.stop() == 0


# ------------------------------------------------------------------ shared by app.py and workers.py (sidecar/lifecycle.py)


class _Loop:
    """Records the signal handlers installed on it, and fires them on request."""

    def __init__(self) -> None:
        self.handlers: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}

    def add_signal_handler(self, sig: int, callback: Callable[..., None], *args: Any) -> None:
        self.handlers[sig] = (callback, args)

    def fire(self, sig: int) -> None:
        callback, args = self.handlers[sig]
        callback(*args)


def test_the_first_stop_signal_drains_and_the_second_exits_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from sidecar import lifecycle

    class Exited(Exception):
        pass

    def exit_now(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(lifecycle.os, "_exit", exit_now)
    calls: list[str] = []
    loop, stop = _Loop(), asyncio.Event()
    lifecycle.on_signals(
        loop,  # type: ignore[arg-type]
        stop,
        log=logging.getLogger("sidecar.test"),
        draining=lambda: calls.append("draining"),
        second=lambda signame: calls.append(f"second {signame}"),
        hup=lambda: calls.append("hup"),
    )
    assert set(loop.handlers) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    with caplog.at_level(logging.INFO, logger="sidecar.test"):
        loop.fire(signal.SIGHUP)
        assert calls == ["hup"] and not stop.is_set()
        loop.fire(signal.SIGTERM)
        assert calls == ["hup", "draining"] and stop.is_set()
        with pytest.raises(Exited) as info:
            loop.fire(signal.SIGINT)
    assert info.value.args == (1,)
    assert calls == ["hup", "draining", "second SIGINT"]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("sidecar.test", "SIGTERM received")]


def test_the_interception_ca_is_opened_only_when_enabled(tmp_path: Path) -> None:
    from sidecar.config import MitmSettings
    from sidecar.lifecycle import StartupError, open_authority

    assert open_authority(MitmSettings()) is None
    out = tmp_path / "out" / "ca.pem"
    authority = open_authority(MitmSettings(enabled=True, ca_cert_out=out))
    assert authority is not None and authority.generated and out.exists()
    try:
        cert, key = authority.export()
        # A worker loads its supervisor's CA and writes nothing.
        out.unlink()
        worker = open_authority(MitmSettings(enabled=True, ca_cert_out=out), (cert, key), write_out=False)
        assert worker is not None and not worker.generated and not out.exists()
        worker.close()
    finally:
        authority.close()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(StartupError, match=r"^forward_proxy\.mitm: cannot load the interception CA: ValueError$"):
        open_authority(MitmSettings(enabled=True, ca_cert=bad, ca_key=bad))


async def test_the_admin_listener_serves_health_and_leaves_nothing_open_when_it_cannot_bind() -> None:
    import aiohttp

    from sidecar.admin import bound_address
    from sidecar.config import ListenAddress
    from sidecar.lifecycle import start_admin

    runner = await start_admin(ListenAddress("127.0.0.1", 0), lambda: False)
    try:
        address = bound_address(runner)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{address}/healthz") as health:
                assert health.status == 200
            async with session.get(f"http://{address}/readyz") as ready:
                assert ready.status == 503
        host, port = str(address).rsplit(":", 1)
        with pytest.raises(OSError):
            await start_admin(ListenAddress(host, int(port)), lambda: True)  # the port is taken
    finally:
        await runner.cleanup()
