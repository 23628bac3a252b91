"""The import contract: layers point down, stages stay apart, nothing imports in a circle.

    python -m vtp.layers            the package graph by layer, and every broken rule

Layers, top to bottom; a module may import its own unit and any layer below its own:

- application: the CLI, demo, process harness, bench, the development broker launcher
  and the tests; they may import anything below;
- stages: ``producers``, ``stream_jobs``, ``sinks``, ``owner_api``; a stage never imports
  another stage;
- kernel: ``vtp.core``;
- ``schemas``.

The vehicle side (``producers.sdk``, ``.spool``, ``.edge_wire``, ``.uplink``) runs on the
car and imports only ``schemas`` and each other.
Every first-party module must belong to a unit: a new package is outside the contract
until it is deliberately placed in a layer here.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (layer, its units): a unit is a package or module imported as a whole.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "application",
        (
            "vtp.cli",
            "vtp.demo",
            "vtp.harness",
            "vtp.scan",
            "vtp.serve",
            "vtp.report",
            "vtp.sql",
            "vtp.oracle",
            "vtp.layers",
            "vtp",
            "deploy",
            "bench",
            "tests",
        ),
    ),
    ("stages", ("producers", "stream_jobs", "sinks", "owner_api")),
    ("kernel", ("vtp.core",)),
    ("schemas", ("schemas",)),
)
OPEN_WITHIN_LAYER = {"application"}  # the application composes; stages stay apart
# The vehicle side: these import only schemas and each other (they ship without the server).
ONLY_SCHEMAS = dict.fromkeys(
    ("producers.sdk", "producers.spool", "producers.edge_wire", "producers.uplink"), ("schemas",)
)


def packages(root: Path = ROOT) -> list[str]:
    """Every top-level package of the tree (a folder with an ``__init__.py``): one that no
    layer names is reported, not skipped."""
    return sorted(
        d.name for d in root.iterdir() if (d / "__init__.py").is_file() and d.name[0] != "."
    )


@dataclass(frozen=True)
class Broken:
    importer: str
    imported: str
    rule: str

    def __str__(self) -> str:
        arrow = f" -> {self.imported}" if self.imported else ""
        return f"{self.importer}{arrow}: {self.rule}"


def unit_of(module: str) -> str | None:
    """The longest unit that contains ``module``."""
    best = None
    for _, units in LAYERS:
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (
                best is None or len(unit) > len(best)
            ):
                best = unit
    return best


def layer_of(unit: str) -> int:
    return next(i for i, (_, units) in enumerate(LAYERS) if unit in units)


def modules(root: Path = ROOT) -> Iterator[tuple[str, Path]]:
    for top in packages(root):
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports_of(module: str, path: Path, first_party: Collection[str] | None = None) -> set[str]:
    """First-party modules ``module`` imports, anywhere in its body (lazy imports too)."""
    first_party = packages() if first_party is None else first_party
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import name` names a submodule or something in pkg: graph() keeps
            # the longest known module.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in first_party)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = dict(modules(root))
    edges: dict[str, set[str]] = {}
    tops = packages(root)
    for module, path in known.items():
        found = {_known_prefix(m, known) for m in imports_of(module, path, tops)}
        edges[module] = {m for m in found if m and m != module}
    return edges


def _known_prefix(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def check(edges: dict[str, set[str]]) -> list[Broken]:
    broken = []
    for importer in sorted(edges):
        home = unit_of(importer)
        if home is None:
            broken.append(Broken(importer, "", "belongs to no layer (place it in vtp/layers.py)"))
            continue
        for imported in sorted(edges[importer]):
            there = unit_of(imported)
            if there is None:
                continue
            if (
                importer in ONLY_SCHEMAS
                and there not in ONLY_SCHEMAS[importer]
                and imported not in ONLY_SCHEMAS
            ):
                broken.append(Broken(importer, imported, "the vehicle SDK imports only schemas"))
            if there == home:
                continue
            mine, theirs = layer_of(home), layer_of(there)
            name = LAYERS[mine][0]
            if theirs < mine:
                broken.append(Broken(importer, imported, f"the {name} layer imports upward"))
            elif theirs == mine and name not in OPEN_WITHIN_LAYER:
                broken.append(Broken(importer, imported, f"one {name[:-1]} imports another"))
    return broken + [
        Broken(", ".join(c), "", "import circle among these modules") for c in circles(edges)
    ]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def unit_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for importer, imported in edges.items():
        home = unit_of(importer) or importer
        for m in imported:
            there = unit_of(m) or m
            if there != home:
                out[home].add(there)
    return out


def report(edges: dict[str, set[str]]) -> Iterable[str]:
    units = unit_graph(edges)
    for name, members in LAYERS:
        yield f"{name}:"
        for unit in members:
            if unit in units or any(unit_of(m) == unit for m in edges):
                yield f"  {unit} -> {', '.join(sorted(units.get(unit, ()))) or '(nothing)'}"
    broken = check(edges)
    yield f"{len(broken)} broken rule(s)" + (":" if broken else "")
    yield from (f"  {b}" for b in broken)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]).resolve() if args else ROOT
    edges = graph(root)
    for line in report(edges):
        print(line)
    return 1 if check(edges) else 0


if __name__ == "__main__":
    raise SystemExit(main())
