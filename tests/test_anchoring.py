"""The anchoring options of issue 19: the pull toward the anchor, the norm bound, the class-mean start
(init_words) and Cross Initialization's start from the text encoder's output (init_from_encoder), and the
moving average of the embedding, each checked against a hand computation."""
from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, base_argv, error_lines, only_run
from omegaconf import OmegaConf

import main
from ldm.checkpoint import load_embeddings
from ldm.toy import world as toy_world
from ldm.train.flags import FlagError, apply_flags
from ldm.models.diffusion.anchor_loss import AnchorLoss
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.init_words import read_word_list, resolve_init_words
from ldm.momentum import mix_vectors, vector_norms

TI_CONFIG = ROOT / "configs" / "tiny" / "v1-finetune.yaml"
INIT_WORDS = ROOT / "inputs" / "init_words"


def manager_with(tiny_model, gamma: float = 0.1, **options) -> EmbeddingManager:
    """A manager on the tiny text encoder whose v has moved away from its start (v != v_0, v != e_p)."""
    manager = EmbeddingManager(tiny_model.cond_stage_model, initializer_words=["woman"], gamma=gamma, **options)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for v in manager.vectors:
            v.add_(torch.randn(v.shape, generator=gen) * 0.05)
    return manager


# ------------------------------------------------------------------------ 1. the pull toward the anchor
def test_anchor_term_passes_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    e_p, anchor = (torch.randn(2, 1, 6, dtype=torch.float64, generator=gen) for _ in range(2))
    v = torch.randn(2, 1, 6, dtype=torch.float64, generator=gen, requires_grad=True)

    def term(vectors):
        stub = SimpleNamespace(vectors=vectors, effective_vectors=lambda i: mix_vectors(e_p[i], vectors[i], 0.3),
                               anchor_vectors=lambda i: anchor[i])
        return AnchorLoss(1.0, stub).penalty()

    assert torch.autograd.gradcheck(term, (v,))


@pytest.mark.parametrize("anchor", ["init", "e_p"])
def test_anchor_term_value_and_gradient_match_the_formula(tiny_model, anchor: str) -> None:
    gamma = 0.1
    manager = manager_with(tiny_model, gamma, anchor_weight=0.5, anchor=anchor)
    v, e_p, v0 = manager.vectors[0], manager.base_vectors[0], manager.initial_vectors[0]
    target = e_p if anchor == "e_p" else e_p + gamma * (v0 - e_p)
    e = e_p + gamma * (v.detach() - e_p)
    term = AnchorLoss(0.5, manager).penalty()
    assert term.item() == pytest.approx((e - target).norm(dim=-1).sum().item(), rel=1e-5)
    (0.5 * term).backward()
    # d/dv of w ||e - a|| = w * gamma * (e - a) / ||e - a||
    expected = 0.5 * gamma * (e - target) / (e - target).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(v.grad, expected, rtol=1e-4, atol=1e-8)


def test_anchor_term_has_a_finite_gradient_at_the_start(tiny_model) -> None:
    manager = EmbeddingManager(tiny_model.cond_stage_model, initializer_words=["woman"], gamma=0.1, anchor_weight=1.0)
    AnchorLoss(1.0, manager).penalty().backward()  # e = e_0: distance 0, where a norm's derivative is undefined
    assert torch.equal(manager.vectors[0].grad, torch.zeros_like(manager.vectors[0]))


def test_training_loss_adds_the_weighted_term_and_logs_the_norms(tiny_model) -> None:
    original = tiny_model.embedding_manager
    try:
        tiny_model._personalize({"target": "ldm.modules.embedding_manager.EmbeddingManager",
                                 "params": {"initializer_words": ["woman"], "gamma": 0.1, "anchor_weight": 0.5}})
        torch.manual_seed(0)
        with torch.no_grad():
            tiny_model.embedding_manager.vectors[0].add_(0.05)
        z, captions = torch.randn(1, 4, 8, 8), ["a photo of a *"]
        torch.manual_seed(1)
        loss, logged = tiny_model(z, captions)
        tiny_model.personalization.loss_terms = []
        torch.manual_seed(1)
        plain, _ = tiny_model(z, captions)
    finally:
        tiny_model.embedding_manager, tiny_model.personalization.loss_terms = original, []
    assert loss.item() == pytest.approx(plain.item() + 0.5 * logged["train/loss_anchor"].item(), rel=1e-6)
    assert {"train/norm_e", "train/norm_e_minus_e_p"} <= set(logged)


