"""A training run's embedding files, exactly as written, in the tools people take them to.

Two short tiny-config runs of ``main.py`` (gamma 0.1 and 1) write ``checkpoints/embeddings*.pt`` and
their ``.safetensors`` twins. Each file is then read

- with AUTOMATIC1111's rule (``create_embedding_from_data`` in its textual_inversion module:
  ``string_to_param``'s only entry, else the file's only tensor), placed at the trigger word's token
  in transformers' CLIP text model holding our weights;
- with diffusers' own ``StableDiffusionPipeline.load_textual_inversion``;

and the prompt embeddings must equal ours (this project loading the same file) within 1e-5.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers_diffusers import sd_pipeline
from safetensors.torch import load_file
from helpers import base_argv, only_run

import main
from ldm.checkpoint import load_embeddings
from ldm.inference import attach_embedding, load_model

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TINY_INFERENCE = ROOT / "configs" / "tiny" / "v1-inference.yaml"
PROMPT = "a photo of * woman"
STAR = 265  # CLIP id of "*"
GAMMAS = (0.1, 1.0)
TOLERANCE = 1e-5  # fp32, same weights; eager (transformers) vs SDPA (ours) attention


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photo_dir, tiny_ckpt) -> dict[float, Path]:
    """checkpoints/ of one 2-step CPU run per gamma."""
    logdir = tmp_path_factory.mktemp("portability")
    result = {}
    for gamma in GAMMAS:
        name = f"g{gamma}"
        argv = base_argv(logdir, photo_dir, tiny_ckpt, "-n", name, "--accelerator", "cpu", "--gamma", str(gamma),
                         "--max_steps", "2", "lightning.modelcheckpoint.params.every_n_train_steps=1",
                         "lightning.callbacks.image_logger.params.disabled=true")
        assert main.main(argv) == 0
        result[gamma] = only_run(logdir, f"_{name}_") / "checkpoints"
    return result


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_model(TINY_INFERENCE, tiny_ckpt, device="cpu")


@pytest.fixture(scope="module")
def pipe(ours, tmp_path_factory):
    return sd_pipeline(ours, TINY_INFERENCE, tmp_path_factory.mktemp("pipe"))


def our_prompt_embedding(model, path: Path, prompt: str = PROMPT) -> torch.Tensor:
    attach_embedding(model, path)
    with torch.no_grad():
        return model.get_learned_conditioning([prompt])[0]  # [77, D]


def a1111_vectors(path: Path) -> torch.Tensor:
    """The vectors AUTOMATIC1111 takes from an embedding file, by its reading rule."""
    if path.suffix == ".safetensors":
        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "A1111: embedding file has multiple terms in it"
        vectors = next(iter(params.values()))
    else:
        assert len(data) == 1, "A1111: embedding file has multiple terms in it"
        vectors = next(iter(data.values()))
    return (vectors.unsqueeze(0) if vectors.dim() == 1 else vectors).float()  # [n, D]


def a1111_prompt_embedding(text_encoder, tokenizer, vectors: torch.Tensor, prompt: str = PROMPT) -> torch.Tensor:
    """A1111's use of an embedding: its vectors replace the trigger word's token embedding."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids  # [1, 77]
    position = int((ids[0] == STAR).nonzero()[0])

    def replace_trigger(module, args, output):  # output: [1, 77, D]
        output = output.clone()
        output[0, position] = vectors[0]
        return output

    hook = text_encoder.get_input_embeddings().register_forward_hook(replace_trigger)
    try:
        with torch.no_grad():
            return text_encoder(ids)[0][0]  # last hidden state, [77, D]
    finally:
        hook.remove()


def run_files(checkpoints: Path) -> list[Path]:
    files = sorted(checkpoints.glob("embeddings*.pt")) + sorted(checkpoints.glob("embeddings*.safetensors"))
    return [f for f in files if f.stem in ("embeddings", "embeddings_gs-2")]


def test_every_pt_has_a_safetensors_twin_with_the_same_state(runs) -> None:
    for checkpoints in runs.values():
        pts = sorted(checkpoints.glob("embeddings*.pt"))
        assert {p.stem for p in pts} >= {"embeddings", "embeddings_gs-1", "embeddings_gs-2", "embeddings_ep-0"}
        for pt in pts:
            twin = pt.with_suffix(".safetensors")
            assert twin.is_file(), f"{twin.name} missing"
            a, b = load_embeddings(pt), load_embeddings(twin)
            assert (a.gamma, a.step, a.string_to_token) == (b.gamma, b.step, b.string_to_token)
            assert torch.equal(a.params["*"], b.params["*"]) and torch.equal(a.base["*"], b.base["*"])


@pytest.mark.parametrize("gamma", GAMMAS)
def test_a1111_reading_rule_gives_our_prompt_embeddings(runs, ours, pipe, gamma: float) -> None:
    for path in run_files(runs[gamma]):
        expected = our_prompt_embedding(ours, path)
        theirs = a1111_prompt_embedding(pipe.text_encoder, pipe.tokenizer, a1111_vectors(path))
        diff = (theirs - expected).abs().max().item()
        logger.info("A1111 rule, %s, gamma %s: prompt embedding max |diff| %.1e", path.name, gamma, diff)
        assert diff <= TOLERANCE, f"{path.name} (gamma {gamma}): A1111's prompt embedding differs by {diff}"
        emb = load_embeddings(path)
        assert emb.gamma == gamma and emb.source_format == "momentum-ti/2"
        if gamma != 1.0:  # what the old files gave A1111: v instead of e
            with_v = a1111_prompt_embedding(pipe.text_encoder, pipe.tokenizer, emb.params["*"])
            assert (with_v - expected).abs().max() > 1e-3, "v and e must give different prompts at gamma 0.1"


@pytest.mark.parametrize("gamma", GAMMAS)
def test_diffusers_loader_gives_our_prompt_embeddings(runs, ours, pipe, gamma: float) -> None:
    for path in run_files(runs[gamma]):
        token = f"<run-{gamma}-{path.stem}-{path.suffix[1:]}>"  # diffusers refuses to add a token twice
        pipe.load_textual_inversion(str(path), token=token)
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(PROMPT.replace("*", token), torch.device("cpu"), 1, False)
        diff = (theirs[0] - our_prompt_embedding(ours, path)).abs().max().item()
        logger.info("diffusers loader, %s, gamma %s: prompt embedding max |diff| %.1e", path.name, gamma, diff)
        assert diff <= TOLERANCE, f"{path.name} (gamma {gamma}): diffusers' prompt embedding differs by {diff}"


def test_diffusers_takes_the_token_name_from_the_file(runs, ours, pipe) -> None:
    path = runs[0.1] / "embeddings.pt"
    assert torch.load(path, weights_only=True)["name"] == "<*>"
    pipe.load_textual_inversion(str(path))  # no token=: diffusers reads the file's "name"
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPT.replace("*", "<*>"), torch.device("cpu"), 1, False)
    assert (theirs[0] - our_prompt_embedding(ours, path)).abs().max().item() <= TOLERANCE
    with torch.no_grad():
        plain, _ = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)  # "*" with the model's own row e_p
    assert (theirs - plain).abs().max() > 1e-3, "the embedding changes the prompt"
