"""Dependencies one way (docs/architecture.md): read every module of emassist/ with ``ast`` and check its imports.

Rules: a layer imports only its own layer or lower ones (core < config < data < model < serve < pipeline < cli);
nothing in emassist imports an entry point (stages/, pipelines/, bench/, tests/); only emassist.cli may import
serving/ (to start the web app); no import cycle between emassist modules (module-level imports). Every import
counts for the layer rules, also those inside functions and under ``if TYPE_CHECKING:``.

The tests keep the same rule among their own folders (code < data < model < system): a test imports only its own
test layer, lower ones and the shared support modules (tests/helpers.py, servers.py, ...), which import no layer.
"""

from __future__ import annotations

from pathlib import Path

from tests.code.import_graph import Edge, cycles, edges_from, module_file, package_modules, parse_edges

LAYERS = ("core", "config", "data", "model", "serve", "pipeline", "cli")
ENTRY_POINTS = ("stages", "pipelines", "bench", "tests")


def layer_of(module: str) -> int:
    """Rank of an emassist module's layer; the package root (``emassist/__init__.py``) ranks below core."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1


def layer_name(module: str) -> str:
    parts = module.split(".")
    return f"emassist.{parts[1]}" if len(parts) > 1 else "emassist"


def violations(edges: list[Edge]) -> list[str]:
    """Readable ``file:line: rule`` lines for the edges that break a rule (the unit of the checks below)."""
    problems = []
    deepest = {(e.path, e.line, e.target) for e in edges}
    for e in edges:
        if any((e.path, e.line) == (p, n) and t.startswith(e.target + ".") for p, n, t in deepest):
            continue  # `import a.b.c` also names a and a.b: report the statement once, by its module
        top = e.target.split(".")[0]
        if top in ENTRY_POINTS:
            problems.append(f"{e.where()}: {e.source} imports {e.target}: the library never imports an entry point")
        elif top == "serving" and layer_name(e.source) != "emassist.cli":
            problems.append(f"{e.where()}: {e.source} imports {e.target}: only emassist.cli may import serving/")
        elif top == "emassist" and layer_of(e.target) > layer_of(e.source):
            problems.append(
                f"{e.where()}: {e.source} imports {e.target}: upward import, {layer_name(e.source)} is below "
                f"{layer_name(e.target)} (order: {' < '.join(LAYERS)})"
            )
    return problems


def emassist_modules() -> list[str]:
    return package_modules("emassist")


def test_every_module_is_in_a_layer() -> None:
    strays = [m for m in emassist_modules() if m != "emassist" and m.split(".")[1] not in LAYERS]
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


def test_no_upward_import_nor_entry_point_import() -> None:
    edges = [e for m in emassist_modules() for e in edges_from(m)]
    assert len(edges) > 50  # the graph was read (the package has well over 50 project imports)
    problems = violations(edges)
    assert not problems, "imports against docs/architecture.md:\n  " + "\n  ".join(problems)


def test_no_import_cycle() -> None:
    found = cycles(emassist_modules())
    lines = []
    for component in found:
        members = set(component)
        inside = [e for m in component for e in edges_from(m) if e.kind == "top" and e.target in members]
        lines.append(" <-> ".join(component) + ": " + "; ".join(f"{e.where()} imports {e.target}" for e in inside))
    assert not found, "import cycles (module-level imports):\n  " + "\n  ".join(lines)


def test_the_checks_catch_what_they_are_for() -> None:
    """Each rule fires on a made-up edge and names the file, the line and the rule."""
    where = Path("emassist/data/x.py")
    made_up = [
        Edge("emassist.data.x", "emassist.serve.pyfunc", where, 3, "lazy"),
        Edge("emassist.data.x", "stages.train", where, 4, "top"),
        Edge("emassist.serve.x", "serving.webapp.app", Path("emassist/serve/x.py"), 5, "lazy"),
        Edge("emassist.cli.web", "serving.webapp.app", Path("emassist/cli/web.py"), 6, "lazy"),  # allowed
        Edge("emassist.model.x", "emassist.data.dataset", Path("emassist/model/x.py"), 7, "top"),  # allowed
        Edge("emassist.core.x", "emassist", Path("emassist/core/x.py"), 8, "top"),  # allowed: the root
    ]
    problems = violations(made_up)
    assert len(problems) == 3, problems
    assert problems[0].startswith("emassist/data/x.py:3: emassist.data.x imports emassist.serve.pyfunc: upward")
    assert "emassist.data is below emassist.serve" in problems[0]
    assert problems[1].startswith("emassist/data/x.py:4:") and "never imports an entry point" in problems[1]
    assert problems[2].startswith("emassist/serve/x.py:5:") and "only emassist.cli may import serving" in problems[2]


def test_graph_reader_sees_lazy_typing_and_relative_imports() -> None:
    """The reader finds imports inside functions and under TYPE_CHECKING, resolves relative imports and submodules."""
    text = "\n".join([
        "from typing import TYPE_CHECKING",
        "import numpy",
        "from emassist.config.settings import Params",
        "from . import ingest",
        "if TYPE_CHECKING:",
        "    from emassist.serve.pyfunc import SemClassifier",
        "def f():",
        "    from serving.webapp import app",
        "    import stages.train",
    ])  # fmt: skip
    edges = parse_edges(text, Path("emassist/data/x.py"))
    found = {(e.target, e.line, e.kind) for e in edges}
    assert ("emassist.config.settings", 3, "top") in found and ("emassist.config", 3, "top") in found
    assert ("emassist.data.ingest", 4, "top") in found
    assert ("emassist.serve.pyfunc", 6, "typing") in found
    assert ("serving.webapp.app", 8, "lazy") in found and ("stages.train", 9, "lazy") in found
    assert not any(e.target in ("numpy", "typing", "emassist", "emassist.data") for e in edges)
    problems = violations(list(edges))
    assert [p.split(":")[1] for p in problems] == ["6", "8", "9"], problems
    assert module_file("emassist.pipeline.acquire") == Path("emassist/pipeline/acquire.py")


# ------------------------------------------------------------------------------------------------ the tests' own layers

TEST_LAYERS = ("code", "data", "model", "system")  # tests/<layer>/, lowest first


def rank_in_tests(module: str) -> int:
    """Rank of a module under tests/: its test layer's, or -1 for the shared support modules (tests/helpers.py,
    servers.py, conftest.py, ...), which every layer may use."""
    parts = module.split(".")
    return TEST_LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in TEST_LAYERS else -1


def upward_test_imports(edges: list[Edge]) -> list[str]:
    return [
        f"{e.where()}: {e.source} imports {e.target}: a test imports only its own layer, lower ones and the support "
        f"modules (order: {' < '.join(TEST_LAYERS)}; support modules import no layer)"
        for e in edges
        if e.target.startswith("tests.") and rank_in_tests(e.target) > rank_in_tests(e.source)
    ]


def test_a_test_layer_never_imports_a_higher_one() -> None:
    edges = [e for m in package_modules("tests") for e in edges_from(m)]
    assert any(e.target == "tests.helpers" for e in edges)  # the graph was read
    problems = upward_test_imports(edges)
    assert not problems, "\n  ".join(["tests importing upward:", *problems])
    made_up = [
        Edge("tests.code.test_x", "tests.system.test_serving", Path("tests/code/test_x.py"), 3, "top"),
        Edge("tests.helpers", "tests.model.test_behaviour", Path("tests/helpers.py"), 4, "lazy"),
        Edge("tests.system.test_x", "tests.system.test_serving", Path("tests/system/test_x.py"), 5, "top"),  # allowed
        Edge("tests.model.test_x", "tests.helpers", Path("tests/model/test_x.py"), 6, "top"),  # allowed
    ]
    assert [p.split(": ")[0] for p in upward_test_imports(made_up)] == ["tests/code/test_x.py:3", "tests/helpers.py:4"]