# ------------------------------------------------------------------------------------ 2. the norm bound
@pytest.mark.parametrize("anchor", ["init", "e_p"])
def test_norm_bound_puts_every_vector_at_its_anchors_norm(tiny_model, anchor: str) -> None:
    manager = manager_with(tiny_model, 0.1, norm_bound=True, anchor=anchor)
    with torch.no_grad():
        manager.vectors[0].mul_(3.0)  # a step that grew e
    before = manager.effective_vectors(0).detach()
    manager.after_optimizer_step()
    after = manager.effective_vectors(0).detach()
    torch.testing.assert_close(vector_norms(after), vector_norms(manager.anchor_vectors(0)), rtol=1e-5, atol=0)
    cosine = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))  # scaled, not turned


def test_norm_metrics_are_the_norms_of_e_and_of_its_offset(tiny_model) -> None:
    manager = manager_with(tiny_model, 0.1)
    e = manager.effective_vectors(0).detach()
    metrics = manager.norm_metrics()
    assert metrics["norm_e"].item() == pytest.approx(e.norm(dim=-1).mean().item(), rel=1e-6)
    assert metrics["norm_e_minus_e_p"].item() == pytest.approx((e - manager.base_vectors[0]).norm(dim=-1).mean().item(),
                                                               rel=1e-6)


# ----------------------------------------------------------------------------- 3. the class-mean start
def test_init_words_start_is_the_mean_of_each_words_mean_token_row(tiny_model, caplog) -> None:
    embedder = tiny_model.cond_stage_model
    tokenizer, table = embedder.tokenizer, embedder.token_embedding.weight.detach()
    words = ["anna", "elizabeth", "bartholomew"]
    per_word = [table[tokenizer.encode(w)].mean(0) for w in words]
    assert len(tokenizer.encode("bartholomew")) > 1, "the check needs a word of several tokens"
    with caplog.at_level(logging.INFO):
        manager = EmbeddingManager(embedder, initializer_words=["woman"], gamma=0.1,
                                   init_words=",".join([*words, "<|endoftext|>"]))
    torch.testing.assert_close(manager.vectors[0].detach()[0], torch.stack(per_word).mean(0))
    assert manager.init_words.skipped == ("<|endoftext|>",)
    assert "3 words from init_words list (1 unknown skipped: <|endoftext|>)" in caplog.text


