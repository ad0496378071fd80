"""The import graph of the package, read from the source (`ast`), not from a running interpreter: `import diffmoe_hf`
imports every module, so a module importing fine at runtime proves nothing about what it depends on.

Layers, lowest first; a module imports only modules of its own layer or below:
0. the core library: models, MoE layers, formulations, routing, training losses, evaluation (everything of
   `diffmoe_hf` not named below);
1. the family registry (`families`) and the data about released models it reads (`published_settings`): still core,
   above the models it lists;
2. the pipeline (`diffmoe_hf.pipelines`) and the package's `__init__`, which gathers the core and the pipeline for
   diffusers;
3. conversion;
4. the front-ends: training, the Space, the command line (`cli`, `cli_evaluation`, `cli_expert_offload`, `__main__`).
Function-level imports count: a lazy import is still a dependency. The gathering `__init__` is left out of the cycle
check (it imports everything by design).
"""

import ast
import os

import pytest

from .conftest import REPO_ROOT


def _installed_folders() -> dict[str, str]:
    """Repository folder -> package name: `diffmoe_hf` and the top-level folders setup.py installs into it."""
    tree = ast.parse(open(os.path.join(REPO_ROOT, "setup.py"), encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TOP_LEVEL_SUBPACKAGES":
            return {"diffmoe_hf": "diffmoe_hf", **ast.literal_eval(node.value)}
    raise AssertionError("setup.py has no TOP_LEVEL_SUBPACKAGES")


def package_modules() -> dict[str, tuple[str, bool]]:
    """Module name -> (source file, whether it is a package `__init__`), for every module the package installs."""
    modules = {}
    for folder, package in _installed_folders().items():
        for root, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(root, name), os.path.join(REPO_ROOT, folder))[:-3].split(os.sep)
                is_package = parts[-1] == "__init__"
                modules[".".join([package, *parts[:-1]] if is_package else [package, *parts])] = (
                    os.path.join(root, name),
                    is_package,
                )
    return modules


def imported_modules(name: str, path: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its source (absolute and relative imports; `from p import x`
    counts as `p.x` when that is a module, else as `p`)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    return found - {name}


LAYERS = {
    1: ("diffmoe_hf.families", "diffmoe_hf.published_settings"),
    2: ("diffmoe_hf.pipelines",),
    3: ("diffmoe_hf.conversion",),
    4: (
        "diffmoe_hf.training",
        "diffmoe_hf.space",
        "diffmoe_hf.cli",
        "diffmoe_hf.cli_evaluation",
        "diffmoe_hf.cli_expert_offload",
        "diffmoe_hf.cli_sampling",
        "diffmoe_hf.__main__",
    ),
}


def layer(module: str) -> int:
    if module == "diffmoe_hf":
        return 2
    for number, prefixes in LAYERS.items():
        if any(module == prefix or module.startswith(f"{prefix}.") for prefix in prefixes):
            return number
    return 0


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {
        name: imported_modules(name, path, is_package, set(modules)) for name, (path, is_package) in modules.items()
    }


def test_the_graph_covers_the_package(import_graph):
    assert {"diffmoe_hf.families", "diffmoe_hf.conversion.convert", "diffmoe_hf.pipelines", "diffmoe_hf.cli"} <= set(
        import_graph
    )
    assert {"diffmoe_hf.models", "diffmoe_hf.published_settings"} <= import_graph["diffmoe_hf.families"]  # relative
    assert "diffmoe_hf.conversion.checkpoint_io" in import_graph["diffmoe_hf.conversion.convert"]
    assert {layer(m) for m in import_graph} == {0, *LAYERS}


def test_no_module_imports_a_higher_layer(import_graph):
    upward = sorted(
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in import_graph.items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles_apart_from_the_gathering_init(import_graph):
    graph = {module: targets - {"diffmoe_hf"} for module, targets in import_graph.items() if module != "diffmoe_hf"}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
