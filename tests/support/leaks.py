"""Every secret the suite uses, and every place the suite's output goes.

Tests create secrets with ``make_secret`` so that at the end of every run,
whichever tests ran, ``scan`` can grep all output for each of them: the sidecar
subprocesses' stdout/stderr and every log record of in-process tests
(tests/conftest.py calls it from ``pytest_sessionfinish``).
"""

from __future__ import annotations

import os
import secrets as _random
from pathlib import Path
from urllib.parse import quote

#: One folder per test session; conftest empties it when the session starts.
OUTPUT_DIR = Path(os.environ.get("SIDECAR_TEST_OUTPUT", Path(__file__).resolve().parents[2] / "test-output"))
SECRETS_FILE = OUTPUT_DIR / "secrets-used.txt"


def register_secret(value: str) -> str:
    """Remember a secret value the suite hands to the sidecar; returns it."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    with SECRETS_FILE.open("a", encoding="utf-8") as f:
        f.write(value + "\n")
    return value


def make_secret(label: str) -> str:
    """A fresh, unmistakable secret value (registered for the leak check)."""
    return register_secret(f"sk-{label}-{_random.token_hex(12)}")


def output_file(name: str) -> Path:
    """A file under the output folder for a subprocess's output."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR / name


def scan() -> list[str]:
    """Where a registered secret appears in the output folder, as it is or URL-encoded: one line per file and secret.

    Nothing registered is nothing to check: a run of tests that use no secret is clean.
    """
    try:
        secrets = {s for s in SECRETS_FILE.read_text(encoding="utf-8").splitlines() if s}
    except FileNotFoundError:
        return []
    leaks = set()
    for path in sorted(OUTPUT_DIR.rglob("*")):
        if not path.is_file() or path == SECRETS_FILE:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for secret in secrets:
            if secret in text or quote(secret, safe="") in text:
                leaks.add(f"{path.relative_to(OUTPUT_DIR)}: contains a secret ({secret[:6]}...)")
    return sorted(leaks)
