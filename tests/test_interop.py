"""Embedding interop: diffusers / AUTOMATIC1111 / TI / our format, convert_embedding.py and merge_embeddings.py.

The reference for the diffusers export is diffusers itself: a StableDiffusionPipeline assembled from
our tiny random weights (converted with diffusers' single-file helpers) loads the exported file with
its own ``load_textual_inversion``, and its prompt embeddings must equal ours.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import SEED_EMBEDDING, load_script, shared_fixture
from helpers_diffusers import randomize_, sd_pipeline
from safetensors.torch import save_file

from ldm.checkpoint import (
    CheckpointError,
    EmbeddingFile,
    save_checkpoint,
    save_embeddings,
)
from ldm.checkpoint.interop import token_table
from ldm.inference import attach_embedding, load_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.embedding_manager import load_embeddings

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "v1-inference.yaml"
STAR, SKS = 265, 48136  # CLIP ids of "*" and "sks"
GAMMA = 0.3
PROMPT = "a photo of * woman"
FOREIGN = [("diffusers", ".safetensors"), ("diffusers", ".bin"), ("a1111", ".pt"), ("a1111", ".safetensors")]


convert = load_script("convert_embedding")
merge = load_script("merge_embeddings")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Tiny random SD (zero-initialised weights randomised), its checkpoint and a trained-looking momentum embedding."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    root = tmp_path_factory.mktemp("interop")
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(OmegaConf.load(TINY_CONFIG).model))
    ckpt = save_checkpoint(root / "tiny.ckpt", model.state_dict())
    table = model.cond_stage_model.token_embedding.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    v = table[2308][None] + 0.5 * torch.randn(1, table.shape[1], generator=gen)  # "woman" moved away, [1, D]
    emb = EmbeddingFile({"*": STAR}, {"*": v}, {"*": table[STAR][None].clone()}, GAMMA, step=500)
    ours = save_embeddings(root / "ours.pt", emb)
    loaded = load_model(TINY_CONFIG, ckpt, device="cpu")
    return {"root": root, "model": model, "loaded": loaded, "ckpt": ckpt, "table": table, "emb": emb, "ours": ours}


def run_convert(src: Path, dst: Path, to: str, *extra: str) -> int:
    return convert.main(["--input", str(src), "--output", str(dst), "--to", to, *extra])


def conditioning(model, path: Path, prompt: str = PROMPT) -> torch.Tensor:
    attach_embedding(model, path)
    with torch.no_grad():
        return model.get_learned_conditioning([prompt])


# ------------------------------------------------------------------ diffusers' own loader


@pytest.fixture(scope="module")
def pipe(tiny):
    """StableDiffusionPipeline built offline from our tiny weights (diffusers' single-file converters)."""
    return sd_pipeline(tiny["model"], TINY_CONFIG, tiny["root"])


@pytest.mark.parametrize("target,suffix", FOREIGN)
def test_export_loads_in_diffusers_with_equal_prompt_embeddings(tiny, pipe, target: str, suffix: str) -> None:
    path = tiny["root"] / f"export_{target}{suffix}"
    assert run_convert(tiny["ours"], path, target, "--token", "<momentum>") == 0
    token = f"<m-{target}-{suffix[1:]}>"  # a new token per file: diffusers refuses to add one twice
    pipe.load_textual_inversion(str(path), token=token)
    new_id = pipe.tokenizer.convert_tokens_to_ids(token)
    assert new_id >= 49408, "diffusers adds the placeholder as a new token"
    effective = tiny["emb"].effective()["*"][0]
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[new_id], effective, atol=1e-7)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPT.replace("*", token), torch.device("cpu"), 1, False)
    ours = conditioning(tiny["model"], tiny["ours"])
    diff = (ours - theirs).abs().max().item()
    # tolerance: max abs diff <= 1e-5 (fp32, same weights, eager vs SDPA attention)
    assert diff <= 1e-5, f"prompt embeddings differ from diffusers' by {diff}"
    assert (conditioning(tiny["model"], tiny["ours"], "a photo of woman") - ours).abs().max() > 1e-3


