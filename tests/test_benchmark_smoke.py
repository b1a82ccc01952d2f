"""Smoke test of scripts/benchmark.py: one tiny-config run yields every row with finite ratios.

No timing thresholds: speed claims live in docs/benchmarks.md, measured by the script itself.
"""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
import sys
import weakref
from pathlib import Path

import torch
from helpers import shared_fixture

ROOT = Path(__file__).resolve().parents[1]
INFERENCE_ROWS = ["unet_forward", "vae_decode", "ddim2_cfg", "sample_ddim2_b1"]
TI_ROWS = ["ti_step_b1", "ti_step_b2"]
TI_PART_ROWS = ["ti_part_table_adamw"] + [f"ti_{part}_b{n}" for n in (1, 2)
                                          for part in ("part_text", "part_unet", "part_vae", "floor", "part_saved")]
ANCHORING_ROWS = [f"{option}_b{n}" for option in ("control", "anchor_pull", "norm_bound", "init_words", "ema",
                                                 "ema_bias_corrected", "vectors_4", "all_four") for n in (1, 2)]
TRAINING_ROWS = ["face_step_b1", "face_step_b2", *ANCHORING_ROWS, "db_step", "lora_db_step"]
FLOP_ROWS = ("unet_forward", "vae_decode", "ddim", "sample", "ti_step", "face_step", "db_step")
VALIDATION_ROW = "validation_save"


def _load_benchmark():
    """scripts/benchmark.py as `python scripts/benchmark.py` loads it: with scripts/ (its `bench` package) on the path."""
    scripts = str(ROOT / "scripts")
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, scripts)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(scripts)
    return module


def test_tiny_benchmark_reports_every_row_with_finite_ratios(tmp_path: Path) -> None:
    bench = _load_benchmark()
    photo = shared_fixture("faces/obama_1.jpg", required=False)  # None without the fixtures (not under CI)
    faces = tmp_path / "faces"
    faces.mkdir()
    if photo is not None:  # one photo keeps the dlib part short; without fixtures the row reports a skip
        shutil.copy(photo, faces)
    args = bench.parse_args(["--config", "tiny", "--repeats", "1", "--threads", "1", "--ddim-steps", "2",
                             "--sample-steps", "2", "--face-detector", "hog", "--faces", str(faces)])
    rows = bench.run(args)

    prep_rows = ["face_prep_cold", "face_prep_warm"] if photo is not None else ["face_prep"]
    identity_rows = ["identity_score"]  # skipped: scoring needs reference and sample photos, one is given
    assert [r.name for r in rows] == (INFERENCE_ROWS + TI_ROWS + TI_PART_ROWS + TRAINING_ROWS + prep_rows
                                      + [VALIDATION_ROW] + identity_rows)
    validation = rows[-2]
    assert validation.time_ratio > 0 and "every 50 steps" in validation.note
    rows = rows[:-2]
    for row in rows[:-len(prep_rows)]:
        assert row.ours is not None and row.ours.median_s > 0, f"{row.name} has no measurement"
        if row.baseline == "-":  # a part timed alone
            continue
        assert row.reference is not None, f"{row.name} has no baseline measurement"
        assert math.isfinite(row.time_ratio) and row.time_ratio > 0, f"{row.name}: time ratio {row.time_ratio}"
        if not row.name.startswith("ti_floor"):  # a sum of medians has no memory figure
            assert row.ours.peak_bytes is not None and row.ours.peak_bytes >= 0, f"{row.name}: no peak memory"
    for row in rows:
        if row.name.startswith(("ti_step", "face_step", "db_step")):
            # both sides keep optimizer state, so the peak is never zero and the ratio is defined
            assert math.isfinite(row.memory_ratio) and row.memory_ratio > 0, f"{row.name}: {row.memory_ratio}"
        if row.name.startswith(FLOP_ROWS):
            assert row.ours_flops > 0 and row.reference_flops > 0, f"{row.name}: FLOPs not counted"
    lora_note = next(row.note for row in rows if row.name == "lora_db_step")
    trained_file = re.search(r"LoRA file ([\d.]+) MB", lora_note)[1]  # written from trained adapters (attention)
    assert f"attention {trained_file} MB" in lora_note, lora_note  # the preset sizes are real files' sizes
    sizes = [float(re.search(rf"{preset} ([\d.]+) MB", lora_note)[1]) for preset in ("transformer", "locon")]
    assert float(trained_file) < sizes[0] < sizes[1], lora_note
    if photo is not None:
        assert "1 faces" in rows[-1].note, f"the fixture photo should give one face crop: {rows[-1].note}"
    table = bench.markdown_table(rows)
    assert all(f"| {r.name} |" in table for r in rows)
    # the table's figures are the measurements: each timed run positive, the median among them, the
    # milliseconds and the time ratio (ours / baseline) as the table prints them
    printed = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:6]]
                                             for line in table.splitlines()[2:])}
    for row in rows:
        for m in (row.ours, row.reference):
            if m is not None:
                assert m.times_s and all(math.isfinite(t) and t > 0 for t in m.times_s), f"{row.name}: {m.times_s}"
                assert min(m.times_s) <= m.median_s <= max(m.times_s), f"{row.name}: median outside the runs"
        ms = ["-" if m is None else f"{1000 * m.median_s:.1f}" for m in (row.ours, row.reference)]
        ratio = "-" if None in (row.ours, row.reference) else f"{row.ours.median_s / row.reference.median_s:.2f}"
        assert printed[row.name] == [row.name, row.baseline, *ms, ratio], printed[row.name]


