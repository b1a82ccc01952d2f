"""Packaging checks: one pinned dependency set across pip, conda and Docker, and working entry points."""

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)$")


def _normalize(name: str) -> str:
    """PEP 503 name normalisation, so `Foo_Bar` and `foo-bar` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_pin(line: str, where: str) -> tuple[str, str]:
    """Parse `name==version`; anything else (ranges, URLs, VCS, extras, markers) is an error."""
    match = PIN_RE.match(line)
    assert match, f"{where}: {line!r} is not an exact `name==version` pin"
    return _normalize(match["name"]), match["version"]


def _requirement_lines(path: Path) -> list[str]:
    """Non-empty lines of a requirements file with comments removed."""
    lines = (raw.split("#", 1)[0].strip() for raw in path.read_text().splitlines())
    return [line for line in lines if line]


def _pins(lines: list[str], where: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in lines:
        name, version = _parse_pin(line, where)
        assert name not in pins, f"{where}: {name} is pinned twice"
        pins[name] = version
    return pins


def _runtime_pins() -> dict[str, str]:
    return _pins(_requirement_lines(ROOT / "requirements.txt"), "requirements.txt")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with `\\` continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a `\\` continuation"
    return instructions


def _copy_sources() -> list[str]:
    """Build-context sources of every COPY/ADD (multi-stage `--from` copies excluded)."""
    sources: list[str] = []
    for keyword, args in _dockerfile_instructions():
        if keyword not in {"COPY", "ADD"}:
            continue
        parts = args.split()
        if any(part.startswith("--from") for part in parts):
            continue
        paths = [part for part in parts if not part.startswith("--")]
        assert len(paths) >= 2, f"Dockerfile: `{keyword} {args}` needs a source and a destination"
        sources.extend(paths[:-1])
    return sources


def _clean_make_env() -> dict[str, str]:
    """Environment for a nested `make`, without the outer make's flags and variable overrides."""
    env = dict(os.environ)
    for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTEST_ARGS"):
        env.pop(key, None)
    return env


