"""The layout promises of the README: an import path is a file path, services share only the library, no cycles.

Read from the source alone (ast, and importlib's PathFinder over the three source roots only), so
these hold for an editor or a static analyser that follows paths, whatever is installed.
"""

from __future__ import annotations

import ast
import subprocess
import tomllib
from functools import cache
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = [ROOT / "services", ROOT / "gateway", ROOT / "worker"]
SERVICES = ("gateway", "router", "aggregator", "worker")
SHARED = ("common", "v1")  # the library and the generated stubs: every service may import these, they import no service
MAX_LINES = 400
# Code that people write; generated stubs (meshserve/v1) are not, nor docs, nor the chart's one-file JSON schema.
CODE_SUFFIXES = {".py", ".sh", ".proto", ".tpl", ".html", ".js", ".css"}


def source_modules() -> dict[str, Path]:
    """Every module under the source roots, by dotted name (a package by its __init__.py)."""
    modules = {}
    for root in SOURCE_ROOTS:
        for path in sorted((root / "meshserve").rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            assert name not in modules, f"{name} is in two source roots: {modules.get(name)} and {path}"
            modules[name] = path
    return modules


def other_python_files() -> list[Path]:
    return sorted(p for folder in ("tests", "bench", "scripts", "k8s") for p in (ROOT / folder).rglob("*.py"))


@cache
def find(name: str) -> ModuleSpec | None:
    """The spec of `name` found from the source roots alone, part by part, as `python -I` with only them would."""
    parent, _, _ = name.rpartition(".")
    if parent:
        parent_spec = find(parent)
        if parent_spec is None or parent_spec.submodule_search_locations is None:
            return None
        path = list(parent_spec.submodule_search_locations)
    else:
        path = [str(root) for root in SOURCE_ROOTS]
    return PathFinder.find_spec(name, path)


@cache
def top_level_names(path: Path) -> frozenset[str]:
    """Names a module binds at its top level (what `from module import name` can take)."""
    stub = path.with_suffix(".pyi")  # generated protobuf modules bind their names at run time; their stubs declare them
    tree = ast.parse((stub if stub.exists() else path).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return frozenset(names)


def meshserve_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name taken from it or None) for every meshserve import in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "meshserve"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write the meshserve... path"
            if node.module and node.module.split(".")[0] == "meshserve":
                found += [(node.lineno, node.module, a.name) for a in node.names]
    return found


def imported_module(module: str, name: str | None) -> str:
    """The module an import loads: `from meshserve.v1 import common_pb2` loads meshserve.v1.common_pb2."""
    if name is not None and find(f"{module}.{name}") is not None:
        return f"{module}.{name}"
    return module


def unresolved_imports(path: Path) -> list[str]:
    """`line: what` for each meshserve import of the file that leads to no file, or to a file without the name."""
    problems = []
    for line, module, name in meshserve_imports(path):
        spec = find(module)
        if spec is None:
            problems.append(f"{line}: {module} is no file or folder under {', '.join(r.name for r in SOURCE_ROOTS)}")
        elif name is not None and name != "*" and find(f"{module}.{name}") is None:
            if spec.origin is None or name not in top_level_names(Path(spec.origin)):
                problems.append(f"{line}: {module} ({spec.origin or 'a namespace'}) has no module or name {name}")
    return problems


def service_of(module: str) -> str:
    return module.split(".")[1]


def test_every_meshserve_import_resolves_to_a_file_under_a_source_root() -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{problem}"
        for path in [*source_modules().values(), *other_python_files()]
        for problem in unresolved_imports(path)
    ]
    assert not problems, "imports that do not lead to a file:\n" + "\n".join(problems)


def test_meshserve_is_a_namespace_across_the_source_roots() -> None:
    # One meshserve/__init__.py would hide the other roots' portions from Python and from every tool.
    assert not [root for root in SOURCE_ROOTS if (root / "meshserve" / "__init__.py").exists()]
    spec = find("meshserve")
    assert spec is not None and spec.origin is None
    assert sorted(map(Path, spec.submodule_search_locations)) == sorted(root / "meshserve" for root in SOURCE_ROOTS)


def test_the_import_check_fails_on_a_path_that_is_not_a_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from meshserve.common.config import NOT_A_NAME\nimport meshserve.nowhere\nfrom meshserve import v2\n"
    )
    problems = unresolved_imports(bad)
    assert len(problems) == 3, problems


def test_the_packages_setuptools_installs_are_the_folders_under_the_source_roots() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in source_modules().items() if path.name == "__init__.py"}
    assert set(config["packages"]) == packages, "pyproject's [tool.setuptools] packages and the folders differ"
    for package, folder in config["package-dir"].items():
        assert (ROOT / folder).resolve() == source_modules()[package].parent, (package, folder)
    for package in packages:  # every package sits at its import path under the root of its top package
        assert source_modules()[package].parent.parts[-len(package.split(".")) :] == tuple(package.split("."))


def test_no_service_imports_another_services_python() -> None:
    crossings = []
    for module, path in source_modules().items():
        owner = service_of(module) if module.count(".") else "meshserve"
        if owner not in (*SERVICES, *SHARED):
            continue  # the command line (meshserve.cli) starts every service
        allowed = (*SHARED, owner) if owner in SERVICES else SHARED
        for line, imported, name in meshserve_imports(path):
            target = imported_module(imported, name)
            if target.count(".") == 0 or service_of(target) not in allowed:
                crossings.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target}")
    assert not crossings, "imports across services (share code through meshserve.common):\n" + "\n".join(crossings)


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {
        module: {imported_module(m, n) for _, m, n in meshserve_imports(path)} & modules.keys() - {module}
        for module, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_modules_import_each_other() -> None:
    found = cycles(import_graph())
    assert not found, "modules that import each other, directly or around a loop: " + "; ".join(map(str, found))


def test_the_cycle_check_finds_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def hand_written_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    generated = ROOT / "services" / "meshserve" / "v1"
    return [
        ROOT / name
        for name in listed
        if Path(name).suffix in CODE_SUFFIXES and (ROOT / name).parent != generated and (ROOT / name).exists()
    ]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout to tell tracked files")
def test_no_hand_written_file_is_over_400_lines() -> None:
    long_files = {
        str(path.relative_to(ROOT)): lines
        for path in hand_written_files()
        if (lines := len(path.read_text(errors="replace").splitlines())) > MAX_LINES
    }
    assert not long_files, f"files over {MAX_LINES} lines (split them by concept): {long_files}"
