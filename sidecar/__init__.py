"""Credential sidecar for MCP servers: per-client key injection and an egress perimeter."""

__version__ = "0.1.0"
