"""ldm imports downwards only and without cycles: the layers of ``ldm.LAYERS`` (see ldm/__init__.py).

Every module's source is parsed with ``ast`` (nothing is imported), imports inside functions and under
``if TYPE_CHECKING`` included. ``from ldm.pkg import name`` is an import of the submodule ``ldm.pkg.name``
when there is one, else of the package ``ldm.pkg`` (its ``__init__``, whose own imports count as the
package's). Cycles are between modules, within a layer or not.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from ldm import LAYERS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ldm"
APP = next(index for index, (_, members) in enumerate(LAYERS) if not members)  # the layer of unnamed modules


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported ldm module or package
    where: str  # file:line
    text: str  # the import statement

    def __str__(self) -> str:
        return f"{self.where}: {self.text}  ({self.source} -> {self.target})"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_package(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """``{module name: (file, source)}`` for every ``.py`` file of the ldm package under ``root``."""
    return {module_name(path, root): (str(path.relative_to(root)), path.read_text(encoding="utf-8"))
            for path in sorted((root / PACKAGE).rglob("*.py")) if "__pycache__" not in path.parts}


def _known(name: str, modules) -> str:
    """``name`` or its innermost package that is a module of ours (an unknown name keeps its known prefix)."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def find_imports(modules: dict[str, tuple[str, str]]) -> list[Import]:
    """All imports of ldm modules by ldm modules, anywhere in their source."""
    found = []
    for name, (file, source) in modules.items():
        is_package = file.endswith("__init__.py")
        for node in ast.walk(ast.parse(source, filename=file)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            text = ast.get_source_segment(source, node) if targets else ""
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    target = _known(target, modules)
                    imp = Import(name, target, f"{file}:{node.lineno}", " ".join(text.split()))
                    if target != name and imp not in found:
                        found.append(imp)
    return found


def layer_of(module: str) -> int:
    """Index in LAYERS of the layer naming ``module`` or its innermost package; the root package is base."""
    if module == PACKAGE:
        return 0
    names = {name: index for index, (_, members) in enumerate(LAYERS) for name in members}
    while module != PACKAGE:
        if module in names:
            return names[module]
        module = module.rpartition(".")[0]
    return APP


def upward_imports(imports: list[Import]) -> list[str]:
    return [f"{imp}: layer '{LAYERS[layer_of(imp.source)][0]}' imports the higher layer "
            f"'{LAYERS[layer_of(imp.target)][0]}'"
            for imp in imports if layer_of(imp.target) > layer_of(imp.source)]


def import_cycles(imports: list[Import]) -> list[list[Import]]:
    """One cycle (as the imports that form it) per group of modules that import each other (Tarjan's SCC)."""
    graph: dict[str, list[Import]] = {}
    for imp in imports:
        graph.setdefault(imp.source, []).append(imp)
        graph.setdefault(imp.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # recursive: the depth is the longest import chain, a few dozen at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for imp in graph[node]:
            if imp.target not in index:
                visit(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in on_stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, list[Import]]) -> list[Import]:
    """A shortest cycle through the group's first module, as its imports (breadth-first search)."""
    start = min(group)
    came_by: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for imp in graph[node]:
                if imp.target == start:
                    path = [imp]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if imp.target in group and imp.target not in came_by:
                    came_by[imp.target] = imp
                    following.append(imp.target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # a strongly connected group has one


def format_cycles(cycles: list[list[Import]]) -> list[str]:
    return [" -> ".join([cycle[0].source] + [imp.target for imp in cycle]) + "\n    "
            + "\n    ".join(str(imp) for imp in cycle) for cycle in cycles]


# ------------------------------------------------------------------------------------------ the package


def test_ldm_imports_only_lower_layers() -> None:
    problems = upward_imports(find_imports(read_package()))
    assert not problems, "upward imports (see the layers in ldm/__init__.py):\n" + "\n".join(problems)


def test_ldm_has_no_import_cycles() -> None:
    cycles = format_cycles(import_cycles(find_imports(read_package())))
    assert not cycles, "import cycles between ldm modules:\n" + "\n".join(cycles)


def test_layers_name_existing_modules() -> None:
    modules = read_package()
    missing = [name for _, members in LAYERS for name in members if name not in modules]
    assert not missing, f"ldm.LAYERS names modules that do not exist: {missing}"


# ------------------------------------------------------------------------------------------ the checker


def fake_package(sources: dict[str, str]) -> dict[str, tuple[str, str]]:
    def file(name: str) -> str:
        return name.replace(".", "/") + ("/__init__.py" if name in {"ldm", "ldm.checkpoint"} else ".py")

    return {name: (file(name), source) for name, source in sources.items()}


def test_checker_finds_an_upward_import_inside_a_function() -> None:
    modules = fake_package({
        "ldm": "",
        "ldm.checkpoint": "from ldm.checkpoint.embeddings import EmbeddingFile\n",
        "ldm.checkpoint.embeddings": "def load():\n    from ldm.modules.tokenizer import default_tokenizer\n",
        "ldm.modules.tokenizer": "from ldm.checkpoint import EmbeddingFile\nimport ldm.util\n",
        "ldm.util": "",
    })
    problems = upward_imports(find_imports(modules))
    assert len(problems) == 1
    assert problems[0].startswith("ldm/checkpoint/embeddings.py:2: from ldm.modules.tokenizer import default_tokenizer")
    assert "'checkpoint' imports the higher layer 'modules'" in problems[0]


def test_checker_finds_a_cycle_through_a_package_init() -> None:
    modules = fake_package({
        "ldm": "",
        "ldm.checkpoint": "from ldm.checkpoint.embeddings import EmbeddingFile\n",
        "ldm.checkpoint.embeddings": "def load():\n    from ldm.checkpoint import interop\n",
        "ldm.checkpoint.interop": "from ldm.checkpoint import EmbeddingFile\n",
        "ldm.training": "from ldm.checkpoint import interop\nfrom . import util\n",
        "ldm.util": "",
    })
    imports = find_imports(modules)
    assert {(imp.source, imp.target) for imp in imports} == {
        ("ldm.checkpoint", "ldm.checkpoint.embeddings"), ("ldm.checkpoint.embeddings", "ldm.checkpoint.interop"),
        ("ldm.checkpoint.interop", "ldm.checkpoint"), ("ldm.training", "ldm.checkpoint.interop"),
        ("ldm.training", "ldm.util")}
    (cycle,) = format_cycles(import_cycles(imports))
    assert cycle.startswith("ldm.checkpoint -> ldm.checkpoint.embeddings -> ldm.checkpoint.interop -> ldm.checkpoint")
    assert "ldm/checkpoint/embeddings.py:2: from ldm.checkpoint import interop" in cycle
