"""scripts/evaluate_identity.py on the face fixtures: detection rate, identity distances, CLIP, reports."""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_script, shared_fixture
from PIL import Image

from ldm import evaluation

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("dlib") is None
                       or importlib.util.find_spec("face_recognition_models") is None,
                       reason="needs dlib and face_recognition_models"),
    pytest.mark.usefixtures("shared_fixtures"),  # the face photos
]


evaluate_identity = load_script("evaluate_identity")


def folder(root: Path, name: str, *photos: str) -> Path:
    path = root / name
    path.mkdir()
    for photo in photos:
        shutil.copy(shared_fixture(f"faces/{photo}"), path / photo)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("identity")
    flat = folder(root, "flat_and_obama", "obama_3.jpg")
    Image.new("RGB", (256, 256), (120, 80, 200)).save(flat / "flat.png")
    return {"root": root, "ref": folder(root, "reference", "obama_1.jpg", "obama_2.jpg"),
            "same": folder(root, "same_person", "obama_3.jpg"),
            "other": folder(root, "other_person", "biden_1.jpg", "biden_2.jpg"), "flat": flat}


@pytest.fixture(scope="module")
def no_clip(dirs, tmp_path_factory):
    """One run over three folders with CLIP weights absent; returns (exit code, results, outputs, log)."""
    out = tmp_path_factory.mktemp("reports")
    paths = {"json": out / "results.json", "md": out / "table.md", "png": out / "chart.png"}
    handler = _Capture()
    logging.getLogger().addHandler(handler)
    try:
        code = evaluate_identity.main([
            "--reference", str(dirs["ref"]), "--generated", str(dirs["same"]), str(dirs["other"]), str(dirs["flat"]),
            "--prompt", "a photo of * man", "--class_word", "man", "--clip_model", str(out / "missing-ViT-B-32.pt"),
            "--out", str(paths["json"]), "--markdown", str(paths["md"]), "--plot", str(paths["png"])])
    finally:
        logging.getLogger().removeHandler(handler)
    results = json.loads(paths["json"].read_text()) if paths["json"].exists() else None
    return code, results, paths, handler.messages


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_identity_metrics_separate_people(no_clip) -> None:
    code, results, _, _ = no_clip
    assert code == 0
    same, other, flat = results["folders"]
    assert results["reference"]["faces"] == 2
    assert same["detection_rate"] == 1.0 and same["fraction_under_threshold"] == 1.0
    assert same["mean_distance"] < 0.5, "another photo of the same person (fixtures: 0.02-0.43)"
    assert other["fraction_under_threshold"] == 0.0 and other["mean_distance"] > 0.7
    assert other["median_distance"] > 0.7
    assert flat["images"] == 2 and flat["faces"] == 1 and flat["detection_rate"] == 0.5
    assert results["clip_text"] == "a photo of man"


def test_missing_clip_weights_are_reported_and_skipped(no_clip) -> None:
    code, results, _, messages = no_clip
    assert code == 0 and results["clip_weights"] is None
    assert all(row["clip_image_image"] is None and row["clip_text_image"] is None for row in results["folders"])
    found = [m for m in messages if m.startswith("CLIP weights not found")]
    assert len(found) == 1 and "skipping CLIP metrics" in found[0] and "\n" not in found[0]


def test_markdown_has_one_row_per_folder_and_plot_is_png(no_clip, dirs) -> None:
    _, _, paths, _ = no_clip
    lines = paths["md"].read_text().strip().splitlines()
    assert len(lines) == 2 + 3 and "fraction < 0.6" in lines[0]
    assert str(dirs["other"]) in lines[3] and "| 0.000 |" in lines[3] and "n/a" in lines[3]
    with Image.open(paths["png"]) as chart:
        assert chart.format == "PNG" and chart.width >= 300 and len(chart.getcolors(1 << 16)) > 3


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialised small CLIP ViT saved as a state dict (what clip.load reads without jit)."""
    from clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_clip_metrics_with_local_weights(dirs, tiny_clip, tmp_path) -> None:
    ref = folder(tmp_path, "ref_one", "obama_1.jpg")
    copy = folder(tmp_path, "copy_of_ref", "obama_1.jpg")
    out = tmp_path / "r.json"
    code = evaluate_identity.main(["--reference", str(ref), "--generated", str(copy), str(dirs["other"]),
                                   "--prompt", "a photo of * man", "--class_word", "man", "--clip_model", str(tiny_clip),
                                   "--out", str(out), "--device", "cpu"])
    results = json.loads(out.read_text())
    identical, other = results["folders"]
    assert code == 0 and results["clip_weights"] == str(tiny_clip)
    assert identical["clip_image_image"] == pytest.approx(1.0, abs=1e-5), "an image against itself"
    assert identical["mean_distance"] == pytest.approx(0.0, abs=1e-6)
    assert other["clip_image_image"] < 0.9999
    assert all(-1.0 <= row["clip_text_image"] <= 1.0 for row in results["folders"])
    scorer = evaluation.ClipScorer.load(str(tiny_clip), torch.device("cpu"))
    with Image.open(shared_fixture("faces/obama_1.jpg")) as image:
        assert identical["clip_text_image"] == pytest.approx(
            float(scorer.image_embedding(image.convert("RGB")) @ scorer.text_embedding("a photo of man")), abs=1e-5)


def test_text_for_clip_replaces_placeholder() -> None:
    assert evaluation.text_for_clip("photo of a * woman", "*", "woman") == "photo of a woman"
    assert evaluation.text_for_clip("* on a beach", "*", "person") == "person on a beach"


@pytest.mark.parametrize("case", ["missing_generated", "no_faces_in_reference", "bad_plot", "empty_generated"])
def test_bad_input_fails_cleanly(dirs, tmp_path, caplog, case: str) -> None:
    reference, generated, extra = dirs["ref"], [str(dirs["same"])], []
    if case == "missing_generated":
        generated, expected = [str(tmp_path / "nope")], "does not exist"
    elif case == "no_faces_in_reference":
        reference = tmp_path / "flat_ref"
        reference.mkdir()
        Image.new("RGB", (128, 128), "gray").save(reference / "grey.png")
        expected = "no face found in any of the 1 reference photos"
    elif case == "bad_plot":
        extra, expected = ["--plot", str(tmp_path / "chart.jpg")], "ending in .png"
    else:
        (tmp_path / "empty").mkdir()
        generated, expected = [str(tmp_path / "empty")], "holds no readable image"
    out = tmp_path / "results.json"
    with caplog.at_level(logging.ERROR):
        code = evaluate_identity.main(["--reference", str(reference), "--generated", *generated,
                                       "--clip_model", str(tmp_path / "none.pt"), "--out", str(out), *extra])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and expected in errors[0] and not out.exists(), errors
