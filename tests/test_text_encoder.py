"""FrozenCLIPEmbedder and the offline CLIP tokenizer against independent references.

References: the `clip` package's own SimpleTokenizer and transformers' CLIPTokenizer for ids;
transformers' CLIPTextModel loaded through diffusers' single-file CLIP conversion for numerics.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from clip.simple_tokenizer import SimpleTokenizer
from omegaconf import OmegaConf
from transformers import CLIPTextModel, CLIPTokenizer

from helpers import sd_v1_shapes
from helpers_diffusers import transformers_clip
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPBPETokenizer
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
STAR = 265  # id of "*", the default placeholder
PROMPTS = [
    "a photo of * woman",
    "A Photo of a CAT, sitting on a mat!",
    "portrait of a man, 4k, highly detailed, trending on artstation -- f/1.8 (bokeh)",
    "it's what they've said: \"don't\" & 'we'll' ... 100%?",
    "  multiple   spaces\tand\nnewlines  ",
    "café naïve résumé Ünïcödé 東京 ❤️",
    "sks person wearing sunglasses; in the style of van gogh",
]
LONG_PROMPT = ", ".join(f"word{i} highly detailed" for i in range(60))


@pytest.fixture(scope="module")
def tokenizer() -> CLIPBPETokenizer:
    return CLIPBPETokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer: CLIPBPETokenizer) -> CLIPTokenizer:
    """transformers' CLIP tokenizer (its own normaliser, splitter and BPE) over the shipped BPE list."""
    return CLIPTokenizer(vocab=tokenizer.vocab, merges=tokenizer.merges)