def test_half_precision_runs_each_side_with_its_users_weights() -> None:
    """bf16: ours holds frozen conv/linear weights in bf16; diffusers' TI recipe its UNet and VAE, not its
    trained text encoder."""
    bench = _load_benchmark()
    b = bench.Bench(bench.parse_args(["--config", "tiny", "--precision", "bf16", "--threads", "1"]))
    assert b.ours.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert b.ours.embedding_manager.vectors[0].dtype == torch.float32
    assert b.unet.dtype == torch.bfloat16 and b.vae.dtype == torch.bfloat16
    assert b.text_model.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in b.checkpoint.values() if v.is_floating_point()), (
        "the diffusers models are made from the float32 weights")


def test_table_reports_flop_rate_and_share_of_peak() -> None:
    from scripts.bench.measure import Measurement
    from scripts.bench.table import Row, markdown_table

    row = Row("ti_step_b8", "diffusers TI", Measurement(0.5, [0.5], None), Measurement(1.0, [1.0], None),
              ours_flops=int(100e12), reference_flops=int(150e12))
    line = markdown_table([row], peak_tflops=400.0).splitlines()[-1]
    assert "| 200 | 150 | 50.0 |" in line, line  # 100 TFLOP in 0.5 s, 150 in 1 s; 200 of a 400 peak


class _FakeStep:
    """A step that holds memory and keeps 4 kB between steps."""

    def __init__(self):
        self.data = torch.ones(1000)

    def __call__(self):
        return self.data.sum()

    def persistent_bytes(self) -> int:
        return 4000

    def release(self) -> None:
        pass


def _built_while(b) -> list[list[bool]]:
    """For each build of a pair, whether the steps built before it were still alive."""
    steps, alive = [], []

    def build():
        alive.append([ref() is not None for ref in steps])
        step = _FakeStep()
        steps.append(weakref.ref(step))
        return step

    ours, ref = b.pair_built(build, build)
    assert ours.peak_bytes >= 4000 and ref.peak_bytes >= 4000, "memory includes what the step keeps"
    return alive


def test_sequential_frees_each_side_before_building_the_other() -> None:
    bench = _load_benchmark()
    args = ["--config", "tiny", "--repeats", "1", "--threads", "1"]
    assert _built_while(bench.Bench(bench.parse_args(args))) == [[], [True]], "alternate timing holds both"
    assert _built_while(bench.Bench(bench.parse_args([*args, "--sequential"]))) == [[], [False]]


def test_sequential_lora_row_builds_only_its_own_models() -> None:
    bench = _load_benchmark()
    b = bench.Bench(bench.parse_args(["--config", "tiny", "--repeats", "1", "--threads", "1", "--only", "lora",
                                      "--sequential"]))
    [row] = bench.ROW_BUILDERS["lora"](b)
    assert "ours" not in vars(b), "the shared model is built on first use; the lora rows build their own"
    assert "one after the other" in row.note
    assert 0 < row.memory_ratio < 0.5, f"LoRA keeps no full-model gradients or AdamW state: {row.memory_ratio}"
