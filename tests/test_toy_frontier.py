"""The toy benchmark's frontier maths, its reuse of finished runs, and its refusal of bad input.

Nothing here trains: the runs are stand-ins (scripts/toy_benchmark.py's Runner with train and scoring
replaced), so the tests check the bookkeeping, not learning (tests/test_toy_learning.py does that).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ldm.toy.frontier import (
    best_editability, bootstrap_intervals, frontier_area, mean_points, pareto_frontier, summarize_frontier,
)
from ldm.toy.benchmark import Protocol, load_record, method, record_path, save_record

# (fidelity, editability): 0, 1 and 3 are the frontier; 2 is dominated by 1, 4 repeats 1, 5 is below 3
POINTS = [(0.2, 0.9), (0.5, 0.5), (0.4, 0.4), (0.8, 0.1), (0.5, 0.5), (0.8, 0.05)]


def test_pareto_frontier_keeps_the_undominated_points_by_increasing_fidelity():
    assert pareto_frontier(POINTS) == [0, 1, 3]
    assert pareto_frontier([(0.3, 0.3)]) == [0]


def test_best_editability_at_a_fidelity_threshold():
    assert best_editability(POINTS, 0.5) == 0.5
    assert best_editability(POINTS, 0.7) == 0.1
    assert best_editability(POINTS, 0.0) == 0.9
    assert best_editability(POINTS, 0.9) is None  # no point is that faithful


def test_frontier_area_is_the_area_under_its_staircase():
    # best editability at fidelity >= x: 0.9 up to 0.2, 0.5 up to 0.5, 0.1 up to 0.8, then nothing
    assert frontier_area(POINTS) == pytest.approx(0.2 * 0.9 + 0.3 * 0.5 + 0.3 * 0.1)
    assert frontier_area([(1.0, 1.0)]) == pytest.approx(1.0)
    assert frontier_area([(0.0, 0.7)]) == 0.0  # no likeness at all: nothing under the frontier


def test_bootstrap_intervals_over_runs():
    identical = np.array([[[0.5, 0.2], [0.8, 0.1]]] * 4)  # 4 runs x 2 settings x (fidelity, editability)
    summary = summarize_frontier(identical, (0.5, 0.7))
    assert summary["points"] == [(0.5, 0.2), (0.8, 0.1)]
    assert summary["point_intervals"][1] == ((0.8, 0.8), (0.1, 0.1))  # no spread, no width
    assert summary["figures"] == {"best_editability_at_0.5": 0.2, "best_editability_at_0.7": 0.1,
                                  "area": pytest.approx(0.5 * 0.2 + 0.3 * 0.1)}
    assert all(v is None for v in bootstrap_intervals(identical[:1], lambda r: {"m": float(r.mean())}).values())

    rng = np.random.default_rng(1)
    runs = rng.uniform(0, 1, (15, 3, 2))
    low, high = bootstrap_intervals(runs, lambda r: {"m": float(r[:, 0, 0].mean())})["m"]
    mean, se = runs[:, 0, 0].mean(), runs[:, 0, 0].std(ddof=1) / np.sqrt(15)
    assert low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.25)  # about the normal interval's width
    assert bootstrap_intervals(runs, lambda r: {"m": float(r.mean())}) == \
        bootstrap_intervals(runs, lambda r: {"m": float(r.mean())})  # seeded: the same intervals each time
    assert mean_points(runs)[2] == pytest.approx(tuple(runs[:, 2].mean(axis=0)))


def test_a_figure_missing_in_too_many_resamples_has_no_interval():
    runs = np.array([[[0.9, 0.3]], [[0.1, 0.2]]])  # one run reaches fidelity 0.5, the other not
    summary = summarize_frontier(runs, (0.5,))
    assert summary["figures"]["best_editability_at_0.5"] == pytest.approx(0.25)  # the mean point, fidelity 0.5
    assert summary["figure_intervals"]["best_editability_at_0.5"] is None  # a quarter of resamples: none


# ------------------------------------------------------------------------------------- resume
PROTOCOL = Protocol(steps=(2, 4), strengths=(0.5, 1.0), samples=1)


def point(steps, strength, value=0.5):
    return {"steps": steps, "strength": strength, "fidelity": value, "editability": value, "features": value,
            "attribute": value, "per_prompt": {}}


def good_record(tmp_path, m):
    result = tmp_path / "embeddings.pt"
    result.write_bytes(b"x")
    fingerprint = PROTOCOL.fingerprint(m)
    return {"fingerprint": fingerprint, "points": [point(s, t) for s, t in PROTOCOL.settings(m)],
            "result": str(result), "times": {}}


def test_a_stored_run_is_reused_only_when_whole_and_of_this_protocol(tmp_path):
    m = method("ti")
    path = record_path(tmp_path, m.name, 0, 0)
    assert load_record(path, PROTOCOL.fingerprint(m)) is None  # not there
    record = good_record(tmp_path, m)
    save_record(path, record)
    assert load_record(path, PROTOCOL.fingerprint(m)) == record
    assert [p["strength"] for p in record["points"]] == [0.5, 1.0, 0.5, 1.0]
    assert PROTOCOL.settings(method("dreambooth")) == [(2, 1.0), (4, 1.0)]  # a model has no strength

    other = Protocol(steps=(2, 4, 8), strengths=(0.5, 1.0), samples=1)
    assert load_record(path, other.fingerprint(m)) is None  # another protocol
    assert load_record(path, PROTOCOL.fingerprint(method("momentum_0.1"))) is None  # another cell's flags
    for broken in ({**record, "points": record["points"][:-1]},  # partial
                   {**record, "points": [point(2, 0.5, float("nan")), *record["points"][1:]]},
                   {**record, "points": [point(2, 0.5, 1.5), *record["points"][1:]]},
                   {**record, "result": str(tmp_path / "gone.pt")}):  # its result file is lost
        save_record(path, broken)
        assert load_record(path, PROTOCOL.fingerprint(m)) is None
    path.write_text(json.dumps(record)[:40])  # cut short
    assert load_record(path, PROTOCOL.fingerprint(m)) is None


@pytest.fixture
def stand_in_runner(tmp_path, monkeypatch):
    """scripts/toy_benchmark.py's Runner with training and scoring replaced by stand-ins that count calls."""
    from scripts import toy_benchmark as script

    trained = []

    def fake_train(m, photos, seed, workdir, **kwargs):
        trained.append(m.name)
        result = workdir / f"{m.name}-{len(trained)}" / "checkpoints" / "embeddings.pt"
        result.parent.mkdir(parents=True)
        result.write_bytes(b"x")
        return result

    def fake_score(model, judge, m, subject, saves, protocol, *, seed, unet=None):
        return [point(s, t, 0.25) for s, t in protocol.settings(m)]

    monkeypatch.setattr(script, "train", fake_train)
    monkeypatch.setattr(script, "score_run", fake_score)
    args = script.build_parser().parse_args(["--methods", "ti", "--subjects", "1", "--seeds", "1", "--steps", "2",
                                             "4", "--strengths", "0.5", "1", "--samples", "1"])
    checked = script.plan(args)
    return lambda: script.Runner(checked, tmp_path, judge=None, base=None), trained


