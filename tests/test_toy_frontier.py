"""The toy benchmark's frontier maths, its reuse of finished runs, its refusal of bad input, and its cells.

Nothing here trains: the runs are stand-ins (scripts/toy_benchmark.py's Runner with train and scoring
replaced), so the tests check the bookkeeping, not learning (tests/test_toy_learning.py does that). Every
cell's command line passes main.py's flag and config checks; the LoRA cells' scoring is checked on the tiny model.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.toy.frontier import (
    best_editability, bootstrap_intervals, frontier_area, frontier_figures, frontier_margin, mean_points,
    paired_difference, pareto_frontier, summarize_frontier,
)
from ldm.toy.benchmark import NO_SAVES, STEPS, TOY_MODEL, Protocol, main_argv, result_name, save_flags, step_saves
from ldm.toy.cells import (ANCHORING_CELLS, ANCHORING_OPTIONS, LORA_CELLS, METHODS, TOY_INIT_WORDS, VECTOR_CELLS,
                            method)
from ldm.toy.records import load_record, record_path, save_record

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


def test_the_margin_is_the_least_excess_over_the_fidelities_the_baseline_reaches():
    y = [(0.2, 0.6), (0.5, 0.4), (0.1, 0.1)]  # frontier (0.2, 0.6), (0.5, 0.4)
    assert frontier_margin([(0.6, 0.5), (0.3, 0.7)], y) == pytest.approx(0.1)  # above at every f in (0, 0.5]
    assert frontier_margin([(0.3, 0.9), (0.45, 0.8)], y) == pytest.approx(-0.4)  # reaches no f in (0.45, 0.5]
    assert frontier_margin([(0.9, 0.3)], y) == pytest.approx(-0.3)  # more faithful, less editable at low f
    assert frontier_margin([(0.9, 0.3)], [(0.0, 0.5)]) is None  # the baseline reaches no fidelity
    assert frontier_margin(y, y) == 0.0


def test_a_paired_difference_sees_a_shift_that_the_separate_intervals_hide():
    rng = np.random.default_rng(3)
    subject = rng.uniform(0.2, 0.8, (15, 1, 1))  # what each subject does to every method: a wide spread
    runs_y = np.clip(subject + rng.normal(0, 0.01, (15, 2, 2)), 0, 1)
    runs_x = np.clip(runs_y + 0.05, 0, 1)  # the same runs, 0.05 better on both figures
    thresholds = (0.2,)  # every mean point reaches it
    paired = paired_difference(runs_x, runs_y, thresholds)
    expected = {k: frontier_figures(mean_points(runs_x), thresholds)[k] - v
                for k, v in frontier_figures(mean_points(runs_y), thresholds).items()}
    assert {k: v for k, v in paired["difference"].items() if k != "margin"} == pytest.approx(expected)
    assert paired["difference"]["margin"] > 0 and paired["intervals"]["margin"][0] > 0, "above everywhere, paired"
    low, high = paired["intervals"]["area"]
    assert 0 < low <= expected["area"] <= high, "paired: the shift is beyond the interval"
    x_ci = summarize_frontier(runs_x, thresholds)["figure_intervals"]["area"]
    y_ci = summarize_frontier(runs_y, thresholds)["figure_intervals"]["area"]
    assert x_ci[0] < y_ci[1], "unpaired, the two intervals overlap"
    with pytest.raises(ValueError, match="paired runs differ in number"):
        paired_difference(runs_x[:3], runs_y, thresholds)


def test_the_benchmark_pairs_each_cell_with_the_one_it_adds_to_and_stars_a_separated_difference():
    from scripts import toy_benchmark as script

    def records(value):
        return [{"points": [point(25, 1.0, value + 0.01 * i)]} for i in range(4)]  # 4 runs, one setting

    by_cell = {"dreambooth": records(0.5), "dreambooth_momentum_0.1": records(0.6), "ti": records(0.3),
               "momentum_0.1_lr8e-3": records(0.3), "lora_dreambooth_lr1e-3": records(0.4)}
    differences = script.paired_differences(["dreambooth_momentum_0.1", "momentum_0.1_lr8e-3",
                                             "lora_dreambooth_lr1e-3", "momentum_0.1"], by_cell,
                                            [("ti", "dreambooth"), ("momentum_0.1_lr8e-3", "ti")])  # --compare
    assert list(differences) == ["dreambooth_momentum_0.1 - dreambooth", "momentum_0.1_lr8e-3 - ti",
                                 "lora_dreambooth_lr1e-3 - dreambooth",  # momentum_0.1's ti_lr8e-5 did not run
                                 "ti - dreambooth"]  # asked for; the pair the cell has already is given once
    assert differences["ti - dreambooth"]["difference"]["area"] == pytest.approx(0.315 ** 2 - 0.515 ** 2)
    recipe = differences["dreambooth_momentum_0.1 - dreambooth"]
    assert recipe["difference"]["area"] == pytest.approx(0.615 ** 2 - 0.515 ** 2)  # mean points (m, m): area m^2
    assert recipe["intervals"]["area"] == pytest.approx((0.615 ** 2 - 0.515 ** 2,) * 2, abs=0.02)  # paired: narrow
    assert script.signed(0.11, (0.05, 0.2)) == "+0.11 [+0.05, +0.20] *"
    assert script.signed(-0.02, (-0.1, 0.05)) == "-0.02 [-0.10, +0.05]"
    assert method("momentum_0.1_lr8e-3_ema").compared_with == "momentum_0.1_lr8e-3"
    assert method("dreambooth_momentum_0.1_anchor").compared_with == "dreambooth_momentum_0.1"


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
    path = record_path(tmp_path, m.name, 0, 0, PROTOCOL.fingerprint(m))
    assert load_record(path, PROTOCOL.fingerprint(m)) is None  # not there
    record = good_record(tmp_path, m)
    save_record(path, record)
    assert load_record(path, PROTOCOL.fingerprint(m)) == record
    assert [p["strength"] for p in record["points"]] == [0.5, 1.0, 0.5, 1.0]
    assert PROTOCOL.settings(method("dreambooth")) == [(2, 1.0), (4, 1.0)]  # a model has no strength

    other = Protocol(steps=(2, 4, 8), strengths=(0.5, 1.0), samples=1)
    assert load_record(path, other.fingerprint(m)) is None  # another protocol
    for changed in ({"ddim_steps": 10}, {"base_model": "0123456789"}):  # another sampler, another toy model
        assert load_record(path, replace(PROTOCOL, **changed).fingerprint(m)) is None
    assert load_record(path, PROTOCOL.fingerprint(method("momentum_0.1"))) is None  # another cell's flags
    for broken in ({**record, "points": record["points"][:-1]},  # partial
                   {**record, "points": [point(2, 0.5, float("nan")), *record["points"][1:]]},
                   {**record, "points": [point(2, 0.5, 1.5), *record["points"][1:]]},
                   {**record, "result": str(tmp_path / "gone.pt")}):  # its result file is lost
        save_record(path, broken)
        assert load_record(path, PROTOCOL.fingerprint(m)) is None
    path.write_text(json.dumps(record)[:40])  # cut short
    assert load_record(path, PROTOCOL.fingerprint(m)) is None


def test_a_probe_is_run_once_per_fingerprint_and_again_when_its_file_is_broken(tmp_path):
    from ldm.toy.records import short_digest, stored_probe

    runs = []

    def probe():
        runs.append(1)
        return {"shape": 0.5 + len(runs) / 10}

    key = {"base_model": "0123456789", "samples": 4}
    assert stored_probe(tmp_path, "following", key, probe) == {"shape": 0.6}
    assert stored_probe(tmp_path, "following", key, probe) == {"shape": 0.6} and len(runs) == 1  # reused
    assert stored_probe(tmp_path, "following", {**key, "samples": 8}, probe) == {"shape": 0.7}  # another protocol
    stored = tmp_path / "probes" / f"following-{short_digest(key)}.json"
    stored.write_text(stored.read_text()[:20])  # cut short: run again and rewritten whole
    assert stored_probe(tmp_path, "following", key, probe) == {"shape": 0.8}
    assert len(runs) == 3 and json.loads(stored.read_text())["figures"] == {"shape": 0.8}


@pytest.fixture
def stand_in_runner(tmp_path, monkeypatch):
    """scripts/toy_benchmark.py's Runner with training and scoring replaced by stand-ins that count calls."""
    from scripts import toy_benchmark as script

    trained, calls = [], []  # cell names; (cell, what train got, what score_run got)

    def fake_train(m, photos, seed, workdir, **kwargs):
        trained.append(m.name)
        result = workdir / f"{m.name}-{len(trained)}" / "checkpoints" / result_name(m)
        result.parent.mkdir(parents=True)
        result.write_bytes(b"x")
        calls.append((m.name, kwargs, None))
        return result

    def fake_score(model, judge, m, subject, saves, protocol, *, seed, **kwargs):
        calls[-1] = (*calls[-1][:2], kwargs)
        return [point(s, t, 0.25) for s, t in protocol.settings(m)]

    monkeypatch.setattr(script, "train", fake_train)
    monkeypatch.setattr(script, "score_run", fake_score)

    def make_runner(*methods: str):
        args = script.build_parser().parse_args(["--methods", *(methods or ["ti"]), "--subjects", "1", "--seeds",
                                                 "1", "--steps", "2", "4", "--strengths", "0.5", "1", "--samples", "1"])
        return script.Runner(script.plan(args), tmp_path, judge=None, base=None)

    return make_runner, trained, calls