# ------------------------------------------------------------------ import and sample


@pytest.mark.parametrize("target,suffix", FOREIGN)
def test_foreign_files_load_and_sample_like_ours(tiny, target: str, suffix: str, caplog) -> None:
    path = tiny["root"] / f"import_{target}{suffix}"
    assert run_convert(tiny["ours"], path, target) == 0
    emb = load_embeddings(path)
    assert (emb.source_format, emb.gamma, emb.base, emb.string_to_token) == (target, 1.0, None, {"*": STAR})
    model = tiny["loaded"]
    sampler = DDIMSampler(model)
    results = []
    for source in (tiny["ours"], path):
        cond = conditioning(model, source)
        x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            latents, _ = sampler.sample(S=2, batch_size=1, shape=(4, 8, 8), conditioning=cond, verbose=False, eta=0.0,
                                        x_T=x_T)
        results.append((cond, latents))
    (cond_ours, lat_ours), (cond_foreign, lat_foreign) = results
    # tolerance: 1e-6 (e is recomputed as e_p + 1 * (e - e_p) in fp32)
    assert (cond_ours - cond_foreign).abs().max() <= 1e-6
    assert (lat_ours - lat_foreign).abs().max() <= 1e-5 and lat_ours.abs().max() > 0.1


def test_diffusers_token_that_is_not_one_clip_token_becomes_star(tmp_path, caplog) -> None:
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.ones(768)}, str(path), metadata={"format": "pt"})  # old [D] layout
    with caplog.at_level(logging.WARNING):
        emb = load_embeddings(path)
    assert emb.string_to_token == {"*": STAR} and emb.name == "<cat-toy>" and emb.params["*"].shape == (1, 768)
    assert "write '*' in prompts" in caplog.text
    token_path = tmp_path / "sks.bin"
    torch.save({"sks": torch.ones(2, 768)}, token_path)
    assert load_embeddings(token_path).string_to_token == {"sks": SKS}


def test_a1111_pt_layout_and_round_trip(tiny, tmp_path) -> None:
    a1111 = tmp_path / "me.pt"
    assert run_convert(tiny["ours"], a1111, "a1111", "--token", "me", "--ckpt", str(tiny["ckpt"])) == 0
    raw = torch.load(a1111, map_location="cpu", weights_only=True)
    assert raw["name"] == "me" and raw["step"] == 500 and raw["sd_checkpoint_name"] == "tiny.ckpt"
    assert {p: int(i) for p, i in raw["string_to_token"].items()} == {"*": STAR}
    back = tmp_path / "back.safetensors"
    assert run_convert(a1111, back, "ours") == 0
    emb = load_embeddings(back)
    assert emb.step == 500 and emb.gamma == 1.0
    assert torch.allclose(emb.effective()["*"], tiny["emb"].effective()["*"], atol=1e-7)
    sft = tmp_path / "me.safetensors"
    assert run_convert(back, sft, "a1111") == 0
    assert torch.allclose(load_embeddings(sft).effective()["*"], tiny["emb"].effective()["*"], atol=1e-7)


def test_ours_keeps_v_e_p_gamma_and_remixes(tiny, tmp_path) -> None:
    copy = tmp_path / "copy.safetensors"
    assert run_convert(tiny["ours"], copy, "ours") == 0
    emb = load_embeddings(copy)
    assert emb.gamma == GAMMA and torch.equal(emb.params["*"], tiny["emb"].params["*"])
    remixed = tmp_path / "remixed.bin"
    assert run_convert(tiny["ours"], remixed, "diffusers", "--gamma", "0.8") == 0
    v, e_p = tiny["emb"].params["*"], tiny["emb"].base["*"]
    assert torch.allclose(load_embeddings(remixed).params["*"], e_p + 0.8 * (v - e_p), atol=1e-7)


# ------------------------------------------------------------------ e_p from the checkpoint