@pytest.fixture(scope="module")
def clip_tokenizer() -> SimpleTokenizer:
    """OpenAI's original tokenizer from the `clip` package (ftfy + html cleaning, own BPE code)."""
    return SimpleTokenizer()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, including the ones initialised to 0/1 (norms, biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "layer_norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)


def _build(seed: int, text_config: dict | None) -> FrozenCLIPEmbedder:
    torch.manual_seed(seed)
    model = FrozenCLIPEmbedder(text_config=text_config)
    _randomize(model, seed)
    return model


def _reference(model: FrozenCLIPEmbedder, tmp_path: Path) -> CLIPTextModel:
    """transformers CLIPTextModel loaded with our SD-layout weights through diffusers' converter."""
    checkpoint = {f"cond_stage_model.{k}": v for k, v in model.state_dict().items()}
    ref = transformers_clip(checkpoint, model.text_model.config, tmp_path)
    ours = {f"transformer.text_model.{k}": v for k, v in ref.state_dict().items()}
    assert ours.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(ours[key], value), f"diffusers conversion did not load {key}"
    return ref


@pytest.fixture(scope="module")
def full_model() -> FrozenCLIPEmbedder:
    return _build(1, None)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_known_ids(tokenizer: CLIPBPETokenizer) -> None:
    ids = tokenizer(["a photo of * woman"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 265, 2308, 49407]
    assert (ids[0, 7:] == 49407).all(), "SD v1 pads with EOS (49407)"
    assert tokenizer.encode("a cat, a dog. the") == [320, 2368, 267, 320, 1929, 269, 518]
    assert tokenizer.encode("A Photo OF") == tokenizer.encode("a photo of")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_clip_and_transformers(
    tokenizer: CLIPBPETokenizer, hf_tokenizer: CLIPTokenizer, clip_tokenizer: SimpleTokenizer, prompt: str
) -> None:
    ours = tokenizer.encode(prompt)
    assert ours == clip_tokenizer.encode(prompt), "differs from the clip package's own tokenizer"
    assert ours == hf_tokenizer(prompt, add_special_tokens=False)["input_ids"], "differs from transformers"
    padded = hf_tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(tokenizer([prompt]), padded["input_ids"])


def test_tokenizer_truncates_keeping_eos(tokenizer: CLIPBPETokenizer, hf_tokenizer: CLIPTokenizer) -> None:
    body = tokenizer.encode(LONG_PROMPT)
    assert len(body) > 77
    ids = tokenizer([LONG_PROMPT, "short"])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [49406] + body[:75] + [49407]
    reference = hf_tokenizer([LONG_PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids[:1], reference["input_ids"])


def test_tokenizer_decode_roundtrip(tokenizer: CLIPBPETokenizer) -> None:
    ids = tokenizer(["A photo of * Woman, 4k!"])[0]
    assert tokenizer.decode(ids) == "a photo of * woman , 4 k !"
    assert tokenizer.decode(tokenizer.encode("sks person")) == "sks person"
    assert tokenizer.decode(ids[:3], skip_special_tokens=False).startswith("<|startoftext|>")


# ---------------------------------------------------------------- layout


@pytest.mark.usefixtures("shared_fixtures")  # checked before the full model is built
def test_state_dict_matches_sd_checkpoint(full_model: FrozenCLIPEmbedder) -> None:
    expected = {key.removeprefix("cond_stage_model."): shape for key, shape in sd_v1_shapes("cond_stage").items()}
    ours = {k: tuple(v.shape) for k, v in full_model.state_dict().items()}
    expected.pop("transformer.text_model.embeddings.position_ids")
    assert ours == expected
    assert full_model.token_embedding.weight.shape == (49408, 768)


def test_load_state_dict_accepts_checkpoint_position_ids() -> None:
    model = _build(2, TINY)
    state = model.state_dict()
    state["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # [1, 77] as in SD files
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


# ---------------------------------------------------------------- numerics


def test_parity_tiny(tmp_path: Path) -> None:
    model = _build(3, TINY)
    ref = _reference(model, tmp_path)
    tokens = model.tokenize(PROMPTS)
    with torch.no_grad():
        ours = model(PROMPTS)
        theirs = ref(input_ids=tokens).last_hidden_state
    assert ours.shape == (len(PROMPTS), 77, 32)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"tiny CLIP parity: max abs diff {diff:.2e} > 1e-5 (fp32)"


def test_parity_full(full_model: FrozenCLIPEmbedder, tmp_path: Path) -> None:
    ref = _reference(full_model, tmp_path)
    prompts = PROMPTS[:3] + [LONG_PROMPT]
    with torch.no_grad():
        ours = full_model.encode(prompts)
        theirs = ref(input_ids=full_model.tokenize(prompts)).last_hidden_state
    assert ours.shape == (4, 77, 768)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"ViT-L/14 CLIP parity: max abs diff {diff:.2e} > 1e-5 (fp32)"


def test_embedding_manager_injects_before_positions() -> None:
    model = _build(4, TINY)
    new_vector = torch.randn(32, generator=torch.Generator().manual_seed(5))

    def manager(tokens: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return torch.where((tokens == STAR)[..., None], new_vector, embeds)

    prompts = ["a photo of * woman", "a photo of a woman"]
    with torch.no_grad():
        plain = model(prompts)
        injected = model(prompts, embedding_manager=manager)
        edited = copy.deepcopy(model.text_model)
        edited.embeddings.token_embedding.weight[STAR] = new_vector
        expected = edited(input_ids=model.tokenize(prompts)).last_hidden_state
    star = 4  # BOS a photo of * -> position 4
    assert torch.equal(injected[0, :star], plain[0, :star]), "causal: positions before * must not change"
    assert (injected[0, star:] - plain[0, star:]).abs().amax(dim=-1).min() > 1e-3
    assert torch.equal(injected[1], plain[1]), "prompts without * pass through unchanged"
    diff = (injected - expected).abs().max().item()
    assert diff <= 1e-5, f"injection vs edited embedding table: max abs diff {diff:.2e} > 1e-5"


def test_gradient_reaches_injected_vector_only() -> None:
    model = _build(6, TINY)
    vector = torch.zeros(32, requires_grad=True)

    def manager(tokens: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return torch.where((tokens == STAR)[..., None], vector, embeds)

    model(["a photo of *"], embedding_manager=manager).square().sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- construction


def test_frozen_stays_eval_without_grads() -> None:
    model = FrozenCLIPEmbedder(text_config=TINY)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.text_model.training
    trainable = FrozenCLIPEmbedder(text_config=TINY, freeze=False)
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_offline_construction_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = OmegaConf.load(ROOT / "configs" / "tiny" / "v1-inference.yaml").model.params.cond_stage_config
    model = instantiate_from_config(config)
    assert isinstance(model, FrozenCLIPEmbedder)
    assert model.token_embedding.weight.shape == (49408, 32)
    ignored_device = FrozenCLIPEmbedder(device="cuda", text_config=TINY)  # LDM key; never moves weights
    assert ignored_device.token_embedding.weight.device.type == "cpu"
    assert ignored_device(["a photo"]).shape == (1, 77, 32)


def test_local_directory_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hf_tokenizer: CLIPTokenizer) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _build(7, TINY)
    model.text_model.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    loaded = FrozenCLIPEmbedder(version=str(tmp_path))
    assert torch.equal(loaded.tokenize(PROMPTS + [LONG_PROMPT]), model.tokenize(PROMPTS + [LONG_PROMPT]))
    assert loaded.tokenizer.encode("a photo of * woman") == model.tokenizer.encode("a photo of * woman")
    with torch.no_grad():
        diff = (loaded(PROMPTS) - model(PROMPTS)).abs().max().item()
    assert diff <= 1e-6, f"local-directory load changed outputs by {diff:.2e}"


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="local directory"):
        FrozenCLIPEmbedder(version="not/a-real-dir", text_config=TINY)
    with pytest.raises(ValueError, match="max_length"):
        FrozenCLIPEmbedder(max_length=100, text_config=TINY)
    model = FrozenCLIPEmbedder(text_config=TINY)
    with pytest.raises(TypeError, match="list of str"):
        model(["ok", 3])
