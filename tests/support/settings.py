"""Config documents for the settings tests (test_config, test_summary): one upstream, a keys file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.config import Settings, parse_settings


def upstream(**overrides: Any) -> dict[str, Any]:
    """The polygon upstream of the contract's example, with ``overrides``."""
    up: dict[str, Any] = {
        "url": "https://api.polygon.io",
        "secret": "mcp/polygon/{client_id}",
        "inject": {"query": "apiKey"},
    }
    up.update(overrides)
    return up


def config(keys_file: Path, **sections: Any) -> dict[str, Any]:
    """A whole config document: the file backend on ``keys_file``, the polygon upstream, ``sections``."""
    raw: dict[str, Any] = {
        "secrets": {"file": {"path": str(keys_file)}},
        "upstreams": {"polygon": upstream()},
    }
    raw.update(sections)
    return raw


def parse(raw: Any, tmp_path: Path, env: dict[str, str] | None = None) -> Settings:
    """``raw`` validated, relative paths from ``tmp_path``, with no environment but ``env``."""
    return parse_settings(raw, base_dir=tmp_path, env=env or {})