def test_a_finished_run_is_not_trained_again_and_a_corrupt_one_is(tmp_path, stand_in_runner):
    from ldm.toy.world import held_out_subject

    make_runner, trained = stand_in_runner
    subject, photos, ti = held_out_subject(0), tmp_path / "photos", method("ti")
    first = make_runner().run(ti, 0, 0, photos, subject)
    assert trained == ["ti"] and [p["fidelity"] for p in first["points"]] == [0.25] * 4
    again = make_runner().run(ti, 0, 0, photos, subject)  # a restarted benchmark
    assert trained == ["ti"] and again == first
    record_path(tmp_path, "ti", 0, 0).write_text('{"points": [')  # stopped while writing by other means
    make_runner().run(ti, 0, 0, photos, subject)
    assert trained == ["ti", "ti"]


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, message", [
    (["--methods", "ti", "ti_lr9"], "unknown method 'ti_lr9'"),
    (["--strengths", "0.5", "4.5"], "--strengths: strength must be in [0, 4]"),
    (["--strengths", "-0.25"], "--strengths: strength must be in [0, 4]"),
    (["--subject-seed", "24"], "--subject-seed 24 does not exist"),
    (["--steps", "100", "50"], "--steps must be increasing positive step counts"),
])
def test_frontier_benchmark_refuses_bad_input_before_any_work(argv, message, tmp_path, caplog):
    from scripts import toy_benchmark

    assert toy_benchmark.main([*argv, "--workdir", str(tmp_path / "work")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "work").exists()  # nothing trained or written


def test_cells_trained_on_a_dreambooth_model_run_after_it():
    from scripts import toy_benchmark

    args = toy_benchmark.build_parser().parse_args(["--methods", "dreambooth_prior_momentum_0.1", "ti"])
    checked = toy_benchmark.plan(args)
    assert [m.name for m in checked.cells] == ["dreambooth_prior", "dreambooth_prior_momentum_0.1", "ti"]
    assert checked.scored == ["dreambooth_prior_momentum_0.1", "ti"]


def test_run_times_split_a_run_into_its_parts():
    from scripts.toy_benchmark import run_times

    events = {"start": 0.0, "fit_start": 4.0, "train_start": 4.5, "train_end": 24.5, "trained": 25.0, "scored": 85.0}
    clock = {**events, **{f"{k}_cpu": 2 * v for k, v in events.items()}}  # two busy threads
    times = run_times(clock)
    assert times["setup_s"] == 4.0 and times["fit_setup_s"] == 0.5 and times["train_s"] == 20.0
    assert times["teardown_s"] == 0.5 and times["score_s"] == 60.0 and times["train_cpu_s"] == 40.0
    probe = ("fit_start", "train_start", "train_end")  # the events the run's BenchmarkProbe writes
    assert run_times({k: v for k, v in clock.items() if not k.startswith(probe)}).keys() == {
        "score_s", "score_cpu_s"}  # no clock from the run: only scoring is known
