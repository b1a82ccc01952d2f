"""Shared fixtures and hooks: the tiny momentum-TI model, a trainable tiny checkpoint, a folder of photos, the
shared fixtures folder (../shared/fixtures) and the end-of-run line about the tests it skipped.

Plain helpers (paths, builders, CLI arguments, training hooks) are in helpers.py.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from helpers import (SHARED_FIXTURES_ABSENT, SHARED_FIXTURES_ENV, TINY_FINETUNE, build_tiny_model, shared_fixture,
                     write_photos)
from omegaconf import OmegaConf


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_FINETUNE)


@pytest.fixture(scope="session")
def tiny_model():
    """Built once per session; tests that change its embedding must restore it (see ``fresh_manager``)."""
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model) -> Path:
    """The tiny model's base weights (no embedding) as an SD-style ``.ckpt`` for ``--actual_resume``."""
    from ldm.checkpoint import save_checkpoint

    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("embedding_manager.")}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sd.ckpt", state)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "astronaut")


@pytest.fixture
def one_thread():
    """Single-threaded CPU ops, whose results do not depend on how work is split between threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The shared fixtures folder (see ``helpers.shared_fixture``: a skip when absent, a failure under CI)."""
    return shared_fixture()


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Skips for absent shared fixtures all report ``shared_fixture``'s place, so ``-ra`` folds them into one line."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and SHARED_FIXTURES_ABSENT in report.longrepr[2]:
        report.longrepr = (inspect.getsourcefile(shared_fixture), inspect.getsourcelines(shared_fixture)[1],
                           report.longrepr[2])
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """One line for all the tests skipped because the shared fixtures are absent (a user's clone), after the
    short test summary (this wrapper is outside the terminal reporter's)."""
    result = yield
    absent = [r for r in terminalreporter.stats.get("skipped", []) if SHARED_FIXTURES_ABSENT in _skip_reason(r)]
    if absent:
        terminalreporter.write_line(
            f"{len(absent)} test{'s' * (len(absent) != 1)} skipped: the shared fixtures (../shared/fixtures) are absent; "
            f"set {SHARED_FIXTURES_ENV}=DIR to run them")
    return result
