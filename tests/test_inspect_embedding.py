"""scripts/inspect_embedding.py on tiny files: norms, cosines, nearest tokens, drift over steps, bad input."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script

from ldm.checkpoint import EmbeddingFile, save_checkpoint, save_embeddings

STAR, WOMAN = 265, 2308  # CLIP ids of "*" and "woman"
DIM = 32


inspect_embedding = load_script("inspect_embedding")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> dict:
    """A checkpoint holding only a random token table and three embeddings of one run (v drifting from 'woman')."""
    root = tmp_path_factory.mktemp("inspect")
    table = torch.randn(49408, DIM, generator=torch.Generator().manual_seed(0))
    ckpt = save_checkpoint(root / "base.ckpt",
                           {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": table})
    gen = torch.Generator().manual_seed(1)
    vs, paths = [], []
    for step in (300, 100, 200):  # written out of order: the drift must sort by step
        v = table[WOMAN][None] + step / 300 * torch.randn(1, DIM, generator=gen)
        vs.append((step, v))
        emb = EmbeddingFile({"*": STAR}, {"*": v}, {"*": table[STAR][None].clone()}, 0.25, step=step)
        paths.append(save_embeddings(root / f"embeddings_gs-{step}.pt", emb))
    return {"root": root, "table": table, "ckpt": ckpt, "paths": paths, "v": dict(vs)}


def run(tmp_path: Path, *argv: str) -> tuple[int, dict | None]:
    out = tmp_path / "report.json"
    code = inspect_embedding.main([*argv, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_single_file_statistics(run_dir, tmp_path) -> None:
    code, report = run(tmp_path, str(run_dir["paths"][0]), "--ckpt", str(run_dir["ckpt"]), "--init_word", "woman",
                       "--top_k", "3")
    assert code == 0
    entry = report["files"][0]
    info = entry["placeholders"]["*"]
    table, v = run_dir["table"], run_dir["v"][300]
    e_p = table[STAR][None]
    e = e_p + 0.25 * (v - e_p)
    assert (entry["gamma"], entry["step"], entry["format"]) == (0.25, 300, "momentum-ti/2")
    assert info["norm_v"] == pytest.approx([v.norm().item()], abs=1e-5)
    assert info["norm_effective"] == pytest.approx([e.norm().item()], abs=1e-5)
    assert info["cos_effective_e_p"] == pytest.approx([F.cosine_similarity(e, e_p).item()], abs=1e-5)
    assert info["cos_v_init"] == pytest.approx([F.cosine_similarity(v, table[WOMAN][None]).item()], abs=1e-5)
    nearest = info["nearest"][0]
    expected = (F.normalize(e, dim=-1) @ F.normalize(table, dim=-1).T)[0].topk(3)
    assert [t["id"] for t in nearest] == expected.indices.tolist()
    assert nearest[0]["cosine"] == pytest.approx(expected.values[0].item(), abs=1e-5)
    assert info["unavailable"] == []


def test_nearest_token_of_a_vocabulary_row_is_that_token(run_dir, tmp_path) -> None:
    path = save_embeddings(tmp_path / "woman.pt",
                           EmbeddingFile({"*": STAR}, {"*": run_dir["table"][WOMAN][None]}, gamma=1.0))
    code, report = run(tmp_path, str(path), "--ckpt", str(run_dir["ckpt"]), "--init_word", "woman", "--top_k", "1")
    info = report["files"][0]["placeholders"]["*"]
    assert code == 0 and info["nearest"][0][0]["token"] == "woman" and info["cos_v_init"][0] == pytest.approx(1.0)


def test_drift_is_sorted_by_step(run_dir, tmp_path) -> None:
    code, report = run(tmp_path, *map(str, run_dir["paths"]))
    assert code == 0
    rows = report["drift"]["*"]
    assert [row["step"] for row in rows] == [100, 200, 300]
    v = run_dir["v"]
    assert rows[0]["cos_first"] is None and rows[0]["cos_previous"] is None
    assert rows[2]["cos_first"] == pytest.approx(F.cosine_similarity(v[300], v[100]).item(), abs=1e-5)
    assert rows[2]["cos_previous"] == pytest.approx(F.cosine_similarity(v[300], v[200]).item(), abs=1e-5)
    assert [row["norm_v"] for row in rows] == pytest.approx([v[s].norm().item() for s in (100, 200, 300)], abs=1e-5)


def test_without_checkpoint_says_what_it_cannot_compute(run_dir, tmp_path) -> None:
    plain = tmp_path / "seed_gs-40.pt"
    torch.save({"string_to_token": {"*": torch.tensor(STAR)}, "string_to_param": {"*": torch.ones(1, DIM)}}, plain)
    code, report = run(tmp_path, str(plain), "--init_word", "woman")
    info = report["files"][0]["placeholders"]["*"]
    assert code == 0 and report["files"][0]["step"] == 40 and info["norm_effective"] is None
    assert info["nearest"] is None and info["cos_v_e_p"] is None
    assert any("no gamma" in item for item in info["unavailable"])
    assert any("init word (pass --ckpt)" in item for item in info["unavailable"])
    code, report = run(tmp_path, str(plain), "--gamma", "1")
    assert code == 0 and report["files"][0]["placeholders"]["*"]["norm_effective"] == pytest.approx([DIM ** 0.5])


def test_bad_input(run_dir, tmp_path, caplog) -> None:
    sd2 = save_embeddings(tmp_path / "sd2.pt", EmbeddingFile({"*": STAR}, {"*": torch.ones(1, 1024)}, gamma=1.0))
    yaml = tmp_path / "config.yaml"
    yaml.write_text("model: {}\n")
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path, str(sd2), "--ckpt", str(run_dir["ckpt"])) == (2, None)
        assert f"{sd2}: vectors of '*' have dimension 1024" in caplog.text and f"uses {DIM}" in caplog.text
        assert run(tmp_path, str(yaml)) == (2, None)
        assert "embedding file" in caplog.text
        assert run(tmp_path, str(sd2), "--init_word", "two words") == (2, None)
        assert "single CLIP token" in caplog.text
