"""Credential sidecar for MCP servers: per-client key injection and an egress perimeter."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from importlib.util import find_spec
from pathlib import Path

__version__ = "0.1.0"


def compiled_modules() -> list[str]:
    """The package's modules that import as mypyc-compiled C extensions (see setup.py); [] when pure Python.

    Python imports an extension module in preference to the .py beside it, so
    these are the modules that run compiled. A file built for another Python
    version (``x.cpython-312-...so`` under 3.11) is not imported, and not counted.
    """
    package = Path(__file__).parent
    found = []
    for path in package.rglob("*"):
        suffix = next((s for s in EXTENSION_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            continue
        stem = path.name[: -len(suffix)]
        if "." in stem or stem.endswith("__mypyc"):  # another ABI's file, or mypyc's shared runtime
            continue
        name = ".".join(("sidecar", *path.relative_to(package).parent.parts, stem))
        spec = find_spec(name)
        if spec is not None and isinstance(spec.loader, ExtensionFileLoader):
            found.append(name)
    return sorted(found)


def build() -> str:
    """``compiled`` or ``python``: how the data plane runs (the startup line and --version say it)."""
    return "compiled" if compiled_modules() else "python"
