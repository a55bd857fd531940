"""bench/fleet.py runs and its numbers hold together: the real cache against the closed form of docs/operations.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def fleet(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / f"fleet-{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fleet.py"), "--pods", "6", "--clients", "20", "--interval", "30",
         "--json", str(out), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "store calls/s" in proc.stdout and "Secrets Manager" in proc.stdout
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_the_fleet_model_matches_the_closed_form_and_the_knobs_move_it(tmp_path: Path) -> None:
    base = fleet(tmp_path, "--ttl", "300")
    assert 0 < base["store_calls"] < base["requests"]
    # Steady state: pods x clients / (ttl + interval), within the noise of a 1 h run.
    assert abs(base["steady_calls_per_second"] - base["predicted_calls_per_second"]) < (
        0.15 * base["predicted_calls_per_second"]
    ), base
    longer = fleet(tmp_path, "--ttl", "1200")
    assert longer["steady_calls_per_second"] < 0.5 * base["steady_calls_per_second"]
    # Restarts with prefetch add every client's fetch at every start; revoking rotated keys adds refetches.
    churn = fleet(tmp_path, "--ttl", "300", "--restarts-per-hour", "2", "--prefetch", "--rotations-per-hour", "30")
    assert churn["store_calls"] > base["store_calls"]
    assert churn["rejected_after_rotation"] > 0
