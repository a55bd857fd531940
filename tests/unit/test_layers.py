"""The import graph of sidecar/: no cycle but the known ones, and imports point one way.

Every ``sidecar.*`` import counts, wherever it is: at module level, under
``if TYPE_CHECKING:``, or inside a function (a lazy import still ties two modules
together). The sources are read with ``ast``; nothing is imported.

The layers (bottom to top) are those of issue 20's module map: ground (errors,
policy, metrics, the net helpers), config, parts (stores, identity, credentials,
injection, transport, upstream, routing), the request pipeline, the listeners,
and the app. A module may import from its own layer or a lower one.

What is known to be wrong today is listed in ``KNOWN_CYCLES`` and
``KNOWN_UPWARD``; both lists only shrink. A step that removes a cycle or an
upward import deletes its entry here (the test fails until it does, so the
lists never overstate); a new one fails outright. A new module fails until it
has a line in ``LAYER``: the modules the restructuring plans to add are listed
already.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar"

GROUND, CONFIG, PARTS, PIPELINE, LISTENERS, APP = range(6)
LAYER_NAMES = ("ground", "config", "parts", "pipeline", "listeners", "app")

#: Where each module belongs. Today's names that the restructuring renames or
#: dissolves say so; their entry goes when the module does.
LAYER: dict[str, int] = {
    # 0 ground: depends on nothing of ours but its neighbours here
    "sidecar": GROUND,  # the package itself (__version__)
    "sidecar.errors": GROUND,
    "sidecar.client_id": GROUND,  # CLIENT_ID_PATTERN, the one source
    "sidecar.policy": GROUND,
    "sidecar.metrics": GROUND,
    "sidecar.buildinfo": GROUND,
    "sidecar.mitm": GROUND,
    "sidecar.record": GROUND,  # the access record, RequestLine
    "sidecar.net": GROUND,  # the one host:port parser, URL split, trust, lookup
    "sidecar.refusal": GROUND,  # the HTTP shape of a refusal
    # 1 config: the settings schema and what reads or describes it
    "sidecar.access_log": CONFIG,
    "sidecar.config": CONFIG,
    "sidecar.summary": CONFIG,  # check's one-screen summary
    # 2 parts: what the pipeline is built from
    "sidecar.secrets": PARTS,
    "sidecar.secrets.base": PARTS,
    "sidecar.secrets.cache": PARTS,
    "sidecar.secrets.file": PARTS,
    "sidecar.secrets.aws": PARTS,
    "sidecar.secrets.vault": PARTS,
    "sidecar.secrets.factory": PARTS,
    "sidecar.identity": PARTS,
    "sidecar.identity.base": PARTS,  # was identity.py
    "sidecar.identity.header": PARTS,
    "sidecar.identity.jwt_bearer": PARTS,  # was tokens.py
    "sidecar.identity.factory": PARTS,
    "sidecar.credentials": PARTS,
    "sidecar.credentials.base": PARTS,
    "sidecar.credentials.static": PARTS,
    "sidecar.credentials.factory": PARTS,
    "sidecar.credentials.oauth": PARTS,
    "sidecar.inject": PARTS,
    "sidecar.transport": PARTS,
    "sidecar.transport.base": PARTS,
    "sidecar.transport.fast": PARTS,  # was fastclient.py
    "sidecar.transport.aio": PARTS,
    "sidecar.transport.failures": PARTS,
    "sidecar.upstream": PARTS,
    "sidecar.routing": PARTS,
    "sidecar.tracing": PARTS,  # one span per request (OpenTelemetry, imported only when on)
    # 3 pipeline: one request, from exchange to answer
    "sidecar.exchange": PIPELINE,  # the Exchange seam, ResponseHead, body rules
    "sidecar.pipeline": PIPELINE,  # DataPlane.serve: the one pipeline (was proxy.py)
    # 4 listeners: sockets, servers, CONNECT
    "sidecar.listen": LISTENERS,
    "sidecar.listen.fast": LISTENERS,  # the lean server (was fastserver.py)
    "sidecar.listen.aio_exchange": LISTENERS,
    "sidecar.listen.aio_server": LISTENERS,
    "sidecar.listen.connect": LISTENERS,
    "sidecar.listen.front": LISTENERS,  # owns the socket (was connect.py's Front)
    # 5 app: process lifecycle, supervisor, admin, CLI
    "sidecar.lifecycle": APP,
    "sidecar.app": APP,
    "sidecar.workers": APP,
    "sidecar.admin": APP,
    "sidecar.cli": APP,
    "sidecar.webhook": APP,  # the admission webhook: its own process, never the data plane
    "sidecar.webhook.settings": APP,
    "sidecar.webhook.mutate": APP,
    "sidecar.webhook.server": APP,
    "sidecar.oauth_login": APP,  # the oauth login command
    "sidecar.__main__": APP,
}

#: Import cycles there are today, each as the set of modules it ties together
#: (a strongly connected component of the graph). Shrinks: when a step breaks a
#: cycle, delete its entry (or write the part that is left).
KNOWN_CYCLES: list[frozenset[str]] = []

#: Imports from a lower layer to a higher one there are today, as (importer,
#: imported). Shrinks like KNOWN_CYCLES.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str:
    """The module an imported name lives in: the longest prefix that is one of ours."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return name  # ours by its name but no file: reported by the caller