def test_a_finished_run_is_not_trained_again_and_a_corrupt_one_is(tmp_path, stand_in_runner):
    from ldm.toy.world import held_out_subject

    make_runner, trained, _ = stand_in_runner
    subject, photos, ti = held_out_subject(0), tmp_path / "photos", method("ti")
    first = make_runner().run(ti, 0, 0, photos, subject)
    assert trained == ["ti"] and [p["fidelity"] for p in first["points"]] == [0.25] * 4
    again = make_runner().run(ti, 0, 0, photos, subject)  # a restarted benchmark
    assert trained == ["ti"] and again == first
    [stored] = (tmp_path / "runs" / "ti").glob("subject-0-seed-0-*.json")
    stored.write_text('{"points": [')  # stopped while writing by other means
    make_runner().run(ti, 0, 0, photos, subject)
    assert trained == ["ti", "ti"]


def test_a_run_of_another_protocol_is_kept_beside_the_first():
    m = method("ti")
    other = Protocol(steps=(2, 4, 8), strengths=(0.5, 1.0), samples=1)
    paths = {record_path(Path("w"), m.name, 0, 0, p.fingerprint(m)) for p in (PROTOCOL, other, PROTOCOL)}
    assert len(paths) == 2, "one file per protocol; the same protocol finds the same file"
    assert all(p.parent == Path("w/runs/ti") and p.name.startswith("subject-0-seed-0-") for p in paths)


