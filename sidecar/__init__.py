"""Credential sidecar for MCP servers: per-client key injection and an egress perimeter."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

__version__ = "0.1.0"


def compiled_modules() -> list[str]:
    """The package's modules present as mypyc-compiled C extensions (see setup.py); [] when pure Python.

    Python imports an extension module in preference to the .py beside it, so
    these are the modules that run compiled.
    """
    package = Path(__file__).parent
    suffixes = sorted(EXTENSION_SUFFIXES, key=len, reverse=True)  # ".cpython-311-...so" before ".so"
    found = set()
    for path in package.rglob("*"):
        suffix = next((s for s in suffixes if path.name.endswith(s)), None)
        if suffix is None:
            continue
        name = path.name[: -len(suffix)]
        if not name.endswith("__mypyc"):  # that one is the shared runtime library, not a module
            found.add(".".join(("sidecar", *path.relative_to(package).parent.parts, name)))
    return sorted(found)


def build() -> str:
    """``compiled`` or ``python``: how the data plane runs (the startup line and --version say it)."""
    return "compiled" if compiled_modules() else "python"
