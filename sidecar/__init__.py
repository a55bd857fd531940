"""Credential sidecar for MCP servers: per-client key injection and an egress perimeter."""

from __future__ import annotations

__version__ = "0.1.0"