def test_bf16_scoring_is_a_protocol_of_its_own_and_leaves_fp32_keys_as_they_were(monkeypatch):
    from scripts import toy_benchmark

    monkeypatch.setattr(toy_benchmark, "native_bf16", lambda: True)
    m = method("ti")
    assert "bf16" not in PROTOCOL.fingerprint(m)["sampler"]  # fp32 results stored before the flag are still found
    bf16 = toy_benchmark.plan(toy_benchmark.build_parser().parse_args(["--bf16", "--samples", "1"])).protocol
    assert bf16.bf16 and bf16.fingerprint(m)["sampler"]["bf16"] is True
    assert record_path(Path("w"), "ti", 0, 0, bf16.fingerprint(m)) != record_path(
        Path("w"), "ti", 0, 0, replace(bf16, bf16=False).fingerprint(m))


# ------------------------------------------------------------------------------------- bad input
def test_bf16_is_refused_where_the_cpu_would_emulate_it(monkeypatch):
    from scripts import toy_benchmark

    monkeypatch.setattr(toy_benchmark, "native_bf16", lambda: False)
    with pytest.raises(ValueError, match="--bf16: this CPU has no native bfloat16 .* leave out --bf16"):
        toy_benchmark.plan(toy_benchmark.build_parser().parse_args(["--bf16"]))


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ti", "ti_lr9"], "unknown method 'ti_lr9'"),
    (["--strengths", "0.5", "4.5"], "--strengths: strength must be in [0, 4]"),
    (["--strengths", "-0.25"], "--strengths: strength must be in [0, 4]"),
    (["--subject-seed", "24"], "--subject-seed 24 does not exist"),
    (["--subject-seed", "17", "30"], "--subject-seed 30 does not exist"),
    (["--steps", "100", "50"], "--steps must be increasing positive step counts"),
    (["--ddim-steps", "0"], "--samples, --seeds and --ddim-steps must be at least 1"),
    (["--methods", "ti", "--compare", "ti:dreambooth"], "--compare ti:dreambooth: 'dreambooth' is not run by this"),
    (["--methods", "ti", "--compare", "ti"], "--compare ti: give two different cells as X:Y"),
    (["--methods", "ti", "--compare", "ti:ti"], "--compare ti:ti: give two different cells as X:Y"),
])
def test_frontier_benchmark_refuses_bad_input_before_any_work(argv, message, tmp_path, caplog):
    from scripts import toy_benchmark

    assert toy_benchmark.main([*argv, "--workdir", str(tmp_path / "work")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "work").exists()  # nothing trained or written


def test_compare_pairs_any_two_cells_the_benchmark_runs_a_dreambooth_base_included():
    from scripts import toy_benchmark

    args = toy_benchmark.build_parser().parse_args(["--methods", "ti_vectors_4", "dreambooth_prior_momentum_0.1",
                                                    "--compare", "ti_vectors_4:dreambooth_prior"])
    assert toy_benchmark.plan(args).comparisons == [("ti_vectors_4", "dreambooth_prior")]


def test_several_held_out_subjects_are_benchmarked_together():
    from scripts import toy_benchmark

    args = toy_benchmark.build_parser().parse_args(["--subject-seed", "17", "19", "17", "--subjects", "5"])
    assert toy_benchmark.plan(args).subjects == [17, 19]  # in order, once each; --subjects is then unused


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


# ------------------------------------------------------------------------------------- cells of issues 19 and 20
def settled_run_config(argv: list[str]):
    """The config main.py settles on for ``argv`` (flags, then key=value overrides), checked as run_training does
    before it builds anything."""
    from ldm.train.cli import build_parser, take_overrides
    from ldm.train.run_config import check_config, configure
    from ldm.train.trainer_args import trainer_kwargs
    from ldm.train.training import load_config

    opt, unknown = build_parser().parse_known_args(argv)
    unknown = take_overrides(opt) + unknown
    assert all("=" in u for u in unknown), f"main.py does not take {unknown}"
    config = load_config(opt.base, unknown)
    configure(config, opt, unknown)
    check_config(config)
    trainer_kwargs(OmegaConf.to_container(config.lightning.trainer, resolve=True))
    return config


OPTION_KEYS = {  # flag of a new cell -> (config key it must reach, type of its value; None: a switch)
    "--anchor_weight": ("model.params.personalization_config.params.anchor_weight", float),
    "--norm_bound": ("model.params.personalization_config.params.norm_bound", None),
    "--init_words": ("model.params.personalization_config.params.init_words", str),
    "--init_from_encoder": ("model.params.personalization_config.params.init_from_encoder", None),
    "--ema_decay": ("model.params.personalization_config.params.ema_decay", float),
    "--ema_bias_correction": ("model.params.personalization_config.params.ema_bias_correction", None),
    "--lora_rank": ("lora.rank", int),
    "--num_vectors_per_token": ("model.params.personalization_config.params.num_vectors_per_token", int),
}


@pytest.mark.parametrize("m", METHODS, ids=[m.name for m in METHODS])
def test_every_cell_passes_main_pys_flag_and_config_checks(m, tmp_path, caplog):
    base_lora = tmp_path / "lora.safetensors"  # the flag checks only that the file exists
    base_lora.write_bytes(b"x")
    lora = base_lora if m.on and method(m.on).lora else None
    argv = main_argv(m, tmp_path / "photos", 0, tmp_path / "logs", base_ckpt=TOY_MODEL, lora=lora, max_steps=200,
                     save_steps=STEPS, class_images=tmp_path / "class")
    with caplog.at_level("INFO"):
        config = settled_run_config(argv)
    ignored = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert not ignored, f"{m.name}: main.py ignores {ignored}"
    for flag, (key, kind) in OPTION_KEYS.items():
        if flag in m.flags:
            value = True if kind is None else kind(m.flags[m.flags.index(flag) + 1])
            assert OmegaConf.select(config, key) == value, f"{m.name}: {flag} did not reach {key}"
    assert (OmegaConf.select(config, "lora") is not None) == m.lora
    assert OmegaConf.select(config, "lora_files") == ([str(lora)] if lora else None)


def test_the_new_cells_are_named_by_the_issues_and_not_run_by_default():
    from ldm.toy.cells import FRONTIER_METHODS

    names = [m.name for m in (*ANCHORING_CELLS, *LORA_CELLS)]
    options = ("anchor", "norm_bound", "init_words", "cross_init", "ema", "ema_bc")
    anchored = ("ti", "momentum_0.1", "momentum_0.1_lr8e-3", "dreambooth_momentum_0.1")
    assert names == [*(f"{cell}_{option}" for option in options for cell in anchored), "lora_dreambooth",
                     "lora_dreambooth_momentum_0.1", "lora_dreambooth_lr1e-3", "lora_dreambooth_lr1e-3_momentum_0.1",
                     "lora_dreambooth_r16_lr1e-3", "lora_dreambooth_lr3e-3", "lora_dreambooth_r16_lr5e-4",
                     "lora_dreambooth_lr1.5e-3", "lora_dreambooth_transformer_lr1e-3",
                     "lora_dreambooth_transformer_lr1e-3_momentum_0.1", "lora_dreambooth_locon_lr1e-3",
                     "lora_dreambooth_locon_lr5e-4"]
    assert FRONTIER_METHODS == ("ti", "ti_lr8e-5", "momentum_0.1", "momentum_0.1_lr8e-3", "ti_original_step",
                                "dreambooth", "dreambooth_momentum_0.1", "dreambooth_ti_lr8e-5", "dreambooth_prior",
                                "dreambooth_prior_momentum_0.1", "dreambooth_prior_lr4e-5",
                                "dreambooth_prior_lr4e-5_momentum_0.1")
    recipe = method("dreambooth_momentum_0.1")
    for m in ANCHORING_CELLS:  # one option's flags added to the cell it is named after, on that cell's base
        suffix, flags, _ = next(option for option in ANCHORING_OPTIONS if m.name.endswith(f"_{option[0]}"))
        base = method(m.name.removesuffix(f"_{suffix}"))
        assert m.flags == (*base.flags, *flags) and m.on == base.on and m.phrase == base.phrase
    assert method("lora_dreambooth_momentum_0.1").flags == recipe.flags
    assert [(m.name, m.flags, m.compared_with) for m in VECTOR_CELLS] == [
        ("ti_vectors_4", ("--gamma", "1", "--num_vectors_per_token", "4"), "ti"),
        ("momentum_0.1_vectors_4", ("--gamma", "0.1", "--num_vectors_per_token", "4"), "momentum_0.1"),
        ("momentum_0.1_lr8e-3_vectors_4", ("--gamma", "0.1", "model.base_learning_rate=8e-3",
                                           "--num_vectors_per_token", "4"), "momentum_0.1_lr8e-3")]
    assert TOY_INIT_WORDS.is_file()  # the shipped list the init_words cells start from


def test_an_ema_cell_is_scored_on_the_moving_average_the_run_saves(tmp_path):
    from types import SimpleNamespace

    from ldm.train.callbacks import EmbeddingCheckpoint

    written = []  # (file, ema) as EmbeddingCheckpoint saves them
    manager = SimpleNamespace(ema_decay=0.99, embedding_parameters=lambda: [],
                              save=lambda target, step, ema: written.append((target, ema)))
    module = SimpleNamespace(embedding_manager=manager, trainer=SimpleNamespace(is_global_zero=True), global_step=25)
    checkpoint = EmbeddingCheckpoint(tmp_path)
    for name in ("embeddings_gs-25.pt", "embeddings.pt"):
        checkpoint._save(module, name)
    averages = {path for path, ema in written if ema}

    ema, plain = method("ti_ema"), method("ti")
    result = tmp_path / result_name(ema)
    assert result in averages and result.name == "embeddings_ema.pt"
    assert step_saves(result, ema, [25]) == {25: tmp_path / "embeddings_ema_gs-25.pt"}
    assert step_saves(result, ema, [25])[25] in averages
    assert step_saves(tmp_path / result_name(plain), plain, [25]) == {25: tmp_path / "embeddings_gs-25.pt"}
    assert all(m.ema == m.name.endswith(("_ema", "_ema_bc")) for m in METHODS)


def test_a_lora_dreambooth_run_saves_its_adapters_at_every_scored_step(tmp_path):
    lora, full = method("lora_dreambooth"), method("dreambooth")
    assert not lora.embedding and not lora.saves_unet and full.saves_unet
    assert lora.config.name == "v1-finetune_lora.yaml"
    assert save_flags(lora, (25, 50, 100, 200))[0] == "lightning.modelcheckpoint.params.every_n_train_steps=25"
    assert save_flags(lora, (25, 50, 100, 200))[2].endswith("unet_steps=[]")  # main.py's LoraCheckpoint saves them
    assert save_flags(full, (25, 50))[0].endswith(f"={NO_SAVES}") and save_flags(full, (25, 50))[2].endswith("[25,50]")
    result = tmp_path / result_name(lora)
    assert result.name == "lora.safetensors"
    assert step_saves(result, lora, (25, 200)) == {25: tmp_path / "lora_gs-25.safetensors",
                                                    200: tmp_path / "lora_gs-200.safetensors"}
    assert PROTOCOL.settings(lora) == [(2, 1.0), (4, 1.0)]  # a model: strength 1 only


def test_a_cell_on_lora_dreambooth_trains_and_is_scored_with_its_final_adapters(tmp_path, stand_in_runner):
    from ldm.toy.world import held_out_subject

    make_runner, trained, calls = stand_in_runner
    runner = make_runner("lora_dreambooth_momentum_0.1", "dreambooth_momentum_0.1")
    assert [m.name for m in runner.plan.cells] == ["lora_dreambooth", "lora_dreambooth_momentum_0.1", "dreambooth",
                                                   "dreambooth_momentum_0.1"]
    subject, photos = held_out_subject(0), tmp_path / "photos"
    for m in runner.plan.cells:
        runner.records[(m.name, 0, 0)] = runner.run(m, 0, 0, photos, subject)
    (_, lora_train, lora_score), (_, on_lora_train, on_lora_score), (_, db_train, _), (_, on_db_train, on_db_score) \
        = calls
    adapters = runner.records[("lora_dreambooth", 0, 0)]["result"]
    assert adapters.endswith("lora.safetensors") and "unet" not in runner.records[("lora_dreambooth", 0, 0)]
    assert lora_train["base_ckpt"] == TOY_MODEL and lora_train["lora"] is None and lora_score == {"unet": None,
                                                                                                  "lora": None}
    assert on_lora_train["base_ckpt"] == TOY_MODEL and on_lora_train["lora"] == Path(adapters)
    assert on_lora_score == {"unet": None, "lora": Path(adapters)}
    model = runner.records[("dreambooth", 0, 0)]  # the DreamBooth pattern it mirrors: --actual_resume the model
    assert on_db_train["base_ckpt"] == Path(model["result"]) and on_db_train["lora"] is None
    assert on_db_score == {"unet": Path(model["unet"]), "lora": None}
    assert model["unet"].endswith("unet_gs-4.safetensors")


# ---- LoRA scoring on the tiny model
@pytest.fixture(scope="module")
def tiny_loras(tmp_path_factory):
    """A fresh tiny model and two LoRA files (random adapters, rank 2) for its UNet."""
    from helpers import build_tiny_model

    from ldm.checkpoint.lora import save_lora
    from ldm.lora import add_trained_adapters, trained_layers
    from ldm.modules.lora import adapter_layers

    folder, files = tmp_path_factory.mktemp("loras"), []
    for seed in (1, 2):
        donor = build_tiny_model()
        add_trained_adapters(donor, rank=2)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in adapter_layers(donor).values():
                for weights in (*layer.lora_A.values(), *layer.lora_B.values()):  # B starts at 0: no change at all
                    weights.weight.copy_(0.2 * torch.randn(weights.weight.shape, generator=generator))
        files.append(save_lora(folder / f"subject-{seed}.safetensors", trained_layers(donor), {}))
    return build_tiny_model(), files


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def attributes(model) -> dict[str, set[str]]:
    """The attribute names of each submodule (what an adapter library may leave behind)."""
    return {name: set(vars(module)) for name, module in model.named_modules()}


def test_lora_weights_fold_the_file_in_and_restore_the_model_bit_for_bit(tiny_loras):
    from ldm.lora import APPLIED_ATTR
    from ldm.modules.lora import adapter_layers
    from ldm.toy.benchmark import lora_weights

    model, (path, _) = tiny_loras
    before, names = snapshot(model), attributes(model)
    with lora_weights(model, path):
        inside = snapshot(model)
        assert getattr(model, APPLIED_ATTR) == (("subject-1", 1.0),)
        assert not adapter_layers(model)  # folded into the base weights, as main.py's --lora does
    changed = {k for k in before if not torch.equal(before[k], inside[k])}
    assert changed and all(k.startswith("model.diffusion_model.") and ".to_" in k for k in changed)
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, APPLIED_ATTR) and not adapter_layers(model) and attributes(model) == names

    with pytest.raises(RuntimeError, match="stopped"), lora_weights(model, path):
        raise RuntimeError("stopped")  # scoring failed inside the block
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    with lora_weights(model, None):
        assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_lora_cells_are_scored_with_the_adapters_of_each_save_or_of_their_base(tiny_loras, monkeypatch):
    import ldm.toy.benchmark as bench
    from ldm.lora import APPLIED_ATTR

    model, (first, second) = tiny_loras
    before = snapshot(model)
    seen = []  # (LoRAs applied, settings) of each sampling batch

    def fake_judge_settings(model, judge_model, phrase, subject, settings, *, samples_per_prompt, seed, ddim_steps,
                            bf16):
        seen.append((getattr(model, APPLIED_ATTR, ()), list(settings)))
        return [bench.SuiteScore(0.5, 0.5, 0.5, 0.5) for _ in settings], None

    monkeypatch.setattr(bench, "judge_settings", fake_judge_settings)
    lora = method("lora_dreambooth")
    points = bench.score_run(model, None, lora, None, {2: first, 4: second}, PROTOCOL, seed=0)
    assert [(p["steps"], p["strength"]) for p in points] == [(2, 1.0), (4, 1.0)]
    assert seen == [((("subject-1", 1.0),), [(None, 1.0)]), ((("subject-2", 1.0),), [(None, 1.0)])]

    seen.clear()
    on_lora = method("lora_dreambooth_momentum_0.1")
    embeddings = {2: Path("e2.pt"), 4: Path("e4.pt")}
    bench.score_run(model, None, on_lora, None, embeddings, PROTOCOL, seed=0, lora=second)
    assert seen == [((("subject-2", 1.0),), [(embeddings[s], t) for s, t in PROTOCOL.settings(on_lora)])]
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_run_main_finds_its_own_log_dir_beside_another_benchmarks_runs(tmp_path, monkeypatch):
    """Two benchmarks sharing a workdir each create log dirs; a run takes the one named after it."""
    import ldm.train.cli
    from ldm.toy.benchmark import main_argv, run_main

    photos = tmp_path / "subject-0"
    argv = main_argv(method("momentum_0.1"), photos, 0, tmp_path / "logs")
    names = ["subject-0_dreambooth_momentum_0.1-s0_2026-12-02T17-37-52",  # the other benchmark's, same moment
             "subject-0_momentum_0.1-s0_2026-12-02T17-37-53"]

    def fake_main(args):
        for name in names:
            (tmp_path / "logs" / name).mkdir(parents=True)
        return 0

    monkeypatch.setattr(ldm.train.cli, "main", fake_main)
    assert run_main(argv) == tmp_path / "logs" / names[1]
