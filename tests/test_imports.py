"""The house rules that a reader relies on: no import cycle among the project's modules, and no stage
imports another stage (shared code lives in minisora/), except the demo, which runs the stages in order."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("minisora", "stages", "cli")


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere (function bodies included). A package's
    __init__ and its own submodules are not edges of each other (importing a child runs the parent)."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = mod.split(".")
                if node.level:
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {t for t in map(known, names) if t}
        graph[mod] = {t for t in targets if t != mod and not t.startswith(mod + ".") and not mod.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


STAGE_IMPORTERS_ALLOWED = {"stages.demo"}  # runs encode, train, sample and evaluate in order


def stage_to_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    """'stages.a -> stages.b' for every stage module importing another stage module, the demo excepted."""
    return sorted(f"{mod} -> {target}" for mod, targets in graph.items()
                  if mod.startswith("stages.") and mod not in STAGE_IMPORTERS_ALLOWED
                  for target in targets if target.startswith("stages."))


def test_the_graph_sees_real_edges():
    graph = import_graph()
    assert "minisora.data.teco_dmlab" in graph["minisora.data.clips"]
    assert "minisora.store" in graph["stages.encode"]


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stage_rule_finds_a_planted_violation():
    graph = {"stages.sample": {"stages.train", "minisora.pipeline"}, "stages.demo": {"stages.sample"},
             "minisora.run_dir": {"minisora.model"}, "cli.sample": {"stages.sample"}}
    assert stage_to_stage_imports(graph) == ["stages.sample -> stages.train"]
    assert stage_to_stage_imports({"stages.demo": {"stages.evaluate"}}) == []


def test_the_graph_sees_the_demo_running_the_stages():
    assert {"stages.train", "stages.sample", "stages.evaluate"} <= import_graph()["stages.demo"]


def test_no_stage_imports_another_stage():
    found = stage_to_stage_imports(import_graph())
    assert not found, ("a stage imports another stage; move the shared code into minisora/ (DESIGN: 'stages never "
                       "import stages'): " + ", ".join(found))
