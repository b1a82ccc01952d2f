"""The one place that finds ../shared/fixtures (helpers.shared_fixture): where it looks, skip or fail.

Outside CI a missing fixture skips its test and the run ends with one line about it; under CI (``CI`` set
to a true value) it fails the test, so a CI run cannot pass by skipping.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (ROOT, SHARED_FIXTURES_ABSENT, SHARED_FIXTURES_ENV, in_ci, locate_shared_fixtures,
                     shared_fixture)


def make_fixtures(folder: Path) -> Path:
    (folder / "faces").mkdir(parents=True)
    (folder / "faces" / "a.jpg").write_bytes(b"jpeg")
    return folder


def git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True, text=True, timeout=60)


def clone_of(origin: Path, clone: Path, url: str | None = None) -> Path:
    """A checkout at ``clone`` whose origin remote is ``url`` (default: ``origin``'s path), without network."""
    origin.mkdir(parents=True, exist_ok=True)
    clone.mkdir(parents=True)
    git("init", "-q", str(clone))
    git("-C", str(clone), "remote", "add", "origin", url or str(origin))
    return clone


def test_the_environment_variable_wins(tmp_path, monkeypatch) -> None:
    root = tmp_path / "project"
    root.mkdir()
    make_fixtures(tmp_path / "shared" / "fixtures")
    custom = make_fixtures(tmp_path / "elsewhere")
    monkeypatch.setenv(SHARED_FIXTURES_ENV, str(custom))
    assert locate_shared_fixtures(root) == custom
    assert shared_fixture("faces/a.jpg", root=root) == custom / "faces" / "a.jpg"
    monkeypatch.setenv(SHARED_FIXTURES_ENV, str(tmp_path / "missing"))
    monkeypatch.delenv("CI", raising=False)
    assert locate_shared_fixtures(root) is None, "a set variable is the only place looked at"


def test_beside_the_project_then_beside_the_origin_checkout(tmp_path) -> None:
    env = {"CI": ""}
    beside = make_fixtures(tmp_path / "work" / "shared" / "fixtures")
    assert locate_shared_fixtures(tmp_path / "work" / "main", env) == beside

    clone = clone_of(tmp_path / "work" / "main", tmp_path / "tmp" / "clone")
    assert locate_shared_fixtures(clone, env) == beside, "a clone of a local checkout finds the origin's fixtures"
    assert shared_fixture("faces/a.jpg", root=clone, environ=env) == beside / "faces" / "a.jpg"
    file_url = clone_of(tmp_path / "work" / "main", tmp_path / "tmp" / "by_url", f"file://{tmp_path}/work/main/.git")
    assert locate_shared_fixtures(file_url, env) == beside
    remote = clone_of(tmp_path / "work" / "main", tmp_path / "tmp" / "remote", "https://example.com/work/main.git")
    assert locate_shared_fixtures(remote, env) is None, "a network origin is never looked at"


def test_missing_fixtures_skip_outside_ci_and_fail_under_ci(tmp_path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    with pytest.raises(pytest.skip.Exception, match=r"needs the shared fixtures \(absent\)"):
        shared_fixture("faces/a.jpg", root=root, environ={})
    assert shared_fixture("faces/a.jpg", required=False, root=root, environ={"CI": "false"}) is None

    with pytest.raises(pytest.fail.Exception) as failed:
        shared_fixture("faces/a.jpg", required=False, root=root, environ={"CI": "true"})
    message = str(failed.value)
    assert "\n" not in message and str(tmp_path / "shared" / "fixtures") in message
    assert f"set {SHARED_FIXTURES_ENV}=DIR" in message

    make_fixtures(tmp_path / "shared" / "fixtures")
    with pytest.raises(pytest.fail.Exception, match="faces/b.jpg is missing"):
        shared_fixture("faces/b.jpg", root=root, environ={"CI": "1"})
    with pytest.raises(pytest.skip.Exception, match="faces/b.jpg is absent"):
        shared_fixture("faces/b.jpg", root=root, environ={})


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("TRUE", True), ("yes", True),
                                            ("", False), ("0", False), ("false", False)])
def test_ci_means_a_true_value(value: str, expected: bool) -> None:
    assert in_ci({"CI": value}) is expected
    assert not in_ci({})


def test_the_fixtures_folder_has_its_readme(shared_fixtures) -> None:
    assert (shared_fixtures / "README.md").is_file()


def run_the_readme_test(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, SHARED_FIXTURES_ENV: "/nonexistent/fixtures", "CI": ci}
    test = f"{Path(__file__).relative_to(ROOT)}::test_the_fixtures_folder_has_its_readme"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_run_without_fixtures_ends_with_one_line_and_fails_under_ci() -> None:
    skipped = run_the_readme_test(ci="")
    assert skipped.returncode == 0, skipped.stdout[-3000:]
    assert ("1 test skipped: the shared fixtures (../shared/fixtures) are absent; "
            f"set {SHARED_FIXTURES_ENV}=DIR to run them") in skipped.stdout
    assert skipped.stdout.count(SHARED_FIXTURES_ABSENT) == 1, "the skips fold into one -ra line"

    failed = run_the_readme_test(ci="true")
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "/nonexistent/fixtures" in failed.stdout and f"set {SHARED_FIXTURES_ENV}=DIR" in failed.stdout
    assert "skipped: the shared fixtures" not in failed.stdout
