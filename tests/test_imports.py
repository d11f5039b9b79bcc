"""The package's import graph has no circle (module-level and function-level imports alike) and the top level
stays small; a test-only helper is never imported by the package outside `sedd_scale/testing/`."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sedd_scale"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every sedd_scale module named by an import anywhere in the file (under `if TYPE_CHECKING:` too: a circle of
    types is still a circle of concepts)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name == "sedd_scale" or name.startswith("sedd_scale.")}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for every module of sedd_scale."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        # A package that contains the importer is already being imported when the importer runs: not an edge.
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in files and t != name and t not in ancestors}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)):
            return found
    return None


def test_find_cycle_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_are_edges_too():
    tree = ast.parse("def f():\n    from sedd_scale.plan import search\nif TYPE_CHECKING:\n    import sedd_scale.x\n")
    assert _imports(tree, "sedd_scale.config.recipe", False) == {"sedd_scale.plan", "sedd_scale.plan.search",
                                                                  "sedd_scale.x"}


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_top_level_holds_at_most_six_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 6, f"the package's top level has {len(top)} modules ({top}): group them into packages"


def test_only_tests_and_benchmarks_import_the_testing_helpers():
    graph = import_graph()
    users = sorted(m for m, targets in graph.items() if not m.startswith("sedd_scale.testing")
                   and any(t.startswith("sedd_scale.testing") for t in targets))
    assert not users, f"package modules import test-only helpers: {users}"


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    """The circle the re-lay removed (the recipe's CLI importing the planner, which reads recipes) is caught."""
    pkg = tmp_path / "sedd_scale"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def main():\n    from sedd_scale import planner\n")
    (pkg / "planner.py").write_text("from sedd_scale.config import Recipe\n")
    assert find_cycle(import_graph(pkg)) == ["sedd_scale.config", "sedd_scale.planner", "sedd_scale.config"]


PATCHED = ("megatron", "deepspeed")  # what sedd_scale.compat patches as it loads (CPU workarounds)


def _imported(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def compat_violations(source: str, where: str) -> list[str]:
    """Imports of megatron-core or DeepSpeed not preceded by `import sedd_scale.compat`: at module level, or in the
    same function when the module level has none."""
    tree = ast.parse(source, where)
    top_level = [name for node in tree.body for name in _imported(node)]
    module_has_compat = "sedd_scale.compat" in top_level
    found = []

    def scan(body: list[ast.stmt], compat_seen: bool) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # runs later: after the module's imports
                scan(node.body, module_has_compat)
                continue
            for name in _imported(node):
                if name == "sedd_scale.compat":
                    compat_seen = True
                elif name.split(".")[0] in PATCHED and not compat_seen:
                    found.append(f"{where}:{node.lineno}: {name} before sedd_scale.compat")
            nested = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]  # if/try/with/class bodies
            if nested:
                scan(nested, compat_seen)

    scan(tree.body, False)
    return found


def test_compat_is_imported_before_megatron_and_deepspeed_everywhere():
    """megatron-core 0.19 does not even import on a CPU-only torch without compat's stub (and DeepSpeed builds
    ops): every file that imports either imports sedd_scale.compat first, at module level or in that function."""
    root = PACKAGE.parent
    files = [*(p for p in PACKAGE.rglob("*.py") if p.name != "compat.py"), *(root / "tools").glob("*.py"),
             *(root / "benchmarks").glob("*.py"), *(root / "tests").glob("*.py")]
    problems = [v for f in files for v in compat_violations(f.read_text(), str(f.relative_to(root)))]
    assert not problems, "\n".join(problems)


def test_the_compat_check_catches_a_late_import():
    late = "def f():\n    from megatron.core import parallel_state\n    import sedd_scale.compat\n"
    assert compat_violations(late, "x.py") == ["x.py:2: megatron.core before sedd_scale.compat"]
    assert compat_violations("import sedd_scale.compat\n\ndef f():\n    import deepspeed\n", "y.py") == []
