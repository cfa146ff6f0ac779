"""The package reads top-down: no module imports a module that imports it back (function-local imports
included), the serving apps depend only on the program, the DSPy client and the configuration, and the
product (`distill`) never imports the harness (`distill_harness`) nor reads the repository's docs."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# What `distill.serving.*` may import from the package (beyond itself).
# distill.logs is a leaf (standard library only): where Ray's and Serve's logs go.
SERVING_MAY_IMPORT = {"distill.config", "distill.errors", "distill.lm", "distill.logs", "distill.models",
                      "distill.program"}
# The pipeline's groups, bottom to top: a group imports only groups before it (stages/ and the top-level
# orchestration modules sit above them all). Foundation modules (config, errors, logs, ...) are below all.
GROUPS = ["distill.data", "distill.teacher", "distill.student", "distill.evaluation"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (SRC / "distill").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name and t != "distill"}
            deps |= {t.split(".")[0] for t in targets if t.split(".")[0] == "distill_harness"}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20  # the whole package was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_serving_depends_only_on_program_lm_and_config() -> None:
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("distill.serving"):
            outside = {d for d in deps if not d.startswith("distill.serving")} - SERVING_MAY_IMPORT
            assert not outside, f"{name} imports {sorted(outside)}"


def test_logs_is_a_leaf() -> None:
    assert not {d for d in import_graph()["distill.logs"] if d.startswith("distill")}


def test_the_product_never_imports_the_harness() -> None:
    offenders = {name: sorted(d for d in deps if d == "distill_harness")
                 for name, deps in import_graph().items()}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_product_reads_no_docs_and_cites_no_findings() -> None:
    """docs/ and the probes' FINDINGS are about the product; a run's behaviour never depends on them."""
    for path in (SRC / "distill").rglob("*.py"):
        text = path.read_text()
        assert '"docs"' not in text and "'docs'" not in text, path
        assert "FINDINGS" not in text, path


def test_groups_import_downward_only() -> None:
    for name, deps in import_graph().items():
        group = next((g for g in GROUPS if name.startswith(g + ".")), None)
        if group is None:
            continue
        above = {g for g in GROUPS[GROUPS.index(group) + 1:]} | {"distill.stages", "distill.pipeline",
                                                                   "distill.report", "distill.cli"}
        bad = sorted(d for d in deps if any(d == a or d.startswith(a + ".") for a in above))
        assert not bad, f"{name} imports {bad}, which sit above it"
