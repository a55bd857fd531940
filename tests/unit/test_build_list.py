"""setup.py's COMPILED list: what mypyc compiles, checked against the tree and against the build that runs.

A module renamed or moved without its line in COMPILED would silently run as
Python in the compiled build, with every other test still green. So: every path
listed exists, and when the suite runs on a compiled build (scripts/compile.sh),
exactly the listed modules import as compiled extensions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sidecar.buildinfo import compiled_modules

ROOT = Path(__file__).resolve().parents[2]


def compiled_list() -> list[str]:
    """The COMPILED list of setup.py, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in targets):
            paths = ast.literal_eval(value)
            assert isinstance(paths, list) and all(isinstance(p, str) for p in paths), "COMPILED is a list of paths"
            return paths
    raise AssertionError("setup.py assigns no COMPILED list at its top level")


def module_of(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


COMPILED = compiled_list()


def test_the_list_is_not_empty_and_has_no_duplicates() -> None:
    assert COMPILED
    assert len(set(COMPILED)) == len(COMPILED), sorted(p for p in COMPILED if COMPILED.count(p) > 1)


def test_every_listed_path_is_a_module_of_the_package() -> None:
    missing = [p for p in COMPILED if not (ROOT / p).is_file()]
    assert not missing, f"setup.py COMPILED names files that do not exist: {missing} (renamed or moved?)"
    outside = [p for p in COMPILED if not (p.startswith("sidecar/") and p.endswith(".py"))]
    assert not outside, f"COMPILED may list only sidecar/**/*.py: {outside}"


@pytest.mark.skipif(not compiled_modules(), reason="pure Python build: run after scripts/compile.sh")
def test_the_compiled_build_compiles_exactly_the_list() -> None:
    listed = {module_of(p) for p in COMPILED}
    running = set(compiled_modules())
    assert running == listed, (
        f"listed but running as Python: {sorted(listed - running)}; compiled but not listed: {sorted(running - listed)}"
    )
