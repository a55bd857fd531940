"""The real CLI as a subprocess: config written to a file, ports read from its log.

Both listeners bind port 0; the sidecar's "listening" log line says which ports
it got, so parallel tests never race for a port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.leaks import output_file

START_TIMEOUT = 20.0


def address(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://host:port[/]`` URL; IPv6 brackets removed."""
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    return host.strip("[]"), int(port)


class SidecarProcess:
    """One ``credential-sidecar run`` process."""

    _count = 0

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        name: str = "sidecar",
    ) -> None:
        config = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **config}
        SidecarProcess._count += 1
        self.config_path = workdir / f"{name}-{SidecarProcess._count}.yaml"
        self.write_config(config)
        self.log_path = output_file(f"{name}-{os.getpid()}-{SidecarProcess._count}.log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin_url = ""

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def start(self, wait_ready: bool = True) -> SidecarProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.config_path.parent,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.get("message") == "listening":
                    self.url = f"http://{line['listen']}"
                    self.admin_url = f"http://{line['admin_listen']}"
                    break
            if self.url:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        else:
            self.kill()
            raise RuntimeError(f"sidecar did not start:\n{self.output()}")
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.readyz() == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"sidecar not ready after {timeout}s:\n{self.output()}")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the data plane, for raw sockets."""
        return address(self.url)

    def connect(self) -> socket.socket:
        """A raw TCP connection to the data plane (10 s timeout)."""
        return socket.create_connection(self.address, timeout=10)

    def raw(self, data: bytes) -> bytes:
        """Send bytes as they are (no client-side URL normalisation); read until the sidecar closes."""
        with self.connect() as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out

    def readyz(self) -> int:
        try:
            return requests.get(self.admin_url + "/readyz", timeout=2).status_code
        except requests.RequestException:
            return 0

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON line the process wrote so far."""
        out = []
        for raw in self.output().splitlines():
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out

    def access_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == "request"]

    def wait_for_line(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no matching log line within {timeout}s:\n{self.output()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def metrics_text(sc: SidecarProcess) -> str:
    return requests.get(sc.admin_url + "/metrics", timeout=5).text


def metric(sc: SidecarProcess, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text(sc)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += float(sample.value)
    return total