def test_file_without_e_p_gets_it_from_the_checkpoint(tiny, tmp_path) -> None:
    v = torch.randn(2, tiny["table"].shape[1])
    plain = tmp_path / "ti.pt"
    torch.save({"string_to_token": {"*": torch.tensor(STAR)}, "string_to_param": {"*": v}}, plain)
    out = tmp_path / "out.safetensors"
    assert run_convert(plain, out, "diffusers", "--gamma", "0.2") == 2 and not out.exists()
    assert run_convert(plain, out, "diffusers", "--gamma", "0.2", "--ckpt", str(tiny["ckpt"])) == 0
    e_p = token_table(tiny["ckpt"])[STAR]
    assert torch.allclose(load_embeddings(out).params["*"], e_p + 0.2 * (v - e_p), atol=1e-6)


def test_seed_file_needs_e_p_unless_gamma_is_one(tiny, tmp_path, caplog) -> None:
    seed_file = shared_fixture(SEED_EMBEDDING)
    out = tmp_path / "learned_embeds.safetensors"
    with caplog.at_level(logging.ERROR):
        assert run_convert(seed_file, out, "diffusers", "--gamma", "0.1") == 2
    assert "needs e_p" in caplog.text and "pass --ckpt" in caplog.text and str(seed_file) in caplog.text
    assert not out.exists()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert run_convert(seed_file, out, "diffusers", "--gamma", "0.1", "--ckpt", str(tiny["ckpt"])) == 2
    assert "dimension 768" in caplog.text and "uses 32" in caplog.text and str(seed_file) in caplog.text
    assert not out.exists()
    assert run_convert(seed_file, out, "diffusers", "--gamma", "1", "--token", "<seed>") == 0
    seed = load_embeddings(seed_file, default_gamma=1.0)
    assert torch.equal(load_embeddings(out).params["*"], seed.params["*"])


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case", ["yaml", "tensor_dict", "model", "sdxl", "suffix", "no_gamma"])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, caplog, case: str) -> None:
    src, to, extra, expected = tmp_path / "in.pt", "diffusers", [], "not an embedding file"
    if case == "yaml":
        src = tmp_path / "cfg.yaml"
        src.write_text(TINY_CONFIG.read_text())
        expected = "not a checkpoint or embedding file"
    elif case == "tensor_dict":
        torch.save({"weight": torch.randn(3, 3, 3, 3), "bias": torch.randn(3)}, src)
    elif case == "model":
        src = tiny["ckpt"]
    elif case == "sdxl":
        src = tmp_path / "sdxl.safetensors"
        save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}, str(src))
        expected = "SDXL"
    elif case == "suffix":
        src, to, expected = tiny["ours"], "a1111", "must end in .pt or .safetensors"
    else:
        torch.save({"string_to_token": {"*": torch.tensor(STAR)}, "string_to_param": {"*": torch.ones(1, 32)}}, src)
        expected = "stores no gamma: pass --gamma"
    out = tmp_path / "out.bin"
    with caplog.at_level(logging.ERROR):
        assert run_convert(src, out, to, *extra) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and expected in errors[0], errors
    assert case == "suffix" or str(src) in errors[0]
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_multi_placeholder_export_needs_a_choice(tiny, tmp_path) -> None:
    emb = EmbeddingFile({"*": STAR, "sks": SKS}, {"*": torch.ones(1, 32), "sks": torch.zeros(1, 32)}, gamma=1.0)
    src = save_embeddings(tmp_path / "two.pt", emb)
    assert run_convert(src, tmp_path / "a.safetensors", "diffusers") == 2
    assert run_convert(src, tmp_path / "a.safetensors", "diffusers", "--placeholder", "sks") == 0
    assert torch.equal(load_embeddings(tmp_path / "a.safetensors").params["sks"], torch.zeros(1, 32))
    with pytest.raises(CheckpointError, match="dimension 32 but the text encoder uses 768"):
        load_embeddings(src, expected_dim=768)


# ------------------------------------------------------------------ merge


def _ours(path: Path, placeholder: str, token_id: int, gamma: float, seed: int, dim: int = 32) -> Path:
    gen = torch.Generator().manual_seed(seed)
    emb = EmbeddingFile({placeholder: token_id}, {placeholder: torch.randn(1, dim, generator=gen)},
                        {placeholder: torch.randn(1, dim, generator=gen)}, gamma, step=10)
    return save_embeddings(path, emb)


