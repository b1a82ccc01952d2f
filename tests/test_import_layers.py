"""ldm imports downwards only and without cycles: the layers of ``ldm.LAYERS`` (see ldm/__init__.py).

Every module's source is parsed with ``ast`` (nothing is imported), imports inside functions and under
``if TYPE_CHECKING`` included. ldm imports neither ``main`` nor a script, and no script imports another
(the benchmark's own helper package aside, which never imports the benchmark script back). Config
targets that name a module since moved still resolve (``ldm.util.resolve_target``). ``from ldm.pkg import name`` is an import of the submodule ``ldm.pkg.name``
when there is one, else of the package ``ldm.pkg`` (its ``__init__``, whose own imports count as the
package's). Cycles are between modules, within a layer or not.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from ldm import LAYERS
from ldm.util import MODULE_ALIASES, TARGET_ALIASES, get_obj_from_str, instantiate_from_config, resolve_target

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ldm"
SCRIPTS = ROOT / "scripts"
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


def test_toy_datasets_need_nothing_above_the_data_layer() -> None:
    """A config naming a toy dataset (ldm.toy.scenes) loads the data layer and the toy world, not the app tier."""
    imports = find_imports(read_package())
    reached, todo = set(), ["ldm.toy.scenes"]
    while todo:
        module = todo.pop()
        for imp in imports:
            if imp.source == module and imp.target not in reached:
                reached.add(imp.target)
                todo.append(imp.target)
    data = next(index for index, (name, _) in enumerate(LAYERS) if name == "data")
    above = sorted(m for m in reached if layer_of(m) > data and m not in {"ldm.toy", "ldm.toy.world"})
    assert not above, f"ldm.toy.scenes imports, directly or through others, modules above the data layer: {above}"


# ------------------------------------------------------------------------------------ main.py and scripts


def script_names() -> set[str]:
    """The names the scripts import each other by (their folder is first on the import path): each
    scripts/*.py and each package in scripts/."""
    return ({path.stem for path in SCRIPTS.glob("*.py")}
            | {path.parent.name for path in SCRIPTS.glob("*/__init__.py")})


def absolute_imports(file: str, source: str) -> list[tuple[str, str]]:
    """(top-level name, where) of each absolute import in ``source``, and of each
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename=file)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            names = [node.args[0].value]
        found += [(name.partition(".")[0], f"{file}:{node.lineno}") for name in names]
    return found


def test_ldm_imports_neither_main_nor_scripts() -> None:
    forbidden = {"main", "scripts"} | script_names()
    found = [f"{where}: imports '{name}'" for file, source in read_package().values()
             for name, where in absolute_imports(file, source) if name in forbidden]
    assert not found, "ldm imports main.py or a script (move what they share into ldm):\n" + "\n".join(found)


# A script may import its own helper package; the package never imports the script back.
HELPER_PACKAGES = {"benchmark": "bench"}


def test_no_script_imports_another_script() -> None:
    names = script_names()
    found = []
    for path in sorted(SCRIPTS.rglob("*.py")):
        file = str(path.relative_to(ROOT))
        owner = path.stem if path.parent == SCRIPTS else path.relative_to(SCRIPTS).parts[0]
        allowed = {owner, HELPER_PACKAGES.get(owner)}
        for name, where in absolute_imports(file, path.read_text(encoding="utf-8")):
            if name == "scripts" or (name in names and name not in allowed):
                found.append(f"{where}: imports '{name}'")
    assert not found, "a script imports another script (move what they share into ldm):\n" + "\n".join(found)


def test_checker_finds_script_imports() -> None:
    source = ("import stable_txt2img\nfrom scripts.benchmark import Bench\nimport importlib\n"
              "def f():\n    return importlib.import_module('main.sub')\nfrom . import sibling\n")
    assert [name for name, _ in absolute_imports("x.py", source)] == ["stable_txt2img", "scripts", "importlib",
                                                                        "main"]


# -------------------------------------------------------------------------------------- old config targets

MOVED_TARGETS = {
    "main.ImageLogger": "ldm.train.callbacks.ImageLogger",
    "ldm.callbacks.ImageLogger": "ldm.train.callbacks.ImageLogger",
    "ldm.callbacks.EmbeddingCheckpoint": "ldm.train.callbacks.EmbeddingCheckpoint",
    "ldm.run_log.RunSummary": "ldm.train.run_log.RunSummary",
    "ldm.run_metrics.StepNumbering": "ldm.train.run_metrics.StepNumbering",
    "ldm.validation.callback.ValidationSampler": "ldm.train.validation.callback.ValidationSampler",
    "ldm.data.toy.ToyScenes": "ldm.toy.scenes.ToyScenes",
    "ldm.toy_benchmark.BenchmarkProbe": "ldm.toy.benchmark.BenchmarkProbe",
}


@pytest.mark.parametrize("old", sorted(MOVED_TARGETS))
def test_old_config_target_resolves_to_the_moved_class(old: str) -> None:
    assert resolve_target(old) == MOVED_TARGETS[old]
    assert get_obj_from_str(old) is get_obj_from_str(MOVED_TARGETS[old])


def test_old_toy_dataset_target_builds_the_dataset() -> None:
    scenes = instantiate_from_config({"target": "ldm.data.toy.ToyScenes", "params": {"size": 32, "num_scenes": 2}})
    assert type(scenes).__module__ == "ldm.toy.scenes" and len(scenes) == 2


def test_aliases_point_from_gone_modules_to_existing_ones() -> None:
    modules = read_package()
    shadowed = [old for old in MODULE_ALIASES if old in modules]
    assert not shadowed, f"MODULE_ALIASES names modules that still exist (the alias would hide them): {shadowed}"
    missing = [new for new in MODULE_ALIASES.values() if new not in modules]
    missing += [new for new in TARGET_ALIASES.values() if new.rpartition(".")[0] not in modules]
    assert not missing, f"aliases point to modules that do not exist: {missing}"


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
