"""scripts/demo.py with training and judging stood in: what it writes for the README's grid."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from PIL import Image

from ldm.sampling_io import read_png_text


def test_demo_writes_a_grid_of_the_first_sample_of_each_prompt(tmp_path, monkeypatch):
    from ldm.toy import benchmark, judge
    from ldm.train.validation.grid import LABEL_WIDTH
    from scripts import demo

    def fake_train(m, photos, seed, workdir, **kwargs):
        return tmp_path / f"{m.name}.out"

    def fake_evaluate(model, judge_model, phrase, subject, *, samples_per_prompt, seed, embedding=None):
        shade = -1.0 if embedding is None else 1.0  # init word black, the recipe white
        images = torch.full((5 * samples_per_prompt, 3, 8, 8), shade)
        images[1::samples_per_prompt] = 0.0  # a sample that is not the first: must not reach the grid
        score = SimpleNamespace(fidelity=0.5, editability=0.25, per_prompt={phrase: 0.5})
        return score, images

    monkeypatch.setattr(benchmark, "require_toy_models", lambda: None)
    monkeypatch.setattr(benchmark, "train", fake_train)
    monkeypatch.setattr(benchmark, "evaluate", fake_evaluate)
    monkeypatch.setattr(benchmark, "load_toy_model", lambda ckpt: None)
    monkeypatch.setattr(judge, "load_judge", lambda path: None)
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    outdir = tmp_path / "out"
    assert demo.main(["--samples", "3", "--outdir", str(outdir), "--logdir", str(tmp_path / "logs")]) == 0

    grid = Image.open(outdir / "grid.png").convert("L")
    assert grid.size == (LABEL_WIDTH + 2 + 5 * 10, 2 + 2 * 10)  # 5 prompts a row, 2 rows; make_grid pads 2 px
    for column in range(5):
        x = LABEL_WIDTH + 2 + column * 10 + 4
        assert grid.getpixel((x, 6)) == 0 and grid.getpixel((x, 16)) == 255, "row 1: init word, row 2: recipe"
    assert len(list((outdir / "init-word").glob("*/*.png"))) == 15  # every sample is still written
    assert read_png_text(next((outdir / "init-word").glob("*/*.png")))["parameters"].startswith("a photo of a toy")
    assert json.loads((outdir / "scores.json").read_text())["prompts"].keys() == {"init word",
                                                                                  "DreamBooth + momentum TI"}