def _make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=cwd,
        env=_clean_make_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def make_sandbox(tmp_path: Path) -> Path:
    """A copy of the Makefile, requirements files and pyproject.toml in an empty directory (no venv, no stamp)."""
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    for name in ("Makefile", "requirements.txt", "requirements-test.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def test_requirements_are_exact_pins_without_urls() -> None:
    for name in ("requirements.txt", "requirements-test.txt"):
        for line in _requirement_lines(ROOT / name):
            assert "git+" not in line and "://" not in line and " @ " not in line, (
                f"{name}: {line!r} is a URL/VCS dependency; pin a release from the package index"
            )
            if name == "requirements-test.txt" and line.startswith("-r"):
                continue
            _parse_pin(line, name)
    assert "torch" in _runtime_pins(), "requirements.txt must pin torch"


def test_test_requirements_include_runtime_and_do_not_repin() -> None:
    lines = _requirement_lines(ROOT / "requirements-test.txt")
    includes = [line for line in lines if line.startswith("-r")]
    assert includes == ["-r requirements.txt"], (
        f"requirements-test.txt must include the runtime set exactly once via `-r requirements.txt`, got {includes}"
    )
    test_pins = _pins([line for line in lines if not line.startswith("-r")], "requirements-test.txt")
    repinned = sorted(set(test_pins) & set(_runtime_pins()))
    assert not repinned, f"requirements-test.txt re-pins runtime packages {repinned}; pin them only in requirements.txt"


def test_environment_yaml_pins_match_requirements() -> None:
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    assert env["name"] == "ldm", "environment.yaml: the seed README activates `conda activate ldm`"
    deps = env["dependencies"]
    conda_deps = [dep for dep in deps if isinstance(dep, str)]
    assert "python=3.11" in conda_deps, f"environment.yaml must pin python=3.11, has {conda_deps}"
    assert "pip" in conda_deps, "environment.yaml must install pip before its pip: section"
    pip_sections = [dep["pip"] for dep in deps if isinstance(dep, dict) and "pip" in dep]
    assert len(pip_sections) == 1, "environment.yaml needs exactly one `pip:` section"
    pip_lines = [str(line).strip() for line in pip_sections[0]]
    options = [line for line in pip_lines if line.startswith("-")]
    assert not any(line.startswith(("-r", "--requirement")) for line in options), (
        "environment.yaml: list every pin explicitly instead of `-r requirements.txt`"
    )
    pins = _pins([line for line in pip_lines if not line.startswith("-")], "environment.yaml")
    assert pins == _runtime_pins(), (
        "environment.yaml pip pins differ from requirements.txt: "
        f"only in environment.yaml {sorted(set(pins.items()) - set(_runtime_pins().items()))}, "
        f"only in requirements.txt {sorted(set(_runtime_pins().items()) - set(pins.items()))}"
    )


def test_dockerfile_installs_requirements_and_nothing_conflicting() -> None:
    instructions = _dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert keywords[0] in {"FROM", "ARG"}, "Dockerfile must start with FROM"
    bases = [args for keyword, args in instructions if keyword == "FROM"]
    assert re.match(r"nvidia/cuda:\d+\.\d+(\.\d+)?-[\w-]*runtime-ubuntu\d+\.\d+$", bases[-1]), (
        f"Dockerfile: final base {bases[-1]!r} must be a tagged nvidia/cuda runtime image"
    )
    pip_runs = [args for keyword, args in instructions if keyword == "RUN" and re.search(r"\bpip3? install\b", args)]
    assert any(re.search(r"(-r|--requirement)\s+requirements\.txt\b", args) for args in pip_runs), (
        "Dockerfile must `pip install -r requirements.txt`"
    )
    runtime = _runtime_pins()
    for args in pip_runs:
        for token in args.split():
            token = token.strip("'\"")
            if "==" in token or "git+" in token or "://" in token:
                name, version = _parse_pin(token, "Dockerfile")
                assert runtime.get(name) == version, (
                    f"Dockerfile installs {name}=={version} but requirements.txt pins {name}=={runtime.get(name)}"
                )
    copy_index = next(
        (i for i, (keyword, args) in enumerate(instructions) if keyword == "COPY" and "requirements.txt" in args.split()[:-1]),
        None,
    )
    install_index = next(i for i, (keyword, args) in enumerate(instructions) if keyword == "RUN" and "requirements.txt" in args)
    assert copy_index is not None and copy_index < install_index, (
        "Dockerfile must COPY requirements.txt before installing it"
    )


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored() -> None:
    sources = _copy_sources()
    for required in ("main.py", "configs", "ldm", "scripts"):
        assert required in sources, f"Dockerfile must COPY {required}"
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert not missing, f"Dockerfile COPY sources missing from the repository: {missing}"
    ignore_patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for entry in (".venv", ".git", "logs", "outputs"):
        assert entry in ignore_patterns, f".dockerignore must exclude {entry}"
    for source in sources:
        hits = [pattern for pattern in ignore_patterns if fnmatch.fnmatch(source.rstrip("/"), pattern)]
        assert not hits, f"Dockerfile COPYs {source}, but .dockerignore excludes it via {hits}"


def test_ci_run_is_executable_and_runs_make_test() -> None:
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable (chmod +x .ci/run)"
    text = script.read_text()
    assert text.startswith("#!") and "bash" in text.splitlines()[0], ".ci/run must start with a bash shebang"
    assert "set -euo pipefail" in text, ".ci/run must fail fast with `set -euo pipefail`"
    assert re.search(r"^(exec\s+)?make test\b", text, re.MULTILINE), ".ci/run must call `make test`"
    tracked = subprocess.run(
        ["git", "ls-files", "--stage", "--", ".ci/run"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout
    if tracked:
        assert tracked.startswith("100755"), f".ci/run is tracked without its executable bit: {tracked.strip()}"


def test_make_test_creates_venv_then_runs_pytest(make_sandbox: Path) -> None:
    result = _make(make_sandbox, "-n", "test", "PYTEST_ARGS=-k sentinel_arg")
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    assert "-m venv" in plan, f"a fresh checkout must create the venv first:\n{plan}"
    assert re.search(r"-m pip install .*-r requirements-test\.txt", plan), f"must install requirements-test.txt:\n{plan}"
    assert re.search(r"-m pip install .*--no-deps --no-build-isolation -e \.$", plan, re.MULTILINE), (
        f"must install the project editable, offline, over the pins:\n{plan}")
    assert plan.index("-r requirements-test.txt") < plan.index("-e .") < plan.index("touch"), plan
    assert re.search(r"\.venv/bin/python -m pytest .*-k sentinel_arg", plan), f"must run pytest with PYTEST_ARGS:\n{plan}"
    assert re.search(r"touch \.venv/\.installed", plan), f"must stamp the venv after installing:\n{plan}"
    assert plan.index("pip install") < plan.index("touch") < plan.index("-m pytest"), plan


def test_make_test_skips_install_when_stamp_is_fresh(make_sandbox: Path) -> None:
    venv_bin = make_sandbox / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("")
    (venv_bin / "python").chmod(0o755)
    stamp = make_sandbox / ".venv" / ".installed"
    stamp.write_text("")
    past = time.time() - 100
    for name in ("requirements.txt", "requirements-test.txt", "pyproject.toml", ".venv/bin/python"):
        os.utime(make_sandbox / name, (past, past))

    assert _make(make_sandbox, "-q", ".venv/.installed").returncode == 0, "a fresh stamp must be up to date"
    plan = _make(make_sandbox, "-n", "test").stdout
    assert "pip install" not in plan and "-m venv" not in plan, f"second `make test` must not reinstall:\n{plan}"
    assert "-m pytest" in plan, plan

    for name in ("requirements.txt", "requirements-test.txt", "pyproject.toml"):
        os.utime(stamp, (past + 10, past + 10))
        os.utime(make_sandbox / name, None)
        plan = _make(make_sandbox, "-n", "test").stdout
        assert "pip install" in plan, f"editing {name} must trigger a reinstall:\n{plan}"
        assert "-m venv" not in plan, f"editing {name} must not recreate the venv:\n{plan}"
        os.utime(make_sandbox / name, (past, past))


def test_pyproject_installs_ldm_and_main_with_the_pinned_dependencies() -> None:
    import tomllib

    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, setuptools_config = config["project"], config["tool"]["setuptools"]
    assert project["requires-python"] == "==3.11.*"
    assert "main" in setuptools_config["py-modules"], "pyproject.toml must install main.py (py-modules)"
    packages = set(find_packages(where=str(ROOT), **setuptools_config["packages"]["find"]))
    ldm_packages = {".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.glob("ldm/**/__init__.py")}
    assert "ldm" in ldm_packages and ldm_packages <= packages, f"not installed: {sorted(ldm_packages - packages)}"
    assert all(name.split(".")[0] == "ldm" for name in packages), f"only ldm is a package of ours: {sorted(packages)}"
    # requirements.txt stays the one place of the pins: pyproject reads it instead of repeating it
    assert "dependencies" not in project and "dependencies" in project["dynamic"]
    assert setuptools_config["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}


def test_conda_and_docker_install_the_project() -> None:
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip_lines = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict) and "pip" in dep)
    assert "-e ." in [str(line).strip() for line in pip_lines], "environment.yaml must install the project (-e .)"
    instructions = _dockerfile_instructions()
    assert "pyproject.toml" in _copy_sources(), "Dockerfile must COPY pyproject.toml"
    install = next((i for i, (keyword, args) in enumerate(instructions)
                    if keyword == "RUN" and re.search(r"\bpip3? install\b.*-e \.(\s|$)", args)), None)
    assert install is not None, "Dockerfile must `pip install -e .` the project"
    copied = [i for i, (keyword, args) in enumerate(instructions) if keyword == "COPY"
              and {"pyproject.toml", "main.py", "ldm"} & set(args.split()[:-1])]
    assert copied and max(copied) < install, "Dockerfile must COPY pyproject.toml, main.py and ldm before installing"


def test_make_rebuilds_venv_whose_interpreter_is_gone(make_sandbox: Path) -> None:
    (make_sandbox / ".venv").mkdir()
    (make_sandbox / ".venv" / ".installed").write_text("")
    plan = _make(make_sandbox, "-n", "test").stdout
    assert "-m venv" in plan and "pip install" in plan, f"a stamp without an interpreter must not count:\n{plan}"


DOCKER_MOUNTS = {"/workspace/models", "/workspace/inputs", "/workspace/logs", "/workspace/outputs"}


def _docker_runs(text: str, comment: str = "") -> list[list[str]]:
    """Every `docker run` command in ``text`` (lines may start with ``comment``), `\\` continuations joined."""
    lines = [line.strip().removeprefix(comment).strip() for line in text.splitlines()]
    commands, pending = [], None
    for line in lines:
        if pending is None and not line.startswith("docker run"):
            continue
        pending = (pending or "") + " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            commands.append(shlex.split(pending))
            pending = None
    return commands


def _mounted(command: list[str]) -> set[str]:
    """Container paths of the `-v host:container` options."""
    return {command[i + 1].split(":")[1] for i, token in enumerate(command) if token in ("-v", "--volume")}


def test_readme_and_dockerfile_document_one_docker_run_that_keeps_results() -> None:
    readme = _docker_runs((ROOT / "README.md").read_text())
    dockerfile = _docker_runs((ROOT / "Dockerfile").read_text(), comment="#")
    assert len(readme) == 1 and len(dockerfile) == 1, (readme, dockerfile)
    assert readme[0] == dockerfile[0], "the README and the Dockerfile header must show the same docker run"
    command = readme[0]
    assert _mounted(command) == DOCKER_MOUNTS, "models/ and inputs/ in, logs/ and outputs/ back to the host"
    assert any(t.startswith("--shm-size") or t == "--ipc=host" for t in command), "DataLoader workers need /dev/shm"
    assert "--gpus" in command


def test_photos_and_weights_stay_out_of_the_image() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"models", "inputs", "**/*.ckpt", "**/*.safetensors", "**/*.pt", "**/*.jpg", "**/*.png"} <= ignored
    assert not {"models", "inputs"} & {source.rstrip("/") for source in _copy_sources()}


def test_driver_requirement_is_stated_where_users_read() -> None:
    for name in ("README.md", "Dockerfile", "environment.yaml"):
        assert "driver >= 580" in (ROOT / name).read_text(), f"{name} must state the NVIDIA driver requirement"


# Files run only with the test requirements installed (the benchmark's diffusers reference).
TEST_ONLY_CODE = ("scripts/benchmark.py", "scripts/bench/")


def _imported_packages(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level modules the files import (stdlib and this repository's own left out) -> importing files."""
    import ast
    import sys

    own = {p.stem for p in ROOT.iterdir()} | {p.stem for p in (ROOT / "scripts").iterdir()}
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - own:
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _distributions_by_module() -> dict[str, set[str]]:
    """Top-level module -> normalised names of the installed distributions providing it (from their RECORD)."""
    import importlib.metadata as metadata

    provided: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        tops = {f.parts[0].split(".")[0] for f in dist.files or [] if len(f.parts) > 1 or f.suffix in (".py", ".so")}
        for top in tops:  # a package directory, a module file, or an extension such as dlib-bin's dlib.*.so
            provided.setdefault(top, set()).add(_normalize(dist.metadata["Name"]))
    return provided


def test_every_imported_package_is_pinned() -> None:
    code = sorted([*ROOT.glob("ldm/**/*.py"), *ROOT.glob("scripts/**/*.py"), ROOT / "main.py"])
    runtime = [p for p in code if not str(p.relative_to(ROOT)).startswith(TEST_ONLY_CODE)]
    test_lines = [line for line in _requirement_lines(ROOT / "requirements-test.txt") if not line.startswith("-r")]
    pins = {"runtime": set(_runtime_pins()), "test": set(_runtime_pins()) | set(_pins(test_lines, "test"))}
    distributions = _distributions_by_module()
    for kind, files in (("runtime", runtime), ("test", code)):
        for module, importers in sorted(_imported_packages(files).items()):
            provided = distributions.get(module, set())
            assert provided, f"{module} (imported by {sorted(importers)[0]}) is not installed"
            where = "requirements.txt" if kind == "runtime" else "requirements-test.txt"
            assert provided & pins[kind], f"{sorted(importers)[0]} imports {module} ({sorted(provided)}): pin it in {where}"
