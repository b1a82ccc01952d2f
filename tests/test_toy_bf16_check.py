"""scripts/toy_bf16_check.py: what it compares, and the runs it refuses before any sampling."""
from __future__ import annotations

import pytest

from scripts import toy_bf16_check as check


def point(fidelity, editability):
    return {"fidelity": fidelity, "editability": editability}


def test_compare_counts_identical_points_and_the_largest_and_mean_changes():
    stored = [point(0.5, 0.25), point(1.0, 0.5), point(0.75, 0.5)]
    rescored = [point(0.5, 0.25), point(0.75, 0.5), point(0.75, 0.625)]
    assert check.compare(stored, rescored) == {
        "identical": 1, "points": 3, "max_fidelity_change": 0.25, "max_editability_change": 0.125,
        "mean_fidelity_change": -0.25 / 3, "mean_editability_change": 0.125 / 3}


@pytest.mark.parametrize("spec, message", [
    ("ti", "is not CELL:SUBJECT[:SEED]"),
    ("ti:x", "is not CELL:SUBJECT[:SEED]"),
    ("dreambooth:0", "only embedding cells trained on the toy model itself"),
    ("dreambooth_momentum_0.1:0", "only embedding cells trained on the toy model itself"),
    ("ti:0:1", "holds no whole fp32 result of ti subject 0 seed 1"),
])
def test_a_run_that_cannot_be_rescored_is_a_one_line_error(spec, message, tmp_path, caplog):
    assert check.main([spec, "--workdir", str(tmp_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert not any(tmp_path.iterdir())  # nothing written