def test_merge_clash_needs_rename(tmp_path, caplog) -> None:
    a, b = _ours(tmp_path / "a.pt", "*", STAR, 0.1, 1), _ours(tmp_path / "b.pt", "*", STAR, 0.1, 2)
    out = tmp_path / "merged.pt"
    with caplog.at_level(logging.ERROR):
        assert merge.main(["--inputs", str(a), str(b), "--output", str(out)]) == 2
    assert "'*' is in both" in caplog.text and "--rename '2:*=" in caplog.text and not out.exists()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert merge.main(["--inputs", str(a), str(b), "--output", str(out), "--rename", "2:*=<my token>"]) == 2
    assert "single CLIP token" in caplog.text and not out.exists()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert merge.main(["--inputs", str(a), str(b), "--output", str(out), "--rename", "*=sks"]) == 2
    assert "say which" in caplog.text
    assert merge.main(["--inputs", str(a), str(b), "--output", str(out), "--rename", "2:*=sks"]) == 0
    merged, ea, eb = load_embeddings(out), load_embeddings(a), load_embeddings(b)
    assert merged.string_to_token == {"*": STAR, "sks": SKS} and merged.gamma == 0.1 and merged.step == 10
    assert torch.equal(merged.params["*"], ea.params["*"]) and torch.equal(merged.params["sks"], eb.params["*"])
    assert torch.equal(merged.effective()["sks"], eb.effective()["*"])


def test_merge_mixed_gammas_stores_effective_vectors(tmp_path) -> None:
    a = _ours(tmp_path / "a.pt", "*", STAR, 0.1, 1)
    b = tmp_path / "b.safetensors"
    save_file({"sks": torch.randn(2, 32)}, str(b))
    out = tmp_path / "m.safetensors"
    assert merge.main(["--inputs", str(a), str(b), "--output", str(out)]) == 0
    merged = load_embeddings(out)
    assert merged.gamma == 1.0 and merged.base is None
    assert torch.allclose(merged.params["*"], load_embeddings(a).effective()["*"])
    assert torch.equal(merged.params["sks"], load_embeddings(b).params["sks"])


def test_merge_dimension_mismatch_names_files(tmp_path, caplog) -> None:
    a = _ours(tmp_path / "a.pt", "*", STAR, 0.1, 1, dim=768)
    b = _ours(tmp_path / "sd2.pt", "sks", SKS, 0.1, 2, dim=1024)
    with caplog.at_level(logging.ERROR):
        assert merge.main(["--inputs", str(a), str(b), "--output", str(tmp_path / "m.pt")]) == 2
    assert f"{b}: vectors of 'sks' have dimension 1024" in caplog.text and "uses 768" in caplog.text
    assert not (tmp_path / "m.pt").exists()


def test_merge_of_seed_files_without_e_p_needs_the_checkpoint(tiny, tmp_path, caplog) -> None:
    paths = []
    for name, token_id in (("a.pt", STAR), ("b.pt", SKS)):
        placeholder = "*" if token_id == STAR else "sks"
        torch.save({"string_to_token": {placeholder: torch.tensor(token_id)},
                    "string_to_param": {placeholder: torch.randn(1, 32)}}, tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "m.pt"
    with caplog.at_level(logging.ERROR):
        assert merge.main(["--inputs", *paths, "--output", str(out), "--gamma", "0.1"]) == 2
    assert "needs e_p" in caplog.text and "pass --ckpt" in caplog.text and not out.exists()
    assert merge.main(["--inputs", *paths, "--output", str(out), "--gamma", "0.1", "--ckpt", str(tiny["ckpt"])]) == 0
    e_p = token_table(tiny["ckpt"])[STAR]
    v = load_embeddings(paths[0], default_gamma=0.1).params["*"]
    assert torch.allclose(load_embeddings(out).effective()["*"], e_p + 0.1 * (v - e_p), atol=1e-6)
