"""The shape of the code, checked: imports flow one way and functions stay small (#18).

The import graph is built from the source with `ast`, imports inside functions included (they are
how a heavy dependency is deferred, but they are still dependencies); only imports under
`if TYPE_CHECKING:` are left out, as they never run; importing `a.b.c` counts as importing the
packages `a` and `a.b` as well, since their `__init__` runs first. Two rules:
- no cycles between modules;
- the layers: `trainer.api` (the spec, errors, estimate: pure) imports nothing else of kubetune;
  `trainer.artifacts` (URIs, S3, caches, outputs) only `api`; the operator (the control plane)
  only `trainer.api` and `trainer.artifacts`; nothing in the trainer imports the operator.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from .conftest import REPO

PACKAGES = {"trainer": "kubetune.trainer", "operator": "kubetune.operator"}
ALLOWED = {
    "kubetune.trainer.api": ("kubetune.trainer.api",),
    "kubetune.trainer.artifacts": ("kubetune.trainer.api", "kubetune.trainer.artifacts"),
    "kubetune.operator": ("kubetune.trainer.api", "kubetune.trainer.artifacts", "kubetune.operator"),
    "kubetune.trainer": ("kubetune.trainer",),
}
"""Module prefix -> the prefixes it may import (the longest matching prefix applies)."""
ROOT_PACKAGES = {"kubetune.trainer", "kubetune.operator"}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> dict[str, set[str]]:
    """module -> the kubetune modules it imports (resolved to the longest existing module)."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            names = _imported_names(node, module, path.name == "__init__.py")
            # `from pkg import sub` names a module; `from pkg.mod import func` the module itself
            targets = {resolve(name) for name in names[:-1] if name in known} or {resolve(n) for n in names[-1:]}
            if isinstance(node, ast.Import):
                targets = {resolve(name) for name in names}
            graph[module].update(t for t in targets if t and t != module)
    for module in list(graph):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        for target in list(graph[module]):
            graph[module].update(_parent_packages(target, module, known))
    return graph


def _parent_packages(target: str, importer: str, known: dict[str, Path]) -> set[str]:
    """The packages whose `__init__` runs when `target` is imported, other than the importer's own
    ancestors (already running when it is imported)."""
    parts = target.split(".")
    parents = {".".join(parts[:i]) for i in range(1, len(parts))}
    return {p for p in parents if p in known and known[p].name == "__init__.py"
            and not (importer == p or importer.startswith(p + "."))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
    return found


def allowed_prefixes(module: str) -> tuple[str, ...]:
    owner = max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)
    return ALLOWED[owner]


def test_the_import_graph_has_no_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_flow_one_way_between_the_layers() -> None:
    forbidden = []
    for module, targets in import_graph().items():
        for target in sorted(targets):
            if target in ROOT_PACKAGES:
                continue  # their __init__ imports no more than the api (checked below)
            if not any(target == p or target.startswith(p + ".") for p in allowed_prefixes(module)):
                forbidden.append(f"{module} -> {target}")
    assert not forbidden, "imports across a layer boundary:\n" + "\n".join(forbidden)


def test_the_root_packages_import_only_the_api() -> None:
    """`kubetune.trainer` and `kubetune.operator` run their `__init__` for every import below them:
    it may import the api (which everyone may), nothing else, or the layer rules would not hold."""
    graph = import_graph()
    for package in ROOT_PACKAGES:
        assert all(t.startswith("kubetune.trainer.api") for t in graph[package]), (package, graph[package])


def test_the_checker_sees_function_level_imports_and_cycles() -> None:
    """The checks above can fail: a function-level import is an edge, and a loop is found."""
    graph = import_graph()
    assert "kubetune.trainer.serve.engine" in graph["kubetune.trainer.serve.engines"]  # imported at module level
    assert "kubetune.trainer.serve.vllm_engine" in graph["kubetune.trainer.serve.engines"]  # inside create_engine
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # importing kubetune.operator.training.render runs the package's __init__ too
    assert "kubetune.operator.training" in graph["kubetune.operator.validation"]
    assert allowed_prefixes("kubetune.operator.training.render") == ALLOWED["kubetune.operator"]


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_every_command_module_is_listed_and_registers_its_commands() -> None:
    """The CLI's command table is the whole truth: each module adds exactly the commands it lists."""
    import argparse

    from kubetune.trainer.cli.main import COMMAND_MODULES, _add_group

    for group in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        _add_group(sub, group)
        assert tuple(sub.choices) == group.commands, group.module


def test_a_missing_optional_dependency_names_the_extra_and_a_broken_import_surfaces(tmp_path, monkeypatch, capsys) -> None:
    """#18: an ImportError no longer turns a command into "invalid choice" with the cause hidden."""
    import argparse
    import sys

    import pytest

    from kubetune.trainer.cli import main as cli

    (tmp_path / "needs_extra.py").write_text("import kopf_is_not_installed_here\n")
    (tmp_path / "broken_cmds.py").write_text("import kubetune.trainer.no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sub = argparse.ArgumentParser().add_subparsers()
    cli._add_group(sub, cli.CommandGroup("needs_extra", ("fancy",), extra="operator"))
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.CommandGroup("needs_extra", ("fancy",), extra="operator"),))
    assert cli.main(["fancy", "--anything"]) == 1  # not a spec error: the install is incomplete
    err = capsys.readouterr().err
    assert "kopf_is_not_installed_here" in err and "pip install 'kubetune[operator]'" in err
    with pytest.raises(ModuleNotFoundError, match=r"kubetune\.trainer\.no_such_module"):
        cli._add_group(sub, cli.CommandGroup("broken_cmds", ("broken",), extra="operator"))
    sys.modules.pop("needs_extra", None)


def test_the_architecture_page_names_real_files_and_functions() -> None:
    """docs/pages/architecture.md walks the request paths as `file.py:function` hops: each must
    exist, or the page has gone stale."""
    import re

    text = (REPO / "docs" / "pages" / "architecture.md").read_text()
    hops = set(re.findall(r"`((?:trainer|operator)/[\w/]+\.py):(\w+)`", text))
    assert len(hops) >= 20, hops
    for path, name in sorted(hops):
        source = REPO / path
        assert source.is_file(), f"{path} does not exist"
        defined = {n.name for n in ast.walk(ast.parse(source.read_text()))
                   if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
        defined |= {t.id for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        assert name in defined, f"{path} has no {name}"
    for path in set(re.findall(r"`((?:trainer|operator)/[\w/]+\.py)`", text)):
        assert (REPO / path).is_file(), f"{path} does not exist"


def test_the_api_reads_and_writes_no_files() -> None:
    """`trainer.api` is the pure contract (#18): the spec, its errors, the estimate; reading a
    spec file is the CLI's job (`cli/specfiles.py`), reading a model's config the artifacts'."""
    import re

    calls = re.compile(r"\b(open|read_text|write_text|read_bytes|write_bytes|urlopen)\(")
    found = [f"{path.relative_to(REPO)}: {m.group(0)}" for module, path in modules().items()
             if module.startswith("kubetune.trainer.api") for m in calls.finditer(path.read_text())]
    assert not found, found
