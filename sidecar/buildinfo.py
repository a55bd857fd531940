"""Which build runs: pure Python or compiled by mypyc (setup.py), and whether an in-place build is stale.

Python imports an extension module in preference to the .py beside it, so an
in-place build (scripts/compile.sh) shadows its sources until it is rebuilt or
removed. compile.sh records a SHA-256 of every source after a build
(``python -m sidecar.buildinfo --record``); the sidecar warns at startup, and
the test suite refuses to run, when a source changed since. An installed
package (the image, a wheel) carries no record and is never called stale.

    python -m sidecar.buildinfo --record   # after compiling in place (prints the build too)
    python -m sidecar.buildinfo            # print the build; exit 1 if the in-place build is stale
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from importlib.util import find_spec
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
#: Written by compile.sh beside the compiled modules; ignored by git and by the image build.
MANIFEST = PACKAGE / ".compiled-sources.json"


@functools.cache
def compiled_modules() -> tuple[str, ...]:
    """The package's modules that import as mypyc-compiled C extensions; () when pure Python.

    A file built for another Python version (``x.cpython-312-...so`` under 3.11)
    is not imported, and not counted. Found once per process: what Python imports
    does not change while it runs.
    """
    found = []
    for path in PACKAGE.rglob("*"):
        suffix = next((s for s in EXTENSION_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            continue
        stem = path.name[: -len(suffix)]
        if "." in stem or stem.endswith("__mypyc"):  # another ABI's file, or mypyc's shared runtime
            continue
        name = ".".join(("sidecar", *path.relative_to(PACKAGE).parent.parts, stem))
        spec = find_spec(name)
        if spec is not None and isinstance(spec.loader, ExtensionFileLoader):
            found.append(name)
    return tuple(sorted(found))


def build() -> str:
    """``compiled`` or ``python``: how the data plane runs (--version and the startup line say it)."""
    return "compiled" if compiled_modules() else "python"


def source_digests() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def record() -> None:
    MANIFEST.write_text(json.dumps(source_digests(), indent=1) + "\n", encoding="utf-8")


def changed_since_compiled() -> list[str] | None:
    """Sources added, removed or edited since compile.sh ran; None when there is no record."""
    try:
        recorded: dict[str, str] = json.loads(MANIFEST.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    now = source_digests()
    return sorted(name for name in recorded.keys() | now.keys() if recorded.get(name) != now.get(name))


def stale_sources() -> list[str] | None:
    """What a compiled build running from this package was not compiled from.

    [] when nothing compiled runs or no source changed; the changed sources otherwise;
    None when compiled modules run but there is no record, as for an installed package
    (which is never stale) or an in-place build made without compile.sh.
    """
    return changed_since_compiled() if compiled_modules() else []


def main(argv: list[str]) -> int:
    if argv[1:] == ["--record"]:
        record()  # then say which build that is; nothing can have changed since
    modules = compiled_modules()
    print(f"{build()}: {' '.join(modules)}" if modules else build())
    changed = stale_sources()
    if changed:
        print("sources changed since compiled: " + ", ".join(changed))
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
