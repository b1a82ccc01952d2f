"""scripts/benchmark_resume.py: bad input is one line and exit 2 before any run (the timing itself is never asserted)."""
from __future__ import annotations

import logging

import pytest
from helpers import load_script


@pytest.mark.parametrize("argv", [["--steps", "10", "--resume_at", "9"], ["--resume_at", "0"]])
def test_resume_point_outside_the_run_exits_2_with_one_line(argv, caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert load_script("benchmark_resume").main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("--resume_at must be between 1 and --steps - 2")
