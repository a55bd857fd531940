"""PEP 517 build backend: setuptools' own, plus what mypyc needs when compiling.

``SIDECAR_COMPILE=1 pip install .`` compiles the request path with mypyc (see
setup.py). pip builds in an isolated environment holding only what the backend
asks for, so then, and only then, this asks for the type checker and what it
checks against: mypy and its stubs from the dev extra, and the package's own
dependencies (mypyc compiles against their real types; without them every
aiohttp or multidict object would be Any and the build fails). A plain install
downloads none of it.
"""

from __future__ import annotations

import os
import re
import tomllib

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every other hook is setuptools' own)


def compile_requested() -> bool:
    """SIDECAR_COMPILE: 1 compiles, 0 (or unset) does not; anything else is a mistake, not a silent no.

    setup.py asks this too, so the backend and the build agree on one reading.
    """
    value = os.environ.get("SIDECAR_COMPILE", "0")
    if value not in ("0", "1"):
        raise SystemExit(f"SIDECAR_COMPILE must be 0 or 1, not {value!r}")
    return value == "1"


def _compiling() -> list[str]:
    if not compile_requested():
        return []
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    # mypy itself (pinned: compiled semantics follow its version) and the stub packages,
    # as the dev extra type-checks with them.
    typing = [req for req in project["optional-dependencies"]["dev"] if re.match(r"mypy\b|types-|\S+-stubs\b", req)]
    return [*typing, *project["dependencies"]]


def get_requires_for_build_wheel(config_settings: dict[str, str] | None = None) -> list[str]:
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *_compiling()]


def get_requires_for_build_editable(config_settings: dict[str, str] | None = None) -> list[str]:
    return [*_setuptools.get_requires_for_build_editable(config_settings), *_compiling()]
