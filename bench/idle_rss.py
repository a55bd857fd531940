"""Idle resident memory of `credential-sidecar run`, file backend against the vault backend.

Each sidecar starts with one upstream, waits until /readyz is 200, and its VmRSS is
read from /proc/<pid>/status; the vault one reads a real OpenBao dev server (one
secret prefetched, so its login and HTTP client exist). Median of --runs starts.

    python bench/idle_rss.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.openbao import OpenBao  # noqa: E402
from tests.support.process import SidecarProcess  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(config: dict[str, Any], workdir: Path) -> int:
    # This checkout's sidecar, whichever one the Python has installed.
    sc = SidecarProcess(config, workdir, env={"PYTHONPATH": str(ROOT)}, name="rss").start(wait_ready=True)
    try:
        assert sc.proc is not None
        return rss_kib(sc.proc.pid)
    finally:
        sc.stop(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    workdir = Path(tempfile.mkdtemp(prefix="idle-rss-"))
    keys = workdir / "keys.yaml"
    keys.write_text("mcp/polygon/alice: sk-idle-rss-file\n")
    upstream = {"url": "https://api.polygon.io", "secret": "mcp/polygon/{client_id}", "inject": {"query": "apiKey"}}
    file_config = {"secrets": {"file": {"path": str(keys)}, "prefetch": ["alice"]}, "upstreams": {"polygon": upstream}}
    bao = OpenBao(workdir / "bao").start()
    try:
        bao.setup()
        bao.put("mcp/polygon/alice", api_key="sk-idle-rss-vault")
        role_id, secret_id = bao.approle()
        (workdir / "secret-id").write_text(secret_id)
        vault_config = {
            "secrets": {
                "backend": "vault", "prefetch": ["alice"],
                "vault": {"address": bao.address, "auth": {
                    "method": "approle", "role_id": role_id, "secret_id_file": str(workdir / "secret-id")}},
            },
            "upstreams": {"polygon": upstream},
        }
        results: dict[str, list[int]] = {"file": [], "vault": []}
        for _ in range(runs):
            results["file"].append(measure(file_config, workdir))
            results["vault"].append(measure(vault_config, workdir))
    finally:
        bao.stop()
    for kind, values in results.items():
        each = ", ".join(f"{v / 1024:.1f}" for v in values)
        print(f"{kind:6} VmRSS median {statistics.median(values) / 1024:.1f} MiB  ({each})")
    delta = statistics.median(results["vault"]) - statistics.median(results["file"])
    print(f"vault - file: {delta / 1024:+.1f} MiB")


if __name__ == "__main__":
    main()
