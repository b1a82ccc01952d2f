"""Smoke test of scripts/benchmark.py: one tiny-config run yields every row with finite ratios.

No timing thresholds: speed claims live in docs/benchmarks.md, measured by the script itself.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "fixtures" / "faces"
INFERENCE_ROWS = ["unet_forward", "vae_decode", "ddim2_cfg"]
TI_ROWS = ["ti_step_b1", "ti_step_b2"]
TI_PART_ROWS = ["ti_part_table_adamw"] + [f"ti_{part}_b{n}" for n in (1, 2)
                                          for part in ("part_text", "part_unet", "part_vae", "floor", "part_saved")]
TRAINING_ROWS = ["face_step_b1", "face_step_b2", "db_step"]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_reports_every_row_with_finite_ratios(tmp_path: Path) -> None:
    bench = _load_benchmark()
    photo = FACES / "obama_1.jpg"
    faces = tmp_path / "faces"
    faces.mkdir()
    if photo.is_file():  # one photo keeps the dlib part short; without fixtures the row reports a skip
        shutil.copy(photo, faces)
    args = bench.parse_args(["--config", "tiny", "--repeats", "1", "--threads", "1", "--ddim-steps", "2",
                             "--face-detector", "hog", "--faces", str(faces)])
    rows = bench.run(args)

    prep_rows = ["face_prep_cold", "face_prep_warm"] if photo.is_file() else ["face_prep"]
    assert [r.name for r in rows] == INFERENCE_ROWS + TI_ROWS + TI_PART_ROWS + TRAINING_ROWS + prep_rows
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
    if photo.is_file():
        assert "1 faces" in rows[-1].note, f"the fixture photo should give one face crop: {rows[-1].note}"
    table = bench.markdown_table(rows)
    assert all(f"| {r.name} |" in table for r in rows)
