"""Layering of src/polyglu, read from the import statements (tools/import_graph.py): the library never
imports the CLI, and import cycles stay out (module-level and function-level imports alike)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "import_graph.py"


@pytest.fixture(scope="module")
def import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def edges(import_graph):
    return import_graph.build_graph()


def _describe(import_graph, edges) -> str:
    return "\n".join(import_graph._describe(edge) for edge in edges)


def test_library_never_imports_the_cli(import_graph, edges):
    to_cli = import_graph.library_to_cli_edges(edges)
    assert not to_cli, "library modules import the command layer:\n" + _describe(import_graph, to_cli)


def test_commands_do_not_import_cli(import_graph, edges):
    # cli imports every verb's module; a verb importing cli back (for CommandError) closes a loop
    back = [e for e in edges if e.source.startswith("polyglu.commands") and e.target == "polyglu.cli"]
    assert not back, _describe(import_graph, back)


def test_at_most_one_import_cycle(import_graph, edges):
    cycles = import_graph.cycles(edges)
    shown = "\n".join(" -> ".join(c + c[:1]) for c in cycles)
    assert len(cycles) <= 1, f"{len(cycles)} import cycles:\n{shown}"


def test_graph_sees_function_level_and_relative_imports_but_not_type_checking(import_graph, tmp_path):
    package = tmp_path / "polyglu"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "cli.py").write_text("import polyglu.sub.low\n")
    (package / "sub" / "low.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from polyglu.sub.high import Thing\n"
        "def helper():\n    from . import high\n")
    (package / "sub" / "high.py").write_text(
        "from polyglu.sub.low import helper\n"
        "def run():\n    from polyglu.cli import main\n")
    edges = import_graph.build_graph(tmp_path)
    pairs = {(e.source, e.target, e.function_level) for e in edges}
    assert pairs == {("polyglu.cli", "polyglu.sub.low", False),
                     ("polyglu.sub.low", "polyglu.sub.high", True),  # relative, inside a function
                     ("polyglu.sub.high", "polyglu.sub.low", False),
                     ("polyglu.sub.high", "polyglu.cli", True)}
    assert import_graph.cycles(edges) == [["polyglu.sub.high", "polyglu.sub.low"],
                                          ["polyglu.cli", "polyglu.sub.low", "polyglu.sub.high"]]
    assert [(e.source, e.target) for e in import_graph.library_to_cli_edges(edges)] == \
        [("polyglu.sub.high", "polyglu.cli")]


def test_layers_import_one_way(import_graph, edges):
    # e.g. train.metrics reading routing off the model through analysis while analysis reads train's metrics
    loops = import_graph.layer_cycles(edges)
    shown = "\n".join(" -> ".join(c + c[:1]) for c in loops)
    assert not loops, f"layers that import each other:\n{shown}"


def test_layer_graph_collapses_modules_to_their_layer(import_graph, tmp_path):
    package = tmp_path / "polyglu"
    (package / "low").mkdir(parents=True)
    (package / "high").mkdir()
    for init in (package / "__init__.py", package / "low" / "__init__.py", package / "high" / "__init__.py"):
        init.write_text("")
    (package / "config.py").write_text("")
    (package / "__main__.py").write_text("import polyglu.high.b\n")
    (package / "low" / "a.py").write_text("import polyglu.config\nimport polyglu.low.c\n")
    (package / "low" / "c.py").write_text("def f():\n    import polyglu.high.b\n")
    (package / "high" / "b.py").write_text("import polyglu.low.a\n")
    edges = import_graph.build_graph(tmp_path)
    assert import_graph.layer_graph(edges) == {"cli": {"high"}, "high": {"low"}, "low": {"config", "high"},
                                               "config": set()}
    assert import_graph.layer_cycles(edges) == [["high", "low"]]
    assert import_graph.layer_levels(edges) is None
    (package / "low" / "c.py").write_text("")  # high -> low -> config, one way
    edges = import_graph.build_graph(tmp_path)
    assert import_graph.layer_levels(edges) == {"cli": 3, "high": 2, "low": 1, "config": 0}


def test_architecture_doc_shows_the_current_layers(import_graph, edges):
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("## Layers and the direction of dependencies", 1)[1]
    shown = section.split("```\n", 2)[1].rstrip("\n")  # the first fenced block of the section
    assert shown == import_graph.layer_report(edges), (
        "docs/architecture.md: the layer picture is stale; paste the output of "
        "`python tools/import_graph.py --layers`")
