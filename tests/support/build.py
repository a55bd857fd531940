"""Which sources the in-place compiled build (scripts/compile.sh) was made from.

A compiled module shadows its .py, and it was also type-checked against the
modules it imports; so "is it stale?" is a question about every source of the
package, not one file's timestamp. compile.sh records a SHA-256 of each .py
after a successful build (``python -m tests.support.build --record``);
tests/conftest.py compares before the session starts.

    python -m tests.support.build --record   # after compiling
    python -m tests.support.build            # exit 1 and name what changed since
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import sidecar

PACKAGE = Path(sidecar.__file__).resolve().parent
#: Beside the compiled modules, ignored by git (.gitignore) and by the image (.dockerignore).
MANIFEST = PACKAGE / ".compiled-sources.json"


def source_digests() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def record() -> None:
    MANIFEST.write_text(json.dumps(source_digests(), indent=1) + "\n", encoding="utf-8")


def changed_since_compiled() -> list[str] | None:
    """Sources added, removed or edited since compile.sh ran; None: no record (not built by compile.sh)."""
    try:
        recorded: dict[str, str] = json.loads(MANIFEST.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    now = source_digests()
    return sorted(name for name in recorded.keys() | now.keys() if recorded.get(name) != now.get(name))


def main(argv: list[str]) -> int:
    if argv[1:] == ["--record"]:
        record()
        return 0
    changed = changed_since_compiled()
    if changed:
        print("changed since compiled: " + ", ".join(changed))
    return 1 if changed or (changed is None and sidecar.compiled_modules()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
