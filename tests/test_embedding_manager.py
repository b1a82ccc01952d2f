"""EmbeddingManager: momentum semantics, gradients, files and the published seed embeddings.

Expected conditionings are built independently: a copy of the text encoder whose token table
row of the placeholder (or of stand-in words) is overwritten, encoded without any manager.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from helpers import SEED_EMBEDDING, STAR, make_batch, shared_fixture
from safetensors.torch import load_file

from ldm.modules.embedding_manager import EmbeddingManager


@pytest.fixture
def fresh_manager(tiny_model):
    """The tiny model with a new manager (random v, so v != e_p); the original is put back after."""
    original = tiny_model.embedding_manager

    def make(gamma: float, **kwargs) -> EmbeddingManager:
        manager = EmbeddingManager(tiny_model.cond_stage_model, initializer_words=["woman"], gamma=gamma, **kwargs)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for v in manager.vectors:
                v.copy_(torch.randn(v.shape, generator=gen) * 0.1)
        tiny_model.embedding_manager = manager
        return manager

    yield make
    tiny_model.embedding_manager = original


def encode_with_rows(embedder, prompts, rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """Conditioning of ``prompts`` by a copy of ``embedder`` whose table rows ``rows`` are replaced."""
    edited = copy.deepcopy(embedder)
    with torch.no_grad():
        for token_id, vector in rows.items():
            edited.token_embedding.weight[token_id] = vector
    return edited.encode(prompts)


PROMPTS = ["a photo of a *", "* in a garden, * smiling"]


def test_gamma_one_is_plain_textual_inversion(tiny_model, fresh_manager) -> None:
    manager = fresh_manager(1.0)
    got = tiny_model.get_learned_conditioning(PROMPTS)
    expected = encode_with_rows(tiny_model.cond_stage_model, PROMPTS, {STAR: manager.vectors[0][0].detach()})
    assert torch.equal(got, expected), "gamma=1 must place v itself at '*' (plain TI), bit for bit"


def test_gamma_zero_is_the_frozen_model(tiny_model, fresh_manager) -> None:
    fresh_manager(0.0)
    got = tiny_model.get_learned_conditioning(PROMPTS)
    frozen = tiny_model.cond_stage_model.encode(PROMPTS)
    assert torch.equal(got, frozen), "gamma=0 must leave the frozen model's conditioning exactly unchanged"


def test_gamma_interpolates_between_frozen_row_and_v(tiny_model, fresh_manager) -> None:
    manager = fresh_manager(0.1)
    table = tiny_model.cond_stage_model.token_embedding.weight.detach()
    e_p, v = table[STAR].clone(), manager.vectors[0][0].detach()
    assert torch.equal(manager.base_vectors[0, 0], e_p)
    expected = encode_with_rows(tiny_model.cond_stage_model, PROMPTS, {STAR: e_p + 0.1 * (v - e_p)})
    got = tiny_model.get_learned_conditioning(PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg="gamma=0.1: e_p + 0.1 (v - e_p), fp32 1e-6")
    plain = encode_with_rows(tiny_model.cond_stage_model, PROMPTS, {STAR: v})
    assert not torch.allclose(got, plain, atol=1e-4), "gamma=0.1 must differ from plain TI"


@pytest.mark.parametrize("gamma", [0.0, 0.1, 1.0])
def test_prompts_without_placeholder_pass_through(tiny_model, fresh_manager, gamma: float) -> None:
    fresh_manager(gamma)
    prompts = ["", "a dog"]
    assert torch.equal(tiny_model.get_learned_conditioning(prompts), tiny_model.cond_stage_model.encode(prompts))


def test_multi_vector_splices_and_shifts(tiny_model, fresh_manager) -> None:
    manager = fresh_manager(0.5, num_vectors_per_token=3)
    assert manager.vectors[0].shape == (3, 32)
    e = manager.effective_vectors(0).detach()  # [3, D]
    tokenizer = tiny_model.cond_stage_model.tokenizer
    stand_ins = [tokenizer.encode(w)[0] for w in ("x", "y", "z")]
    got = tiny_model.get_learned_conditioning(["a photo of a * dog", "a dog"])
    expected = encode_with_rows(tiny_model.cond_stage_model, ["a photo of a x y z dog", "a dog"],
                                dict(zip(stand_ins, e)))
    assert torch.equal(got, expected), "3 vectors at '*', the following tokens shifted right by 2"
    single = tiny_model.cond_stage_model.encode(["a photo of a * dog"])
    assert not torch.allclose(got[:1], single, atol=1e-4)


def test_multi_vector_truncates_to_context_length(tiny_model, fresh_manager) -> None:
    fresh_manager(1.0, num_vectors_per_token=3)
    long_prompt = " ".join(["*"] * 40)  # 40 x 3 vectors > 77 positions
    assert tiny_model.get_learned_conditioning([long_prompt]).shape == (1, 77, 32)


@pytest.mark.parametrize("kwargs,bad", [
    ({"placeholder_strings": ["sks person"]}, "sks person"),
    ({"placeholder_strings": ["<sks>"]}, "<sks>"),
    ({"initializer_words": ["photograph of"]}, "photograph of"),
])
def test_multi_token_strings_are_refused_with_their_tokens(tiny_model, kwargs, bad: str) -> None:
    with pytest.raises(ValueError, match="single CLIP token") as info:
        EmbeddingManager(tiny_model.cond_stage_model, **kwargs)
    message = str(info.value)
    assert bad in message and "\n" not in message
    pieces = [tiny_model.cond_stage_model.tokenizer.decode([i]) for i in tiny_model.cond_stage_model.tokenizer.encode(bad)]
    assert str(pieces) in message, "the error shows how the string tokenizes"


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_outside_unit_interval_is_refused(tiny_model, gamma: float) -> None:
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        EmbeddingManager(tiny_model.cond_stage_model, gamma=gamma)
    manager = EmbeddingManager(tiny_model.cond_stage_model, gamma=0.1)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        manager.set_gamma(gamma)


def test_init_word_sets_v_and_placeholder_sets_e_p(tiny_model) -> None:
    manager = EmbeddingManager(tiny_model.cond_stage_model, initializer_words=["woman"], gamma=0.1)
    table = tiny_model.cond_stage_model.token_embedding.weight
    woman = tiny_model.cond_stage_model.tokenizer.encode("woman")[0]
    assert torch.equal(manager.vectors[0][0], table[woman])
    assert torch.equal(manager.base_vectors[0][0], table[STAR])


# ------------------------------------------------------------------------------ gradients


def test_gradient_reaches_only_the_embedding(tiny_model) -> None:
    tiny_model.train()
    tiny_model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _ = tiny_model.shared_step(make_batch())
    loss.backward()
    manager_params = {id(p) for p in tiny_model.embedding_manager.embedding_parameters()}
    try:
        for name, param in tiny_model.named_parameters():
            if id(param) in manager_params:
                assert param.requires_grad and param.grad is not None, name
                assert param.grad.abs().sum() > 0, f"{name}: no gradient reached the embedding"
            else:
                assert not param.requires_grad, f"{name} should be frozen"
                assert param.grad is None, f"{name} got a gradient"
        for part in ("model", "first_stage_model", "cond_stage_model"):
            assert not any(p.requires_grad for p in getattr(tiny_model, part).parameters()), part
    finally:
        tiny_model.zero_grad(set_to_none=True)


def test_optimizer_holds_exactly_the_embedding(tiny_model) -> None:
    optimizer = tiny_model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    expected = list(tiny_model.embedding_manager.embedding_parameters())
    assert len(held) == len(expected) and all(a is b for a, b in zip(held, expected))
    assert optimizer.param_groups[0]["lr"] == tiny_model.learning_rate


# ---------------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tiny_model, fresh_manager, tmp_path, suffix: str) -> None:
    manager = fresh_manager(0.3, num_vectors_per_token=2)
    path = manager.save(tmp_path / f"emb{suffix}", step=7)
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
        assert int(raw["string_to_token"]["*"]) == STAR and raw["momentum_ti"]["gamma"] == 0.3 and raw["step"] == 7
        effective = raw["string_to_param"]["*"]  # the key other tools read holds e
    else:
        effective = load_file(str(path))["<*>"]
    torch.testing.assert_close(effective, manager.effective_vectors(0).detach(), atol=1e-7, rtol=0,
                               msg="stored effective vectors e = e_p + gamma (v - e_p), fp32 1e-7")

    other = EmbeddingManager(tiny_model.cond_stage_model, num_vectors_per_token=2)  # no gamma given: the file's
    emb = other.load(path)
    assert emb.step == 7 and other.gamma == 0.3
    assert torch.equal(other.vectors[0], manager.vectors[0])
    assert torch.equal(other.effective_vectors(0), manager.effective_vectors(0)), "effective vectors rebuilt exactly"


def test_a_given_gamma_wins_over_the_files(tiny_model, fresh_manager, tmp_path) -> None:
    path = fresh_manager(0.3).save(tmp_path / "emb.pt")
    configured = EmbeddingManager(tiny_model.cond_stage_model, gamma=0.5)
    configured.load(path)
    assert configured.gamma == 0.5
    assert EmbeddingManager.from_file(tiny_model.cond_stage_model, path, gamma=0.7).gamma == 0.7
    assert EmbeddingManager.from_file(tiny_model.cond_stage_model, path).gamma == 0.3


def test_an_unknown_setting_is_refused(tiny_model) -> None:
    with pytest.raises(TypeError, match="'gama'"):
        EmbeddingManager(tiny_model.cond_stage_model, gama=0.5)


def test_load_refuses_wrong_vector_count(tiny_model, fresh_manager, tmp_path) -> None:
    path = fresh_manager(0.1, num_vectors_per_token=2).save(tmp_path / "two.pt")
    with pytest.raises(ValueError, match="num_vectors_per_token"):
        EmbeddingManager(tiny_model.cond_stage_model, num_vectors_per_token=1).load(path)


def seed_file() -> Path:
    return shared_fixture(SEED_EMBEDDING)


def test_seed_file_into_tiny_encoder_gives_dimension_error(tiny_model) -> None:
    path = seed_file()
    manager = EmbeddingManager(tiny_model.cond_stage_model, gamma=0.1)
    with pytest.raises(ValueError, match="dimension 768 but the text encoder uses 32"):
        manager.load(path)


@pytest.fixture(scope="module")
def full_text_encoder():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    torch.manual_seed(0)
    return FrozenCLIPEmbedder()  # ViT-L/14 text tower, random weights (~123M parameters)


def test_seed_file_into_full_size_encoder(full_text_encoder, caplog) -> None:
    path = seed_file()
    with caplog.at_level(logging.INFO):
        manager = EmbeddingManager.from_file(full_text_encoder, path)
    assert "stores no gamma; using gamma=0.1 from the flag/config" in caplog.text
    assert manager.placeholders == ["*"] and manager.token_ids == [STAR] and manager.gamma == 0.1
    v = manager.vectors[0][0].detach()
    assert abs(float(v.norm()) - 3.963) < 1e-3, "the stored raw vector (fixtures README)"
    e_p = full_text_encoder.token_embedding.weight[STAR].detach()
    torch.testing.assert_close(manager.effective_vectors(0)[0], e_p + 0.1 * (v - e_p), atol=1e-7, rtol=0)
    prompt = ["a photo of *"]
    got = full_text_encoder.encode(prompt, embedding_manager=manager)
    expected = encode_with_rows(full_text_encoder, prompt, {STAR: e_p + 0.1 * (v - e_p)})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg="conditioning with the seed vector, fp32 1e-5")
