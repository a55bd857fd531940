"""The client ID pattern has one source (sidecar/client_id.py); its copies must say the same.

The chart's values.schema.json refuses a bad ``default_client_id`` or ``prefetch`` entry
at ``helm install``, and the docs quote the pattern: each copy is checked against the
source, so changing it without them fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sidecar.client_id import CLIENT_ID_PATTERN
from sidecar.errors import InvalidClientId

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
ANCHORED = f"^{CLIENT_ID_PATTERN.pattern}$"
SCHEMA = ROOT / "charts" / "credential-sidecar" / "values.schema.json"
#: Where the schema holds a client ID, from its root (the sidecar's config section).
SCHEMA_PATHS = [
    ("sidecar", "config", "identity", "default_client_id"),
    ("sidecar", "config", "secrets", "prefetch", "items"),
]
DOCS = ["README.md", "docs/architecture.md", "docs/configuration.md", "docs/identity.md"]
#: A backticked copy of the pattern in the docs, right or wrong (its first two character classes).
_QUOTED = re.compile(r"`(\^\[A-Za-z0-9\]\[A-Za-z0-9[^`]*)`")


def _schema_node(path: tuple[str, ...]) -> dict[str, Any]:
    node: dict[str, Any] = json.loads(SCHEMA.read_text(encoding="utf-8"))
    for key in path:
        node = node[key] if key == "items" else node["properties"][key]
    return node


@pytest.mark.parametrize("path", SCHEMA_PATHS, ids=".".join)
def test_the_chart_schema_uses_the_pattern(path: tuple[str, ...]) -> None:
    assert _schema_node(path)["pattern"] == ANCHORED


def test_the_schema_has_no_other_copy() -> None:
    text = SCHEMA.read_text(encoding="utf-8")
    assert text.count(json.dumps(ANCHORED)) == len(SCHEMA_PATHS)


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_quote_the_pattern(doc: str) -> None:
    quoted = _QUOTED.findall((ROOT / doc).read_text(encoding="utf-8"))
    assert quoted, f"{doc} no longer quotes the client ID pattern"
    assert set(quoted) == {ANCHORED}


def test_the_refusal_names_the_pattern() -> None:
    assert str(InvalidClientId()) == f"The client ID must match {ANCHORED}."