def imports_of(name: str, source: str, known: dict[str, Path], *, is_package: bool = False) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every sidecar import in one module's source, at any depth of the tree."""
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package this module is in (or is)
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from sidecar import metrics` imports the module sidecar.metrics; `from sidecar import __version__` sidecar
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "sidecar" or target.startswith("sidecar."):
                yield resolve(target, known), node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported: first line}; self-imports left out."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges = graph.setdefault(name, {})
        source = path.read_text(encoding="utf-8")
        for target, line in imports_of(name, source, known, is_package=path.name == "__init__.py"):
            if target != name:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def show(cycle: frozenset[str]) -> str:
    return "{" + ", ".join(sorted(cycle)) + "}"


GRAPH = import_graph()


def test_the_walk_sees_lazy_and_type_checking_imports() -> None:
    # upstream imports FastPool under TYPE_CHECKING and inside a method; identity.factory
    # imports the JWT resolver inside a function (so header mode never loads PyJWT). If the
    # walk missed either kind, the known cycles would vanish and the test below would say so; this
    # says why, on a source with imports of every kind (relative ones too, which sidecar/ has none of yet).
    source = (
        "from typing import TYPE_CHECKING\n"
        "from sidecar import metrics, __version__\n"
        "from . import errors\n"
        "if TYPE_CHECKING:\n    from sidecar.pipeline import DataPlane\n"
        "def f():\n    import sidecar.secrets.cache\n    from .secrets import base\n"
    )
    found = {target for target, _ in imports_of("sidecar._probe", source, modules())}
    assert found == {
        "sidecar.metrics", "sidecar", "sidecar.errors", "sidecar.pipeline", "sidecar.secrets.cache", "sidecar.secrets.base"
    }


def test_every_import_names_a_module_that_exists() -> None:
    missing = [
        f"{importer} imports {target} (line {line}), which is no module in sidecar/"
        for importer, edges in GRAPH.items()
        for target, line in edges.items()
        if target not in GRAPH
    ]
    assert not missing, "\n".join(missing)


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(set(GRAPH) - set(LAYER))
    assert not unplaced, (
        f"{', '.join(unplaced)}: not in LAYER (tests/unit/test_layers.py); say where it belongs "
        f"({', '.join(f'{i} {n}' for i, n in enumerate(LAYER_NAMES))})"
    )


def test_no_import_cycle_but_the_known_ones() -> None:
    found = set(cycles(GRAPH))
    known = set(KNOWN_CYCLES)
    assert len(known) == len(KNOWN_CYCLES), "KNOWN_CYCLES lists a cycle twice"
    new, gone = found - known, known - found
    assert not new and not gone, "\n".join(
        [f"new import cycle: {show(c)}" for c in sorted(new, key=show)]
        + [f"no longer a cycle as listed (broken, or part of it left): {show(c)}" for c in sorted(gone, key=show)]
        + ["the cycles now: " + ("; ".join(sorted(map(show, found))) or "none") + ". Break a new one; update KNOWN_CYCLES"]
    )


@pytest.mark.parametrize("edge", sorted(KNOWN_UPWARD), ids="->".join)
def test_known_upward_imports_are_still_there(edge: tuple[str, str]) -> None:
    importer, target = edge
    assert target in GRAPH.get(importer, {}), f"{importer} no longer imports {target}: delete it from KNOWN_UPWARD"
    assert LAYER[target] > LAYER[importer], f"{importer} -> {target} no longer points up: delete it from KNOWN_UPWARD"


def test_imports_point_to_the_same_layer_or_lower() -> None:
    upward = [
        f"{importer} ({LAYER_NAMES[LAYER[importer]]}) imports {target} ({LAYER_NAMES[LAYER[target]]}), line {line}"
        for importer, edges in sorted(GRAPH.items())
        for target, line in sorted(edges.items())
        if importer in LAYER and target in LAYER
        and LAYER[target] > LAYER[importer]
        and (importer, target) not in KNOWN_UPWARD
    ]
    assert not upward, "imports pointing to a higher layer:\n" + "\n".join(upward)
