"""The import graph of src/polyglu, read from the source with `ast` (nothing is imported).

    python tools/import_graph.py            # cycles and library -> CLI edges
    python tools/import_graph.py --edges    # every edge, marking function-level ones
    python tools/import_graph.py --layers   # the graph between layers (subpackages, top-level modules)

Every `import` counts, at module level or inside a function (a function-local import that hides a
cycle is still a cycle), except those under `if TYPE_CHECKING:`, which never run. An edge points at
the module named, not at the packages above it that Python also initialises: `from polyglu.model.layers
import RMSNorm` is an edge to `polyglu.model.layers`, `from polyglu.model import PolychromaticLM` one to
`polyglu.model` (its `__init__`).

Imports by name through `importlib` (the lazy exports of `polyglu/__init__.py`, the verb table of
`polyglu.cli`) are not seen; both point down, from a package to its modules and from the CLI to a verb.

`tests/test_architecture.py` asserts the layering with this module.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "polyglu"
SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"
# The command layer: `polyglu.cli`, `python -m polyglu` and everything under `polyglu.commands`.
CLI_MODULES = ("polyglu.cli", "polyglu.commands", "polyglu.__main__")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    function_level: bool


def module_names(root: Path = SOURCE_ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/polyglu."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """Yield (node, inside_function) for every import that can run."""
    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for orelse in child.orelse:
                    yield from visit_one(orelse, in_function)
                continue
            yield from visit_one(child, in_function)

    def visit_one(node: ast.AST, in_function: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from visit(node, inner)

    yield from visit(tree, False)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(root: Path = SOURCE_ROOT) -> list[Edge]:
    modules = module_names(root)
    edges = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                # `from pkg import name` imports the submodule pkg.name when there is one.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in dict.fromkeys(targets):
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # `import polyglu.x.attr` -> the module part
                if target in modules and target != module:
                    edges.append(Edge(module, target, node.lineno, in_function))
    return edges


def adjacency(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    return graph


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Every elementary cycle, each once, starting at its smallest module name."""
    graph = adjacency(edges)
    found = []
    for start in sorted(graph):
        # Only cycles whose smallest node is `start`: each cycle is found exactly once.
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(path)
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return sorted(found, key=lambda cycle: (len(cycle), cycle))


def is_cli(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in CLI_MODULES)


def library_to_cli_edges(edges: list[Edge]) -> list[Edge]:
    return [edge for edge in edges if not is_cli(edge.source) and is_cli(edge.target)]


def layer_of(module: str) -> str:
    """The layer a module belongs to: its subpackage (`model`, `data`, `train`, ...) or, for a top-level
    module, its own name (`config`, `documents`, ...); `cli` and `__main__` are the layer `cli`, the
    package's `__init__` is `polyglu`."""
    parts = module.split(".")
    if len(parts) == 1:
        return PACKAGE
    return "cli" if parts[1] == "__main__" else parts[1]


def layer_graph(edges: list[Edge]) -> dict[str, set[str]]:
    """Layer -> the other layers it imports (every layer present, possibly with no imports)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        graph.setdefault(source, set())
        graph.setdefault(target, set())
        if source != target:
            graph[source].add(target)
    return graph


def layer_cycles(edges: list[Edge]) -> list[list[str]]:
    """Cycles between layers (a layer importing one that imports it back, through any modules)."""
    pairs = [Edge(a, b, 0, False) for a, targets in layer_graph(edges).items() for b in targets]
    return cycles(pairs)


def layer_levels(edges: list[Edge]) -> dict[str, int] | None:
    """Layer -> its level: 0 for a layer importing no other, else one above the highest it imports
    (so every import points to a lower level). None when layers import each other (no such order)."""
    graph = layer_graph(edges)
    if layer_cycles(edges):
        return None
    levels: dict[str, int] = {}

    def level(layer: str) -> int:
        if layer not in levels:
            levels[layer] = 1 + max((level(t) for t in graph[layer]), default=-1)
        return levels[layer]

    for layer in graph:
        level(layer)
    return levels


def layer_report(edges: list[Edge]) -> str:
    """The layer graph as text: each layer's imports, then the cycles or the levels (docs/architecture.md
    shows this text, and tests/test_architecture.py checks that it is current)."""
    lines = [f"{layer:<11} -> {', '.join(sorted(targets)) or '(nothing in polyglu)'}"
             for layer, targets in sorted(layer_graph(edges).items())]
    lines += ["layer cycle: " + " -> ".join(cycle + cycle[:1]) for cycle in layer_cycles(edges)]
    levels = layer_levels(edges)
    if levels is not None:
        lines.append("levels (each layer imports only layers on lower levels):")
        for level in sorted(set(levels.values()), reverse=True):
            lines.append(f"  {level}: {', '.join(sorted(n for n, v in levels.items() if v == level))}")
    return "\n".join(lines)


def _describe(edge: Edge) -> str:
    where = "function-level" if edge.function_level else "module-level"
    return f"{edge.source} -> {edge.target} (line {edge.line}, {where})"


def cycle_edges(edges: list[Edge], cycle: list[str]) -> list[Edge]:
    """The import statements that make up one cycle."""
    pairs = set(zip(cycle, cycle[1:] + cycle[:1]))
    return [edge for edge in edges if (edge.source, edge.target) in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    parser.add_argument("--layers", action="store_true", help="print the graph between layers")
    args = parser.parse_args(argv)
    edges = build_graph()
    if args.edges:
        for edge in sorted(edges, key=lambda e: (e.source, e.target, e.line)):
            print(_describe(edge))
        print()
    if args.layers:
        print(layer_report(edges))
        print()
    found = cycles(edges)
    print(f"{len(module_names())} modules, {len(edges)} import edges, {len(found)} cycles")
    for cycle in found:
        print("cycle: " + " -> ".join(cycle + cycle[:1]))
        for edge in cycle_edges(edges, cycle):
            print("    " + _describe(edge))
    to_cli = library_to_cli_edges(edges)
    print(f"{len(to_cli)} library -> CLI edges")
    for edge in to_cli:
        print("    " + _describe(edge))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