def test_init_words_of_a_file_skip_comments_and_blank_lines(tmp_path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("# names\nanna\n\n  maria  # a comment\n")
    assert read_word_list(str(path)) == (["anna", "maria"], f"init_words file {path}")


@pytest.mark.parametrize("content", ["", "# only a comment\n", "<|endoftext|>\n"])
def test_init_words_file_without_a_known_word_is_one_line_naming_it(tiny_model, tmp_path, content: str) -> None:
    path = tmp_path / "names.txt"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        resolve_init_words(str(path), tiny_model.cond_stage_model.tokenizer, 49408)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_init_words_file_is_an_error_not_a_word(tiny_model) -> None:
    with pytest.raises(ValueError, match="names.txt does not exist"):
        resolve_init_words("inputs/names.txt", tiny_model.cond_stage_model.tokenizer, 49408)


def test_shipped_lists_are_known_words_and_the_toys_are_its_feature_words(tiny_model) -> None:
    tokenizer = tiny_model.cond_stage_model.tokenizer
    names = resolve_init_words(str(INIT_WORDS / "given_names.txt"), tokenizer, 49408)
    assert len(names.words) == 100 and not names.skipped
    features, _ = read_word_list(str(INIT_WORDS / "toy_features.txt"))
    expected = {*toy_world.SHAPES, *toy_world.BODY_COLOURS, *toy_world.PATTERNS, *toy_world.ACCESSORIES} - {"none"}
    assert sorted(features) == sorted(expected)


def text_model_output_with_row(embedder, placeholder: str, row: torch.Tensor) -> torch.Tensor:
    """transformers' CLIP text model on the prompt ``placeholder`` with the placeholder's table row set to ``row``:
    the last hidden state (after the final layer norm) at the placeholder, [D] (a reference not using our encoder)."""
    text_model = copy.deepcopy(embedder.text_model)
    token_id = embedder.tokenizer.encode(placeholder)[0]
    with torch.no_grad():
        text_model.embeddings.token_embedding.weight[token_id] = row
    tokens = embedder.tokenize(placeholder)  # [1, L]
    pos = int((tokens[0] == token_id).nonzero()[0])
    with torch.no_grad():
        return text_model(input_ids=tokens).last_hidden_state[0, pos]


@pytest.mark.parametrize("start_from", ["init_word", "init_words"])
def test_init_from_encoder_start_is_the_encoders_output_at_the_placeholder(tiny_model, start_from: str) -> None:
    embedder = tiny_model.cond_stage_model
    tokenizer, table = embedder.tokenizer, embedder.token_embedding.weight.detach()
    words = ["anna", "elizabeth", "bartholomew"]
    options = {"init_words": ",".join(words)} if start_from == "init_words" else {}
    mean = (torch.stack([table[tokenizer.encode(w)].mean(0) for w in words]).mean(0) if options
            else table[tokenizer.encode("woman")[0]])
    plain = EmbeddingManager(embedder, initializer_words=["woman"], gamma=0.1, **options)
    crossed = EmbeddingManager(embedder, initializer_words=["woman"], gamma=0.1, init_from_encoder=True, **options)
    torch.testing.assert_close(plain.vectors[0].detach()[0], mean)
    expected = text_model_output_with_row(embedder, "*", mean)
    torch.testing.assert_close(crossed.vectors[0].detach()[0], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, mean, atol=1e-2), "the encoder's output is not the mean itself"
    # the start is v_0 everywhere: the buffer of the anchor and the older regulariser, and e_0 = e_p + gamma (v_0 - e_p)
    torch.testing.assert_close(crossed.initial_vectors[0], crossed.vectors[0].detach())
    e_0 = mix_vectors(crossed.base_vectors[0], expected[None], 0.1)
    torch.testing.assert_close(crossed.effective_vectors(0).detach(), e_0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(crossed.anchor_vectors(0), e_0, rtol=1e-5, atol=1e-5)


def test_init_from_encoder_gives_each_vector_its_own_positions_output(tiny_model) -> None:
    embedder = tiny_model.cond_stage_model
    n = 3
    crossed = EmbeddingManager(embedder, initializer_words=["woman"], gamma=0.1, num_vectors_per_token=n,
                               init_from_encoder=True)
    # reference: plain TI (gamma 1) with every v_k = the woman row, spliced in by the manager's own forward
    spliced = EmbeddingManager(embedder, initializer_words=["woman"], gamma=1.0, num_vectors_per_token=n)
    with torch.no_grad():
        expected = embedder.encode("*", embedding_manager=spliced)[0, 1:1 + n]  # <bos> v_1 v_2 v_3 <eos> ...
    start = crossed.vectors[0].detach()
    torch.testing.assert_close(start, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(start[0], start[1], atol=1e-3), "each position has its own output"


def test_init_from_encoder_is_recorded_in_the_embedding_file(tiny_model, tmp_path) -> None:
    embedder = tiny_model.cond_stage_model
    crossed = EmbeddingManager(embedder, initializer_words=["woman"], gamma=0.1, init_words="anna,maria",
                               init_from_encoder=True)
    for suffix in (".pt", ".safetensors"):
        saved = load_embeddings(crossed.save(tmp_path / f"embeddings{suffix}", step=0))
        assert saved.training["init_from_encoder"] is True
        assert saved.training["init_words"]["words"] == ["anna", "maria"]
        torch.testing.assert_close(saved.params["*"], crossed.vectors[0].detach())
    plain = EmbeddingManager(embedder, initializer_words=["woman"], gamma=0.1)
    assert plain.to_file().training["init_from_encoder"] is False


def test_init_from_encoder_flag_writes_its_config_key() -> None:
    config = OmegaConf.load(TI_CONFIG)
    apply_flags(config, main.build_parser().parse_args(["--init_from_encoder"]))
    assert config.model.params.personalization_config.params.init_from_encoder is True


def test_init_from_encoder_without_init_word_or_words_is_one_line_naming_it(tiny_model) -> None:
    with pytest.raises(ValueError) as err:
        EmbeddingManager(tiny_model.cond_stage_model, gamma=0.1, init_from_encoder=True)
    assert str(err.value).startswith("--init_from_encoder needs") and "\n" not in str(err.value)


def test_init_from_encoder_without_init_word_or_words_exits_2_naming_it(tmp_path, photo_dir, tiny_ckpt,
                                                                         caplog) -> None:
    argv = base_argv(tmp_path / "logs", photo_dir, tiny_ckpt, "--init_from_encoder",
                     "model.params.personalization_config.params.initializer_words=[]")
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and "--init_from_encoder" in errors[0], errors


# --------------------------------------------------------------------------------- 4. the moving average
def test_ema_after_n_steps_is_the_hand_computed_average(tiny_model) -> None:
    decay = 0.8
    manager = EmbeddingManager(tiny_model.cond_stage_model, initializer_words=["woman"], gamma=0.1, ema_decay=decay)
    expected = manager.vectors[0].detach().clone()  # the average starts at v_0
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        with torch.no_grad():
            manager.vectors[0].add_(torch.randn(manager.vectors[0].shape, generator=gen))  # an optimizer step
        manager.after_optimizer_step()
        expected = decay * expected + (1 - decay) * manager.vectors[0].detach()
    saved = manager.to_file(step=4, ema=True)
    torch.testing.assert_close(saved.params["*"], expected)
    assert saved.ema and saved.training["ema_decay"] == decay
    with manager.ema_scope():
        torch.testing.assert_close(manager.vectors[0].detach(), expected)
    assert not torch.equal(manager.vectors[0].detach(), expected), "the scope puts the trained v back"


def optimizer_steps(manager: EmbeddingManager, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` random updates of v, each followed by the manager's after-step hook; the v after each."""
    gen = torch.Generator().manual_seed(seed)
    trajectory = []
    for _ in range(count):
        with torch.no_grad():
            manager.vectors[0].add_(torch.randn(manager.vectors[0].shape, generator=gen))
        manager.after_optimizer_step()
        trajectory.append(manager.vectors[0].detach().clone())
    return trajectory


def test_bias_corrected_ema_is_the_normalised_average_of_the_updates_without_the_start(tiny_model) -> None:
    decay = 0.9
    manager = EmbeddingManager(tiny_model.cond_stage_model, initializer_words=["woman"], gamma=0.1,
                               ema_decay=decay, ema_bias_correction=True)
    trajectory = optimizer_steps(manager, 1, seed=3)
    torch.testing.assert_close(manager.to_file(ema=True).params["*"], trajectory[0])  # the start is gone at once
    trajectory += optimizer_steps(manager, 4, seed=4)
    t = len(trajectory)
    weights = [(1 - decay) * decay ** (t - i) for i in range(1, t + 1)]
    expected = sum(w * v for w, v in zip(weights, trajectory)) / (1 - decay ** t)
    saved = manager.to_file(step=t, ema=True)
    torch.testing.assert_close(saved.params["*"], expected)
    assert saved.training["ema_bias_correction"] is True


def test_bias_corrected_ema_continues_exactly_from_a_state_dict(tiny_model) -> None:
    def manager() -> EmbeddingManager:
        return EmbeddingManager(tiny_model.cond_stage_model, initializer_words=["woman"], gamma=0.1,
                                ema_decay=0.9, ema_bias_correction=True)
    straight, halves = manager(), manager()
    optimizer_steps(straight, 2, seed=1)
    optimizer_steps(straight, 2, seed=2)
    optimizer_steps(halves, 2, seed=1)
    resumed = manager()
    resumed.load_state_dict(halves.state_dict())  # what last.ckpt holds of the manager
    optimizer_steps(resumed, 2, seed=2)
    assert int(resumed.ema_updates) == 4
    assert torch.equal(resumed.ema_vectors, straight.ema_vectors)


def test_bias_correction_without_a_moving_average_exits_2_naming_both_flags(tmp_path, photo_dir, tiny_ckpt,
                                                                           caplog) -> None:
    argv = base_argv(tmp_path / "logs", photo_dir, tiny_ckpt, "--ema_bias_correction")
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and "--ema_bias_correction needs a moving average: give --ema_decay" in errors[0], errors


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv,expected", [
    (["--anchor_weight", "-1"], "--anchor_weight must be >= 0"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
    (["--ema_decay", "-0.1"], "--ema_decay must be in [0, 1)"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(argv, expected) -> None:
    with pytest.raises(FlagError) as err:
        apply_flags(OmegaConf.load(TI_CONFIG), main.build_parser().parse_args(argv))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_empty_init_words_file_exits_2_naming_it(tmp_path, photo_dir, tiny_ckpt, caplog) -> None:
    empty = tmp_path / "names.txt"
    empty.write_text("")
    argv = base_argv(tmp_path / "logs", photo_dir, tiny_ckpt, "--init_words", str(empty))
    with caplog.at_level(logging.INFO):
        assert main.main(argv) == 2
    errors = error_lines(caplog)
    assert len(errors) == 1 and str(empty) in errors[0], errors


# ------------------------------------------------------------------------------------ a run with them all
def test_a_run_with_every_option_saves_ema_files_and_records_the_options(tmp_path, photo_dir, tiny_ckpt,
                                                                         tiny_model) -> None:
    decay = 0.5
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "anchored", "--max_steps", "3", "--no_validation",
                     "--anchor_weight", "0.01", "--anchor", "e_p", "--norm_bound", "--ema_decay", str(decay),
                     "--init_words", str(INIT_WORDS / "given_names.txt"),
                     "lightning.callbacks.image_logger.params.disabled=true",
                     "lightning.modelcheckpoint.params.every_n_train_steps=1")
    assert main.main(argv) == 0
    ckpts = only_run(tmp_path, "anchored") / "checkpoints"
    # v_0: the class mean on the tiny checkpoint's table (the one tiny_model holds), then bounded by each step
    start = EmbeddingManager(tiny_model.cond_stage_model, gamma=0.1, init_words=str(INIT_WORDS / "given_names.txt"))
    expected = start.vectors[0].detach().clone()
    for step in (1, 2, 3):
        v = load_embeddings(ckpts / f"embeddings_gs-{step}.pt").params["*"]
        expected = decay * expected + (1 - decay) * v
    for name in ("embeddings_ema_gs-3.pt", "embeddings_ema.pt", "embeddings_ema.safetensors"):
        ema = load_embeddings(ckpts / name)
        assert ema.ema and ema.step == 3
        torch.testing.assert_close(ema.params["*"], expected, rtol=1e-5, atol=1e-6)
    raw = load_embeddings(ckpts / "embeddings.safetensors")
    assert not raw.ema
    assert raw.training["anchor_weight"] == 0.01 and raw.training["anchor"] == "e_p" and raw.training["norm_bound"]
    assert raw.training["ema_decay"] == decay and len(raw.training["init_words"]["words"]) == 100
    # the norm bound: ||e|| stays at ||e_p|| (anchor e_p)
    torch.testing.assert_close(vector_norms(raw.effective()["*"]), vector_norms(raw.base["*"]), rtol=1e-5, atol=0)
    # the A1111/diffusers key of the EMA file holds its effective e
    payload = torch.load(ckpts / "embeddings_ema.pt", weights_only=True)
    torch.testing.assert_close(payload["string_to_param"]["*"], ema.effective()["*"])
    # an EMA file loads where a plain embedding is expected
    EmbeddingManager(tiny_model.cond_stage_model, gamma=0.1).load(ckpts / "embeddings_ema.pt")
    # the drift and the pull are metrics of the run
    header = (ckpts.parent / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/norm_e", "train/norm_e_minus_e_p", "train/loss_anchor"} <= set(header)


def test_validation_samples_and_scores_the_moving_average_and_may_keep_it_as_best(tmp_path, photo_dir, tiny_ckpt,
                                                                                 monkeypatch) -> None:
    from ldm.train.validation import callback as validation_callback

    # per save: the trained embedding's score, then the moving average's; the average at step 2 is the best
    script = [(1.0, 0.6, 0.5), (1.0, 0.5, 1.0), (1.0, 0.6, 0.5), (1.0, 0.6, 0.75)]

    class ScriptedScorer:
        def score(self, images):
            rate, distance, match = script.pop(0)
            return {"images": len(images), "faces": len(images), "detection_rate": rate, "mean_distance": distance,
                    "median_distance": distance, "fraction_under_threshold": match}

    monkeypatch.setattr(validation_callback.IdentityScorer, "from_photos",
                        classmethod(lambda cls, *a, **k: ScriptedScorer()))
    argv = base_argv(tmp_path, photo_dir, tiny_ckpt, "-n", "emabest", "--max_steps", "4", "--ema_decay", "0.5",
                     "--validation_identity", "--validation_ddim_steps", "2",
                     "lightning.callbacks.image_logger.params.disabled=true",
                     "lightning.modelcheckpoint.params.every_n_train_steps=2")
    assert main.main(argv) == 0
    run = only_run(tmp_path, "emabest")
    assert {"step-2_ema.png", "step-4_ema.png"} <= {p.name for p in (run / "images" / "validation").iterdir()}
    record = json.loads((run / "checkpoints" / "best.json").read_text())
    assert record["step"] == 2 and record["ema"] is True
    best = load_embeddings(run / "checkpoints" / "embeddings_best.pt")
    assert best.ema
    ema_at_2 = load_embeddings(run / "checkpoints" / "embeddings_ema_gs-2.pt")
    torch.testing.assert_close(best.params["*"], ema_at_2.params["*"])
    assert not script, "both embeddings were scored at both saves"


def test_resume_continues_the_moving_average_exactly(tmp_path, photo_dir, tiny_ckpt, one_thread) -> None:
    common = base_argv(tmp_path, photo_dir, tiny_ckpt, "--ema_decay", "0.9", "--no_validation",
                       "lightning.callbacks.image_logger.params.disabled=true",
                       "lightning.modelcheckpoint.params.every_n_train_steps=2")
    assert main.main([*common, "-n", "straight", "--max_steps", "4"]) == 0
    assert main.main([*common, "-n", "halves", "--max_steps", "2"]) == 0
    halves = only_run(tmp_path, "halves")
    assert main.main(["-t", "-r", str(halves), "--max_steps", "4"]) == 0
    straight = load_embeddings(only_run(tmp_path, "straight") / "checkpoints" / "embeddings_ema.pt")
    resumed = load_embeddings(halves / "checkpoints" / "embeddings_ema.pt")
    assert resumed.step == straight.step == 4
    assert torch.equal(resumed.params["*"], straight.params["*"])  # one CPU thread: bit-identical
