"""Credential sidecar for MCP servers: per-client key injection and an egress perimeter."""

from __future__ import annotations

__version__ = "0.1.0"


# Imported when called, so `python -m sidecar.buildinfo` does not find itself half-imported.
def build() -> str:
    """``compiled`` or ``python``: how the data plane runs (see sidecar/buildinfo.py)."""
    from sidecar import buildinfo

    return buildinfo.build()


def compiled_modules() -> list[str]:
    """The modules that import as mypyc-compiled C extensions (see sidecar/buildinfo.py)."""
    from sidecar import buildinfo

    return buildinfo.compiled_modules()
