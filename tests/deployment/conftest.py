"""Every test in this folder is marked ``deployment``: `pytest -m "not deployment"` is the fast loop.

These tests check what ships around the package (the container image, the Helm
chart, docker compose, the demo, the benchmark's smoke run); they build, render
or start real things and take most of the suite's time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.deployment)
