"""Runs last: no secret the suite used appears in any output the suite produced.

Every sidecar subprocess writes its stdout/stderr under test-output/, in-process
log records go there too, and every secret is registered by ``make_secret``.
"""

from __future__ import annotations

from urllib.parse import quote

from tests.support.leaks import OUTPUT_DIR, SECRETS_FILE


def test_no_secret_in_any_output() -> None:
    secrets = {s for s in SECRETS_FILE.read_text(encoding="utf-8").splitlines() if s} if SECRETS_FILE.exists() else set()
    outputs = [p for p in OUTPUT_DIR.rglob("*") if p.is_file() and p != SECRETS_FILE]
    if len(secrets) < 3 or not outputs:
        # Run alone there is nothing to check; in the full suite there always is.
        import pytest

        pytest.skip("run with the rest of the suite")
    total = 0
    leaks = []
    for path in outputs:
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text)
        for secret in secrets:
            for form in {secret, quote(secret, safe="")}:
                if form in text:
                    leaks.append(f"{path.name}: contains a secret ({secret[:6]}...)")
    assert total > 10_000, "the suite produced suspiciously little output to check"
    assert not leaks, "\n".join(sorted(set(leaks)))
