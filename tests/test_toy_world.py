"""The toy world's generator, datasets and judge (no diffusion model involved)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import ROOT, load_script
from omegaconf import OmegaConf

from ldm.toy.scenes import PHOTO_BACKGROUNDS, PHOTO_RESOLUTION, ToyScenes, write_photo_folder
from ldm.toy.world import (
    BACKGROUNDS, BODY_COLOURS, CLASS_WORD, HELD_OUT_POOL_SIZE, PATTERNS, POSITIONS, SHAPES, SIZES,
    Pose, Scene, Subject, caption, held_out_pool, held_out_subject, pretraining_subjects, random_pose, render,
)
from ldm.modules.encoders.tokenizer import CLIPBPETokenizer
from ldm.toy.benchmark import prompt_suite, score_suite
from ldm.toy.judge import UnknownQuestionError, Verdict, check_question

CENTRED = Pose("large", "center", 0.0, False, (0.0, 0.0, 0.0))


def vocabulary() -> set[str]:
    config = OmegaConf.load(ROOT / "configs/toy/v1-finetune.yaml")
    descriptive = list(config.data.params.train.params.descriptive_words)
    return {CLASS_WORD, "hat", "horns", "background", *SHAPES, *BODY_COLOURS, *PATTERNS, *BACKGROUNDS, *SIZES,
            *POSITIONS, *descriptive}


def test_every_content_word_is_one_clip_token():
    tokenizer = CLIPBPETokenizer(max_length=8)
    for word in sorted(vocabulary()):
        ids = tokenizer([word])[0].tolist()
        assert ids[2] == ids[-1], f"'{word}' is more than one CLIP token: {ids}"  # SOS, word, EOS, pad...


def test_held_out_subjects_never_appear_in_pretraining():
    pool = held_out_pool()
    assert len(pool) == HELD_OUT_POOL_SIZE == len(set(pool))
    assert not set(pool) & set(pretraining_subjects())
    scenes = ToyScenes(size=32, num_scenes=3000, seed=5).scenes
    assert not {s.subject for s in scenes} & set(pool)
    assert len({s.subject for s in scenes}) > 150  # pretraining covers many subjects


def test_render_is_reproducible_and_draws_the_features():
    subject = Subject("square", "blue", "plain", "none")
    image = np.asarray(render(Scene(subject, CENTRED, "pink"), 64)).astype(int)
    again = np.asarray(render(Scene(subject, CENTRED, "pink"), 64)).astype(int)
    assert (image == again).all()
    assert tuple(image[2, 2]) == BACKGROUNDS["pink"]  # a corner shows the context
    assert tuple(image[36, 32]) == BODY_COLOURS["blue"]  # the body centre shows the body colour
    striped = np.asarray(render(Scene(Subject("square", "blue", "striped", "none"), CENTRED, "pink"), 64))
    column = striped[24:48, 32].astype(int)
    assert {tuple(p) for p in column} >= {BODY_COLOURS["blue"], (245, 245, 245)}  # stripes alternate
    hat = np.asarray(render(Scene(Subject("square", "blue", "plain", "hat"), CENTRED, "pink"), 64)).astype(int)
    assert (hat != image).any(axis=2)[:20].sum() > 20  # the accessory sits above the body


def test_poses_differ_and_stay_in_range():
    rng = random.Random(0)
    poses = [random_pose(rng) for _ in range(200)]
    assert {p.size for p in poses} == set(SIZES) and {p.position for p in poses} == set(POSITIONS)
    assert all(p.position == "center" for p in poses if p.size == "large")
    assert {p.mirror for p in poses} == {True, False}
    assert max(abs(p.rotation_deg) for p in poses) <= 20.0


def test_captions_use_the_vocabulary_and_the_class_word():
    rng = random.Random(1)
    words = vocabulary() | {"a", "photo", "of", "with", "on", "the", "in"}
    for scene in ToyScenes(size=32, num_scenes=50, seed=3).scenes:
        text = caption(scene, rng)
        assert CLASS_WORD in text.split()
        assert set(text.split()) <= words, text


def test_full_captions_name_the_whole_subject_and_leave_the_old_captions_alone():
    scenes = ToyScenes(size=32, num_scenes=30, seed=3).scenes
    for scene in scenes:  # always full: the subject's description, size and background at random
        text = caption(scene, random.Random(0), full_p=1.0)
        assert scene.subject.describe() in text, text
    old = [caption(scene, random.Random(5)) for scene in scenes]
    assert [caption(scene, random.Random(5), full_p=0.0) for scene in scenes] == old  # same draws as before
    with pytest.raises(ValueError, match="full_caption_p"):
        ToyScenes(size=32, num_scenes=4, full_caption_p=1.5)


def test_scene_dataset_items_and_caption_dropout():
    data = ToyScenes(size=32, num_scenes=40, seed=0, caption_dropout=0.5)
    items = [data[i] for i in range(40)]
    assert items[0]["image"].shape == (32, 32, 3) and -1.0 <= items[0]["image"].min() <= items[0]["image"].max() <= 1.0
    assert 5 < sum(item["caption"] == "" for item in items) < 35
    assert [item["image_index"] for item in items] == list(range(40))
    crops = ToyScenes(size=32, num_scenes=4, seed=0, crop=16)
    assert crops[0]["image"].shape == (16, 16, 3)
    with pytest.raises(ValueError, match="crop"):
        ToyScenes(size=32, num_scenes=4, crop=64)


def test_photo_folder_shows_one_held_out_subject(tmp_path):
    subject = write_photo_folder(3, tmp_path / "photos", num_photos=6)
    assert subject == held_out_subject(3)
    files = sorted((tmp_path / "photos").glob("*.png"))
    assert len(files) == 6
    from PIL import Image

    corners = {Image.open(f).convert("RGB").getpixel((1, 1)) for f in files}
    assert corners == {BACKGROUNDS[b] for b in PHOTO_BACKGROUNDS}
    assert Image.open(files[0]).size == (PHOTO_RESOLUTION, PHOTO_RESOLUTION)


@pytest.mark.parametrize("seed", [-1, HELD_OUT_POOL_SIZE])
def test_a_subject_seed_that_does_not_exist_is_a_one_line_error(tmp_path, seed):
    with pytest.raises(ValueError, match=r"subject seed .* does not exist") as err:
        write_photo_folder(seed, tmp_path / "photos")
    assert "\n" not in str(err.value)


def test_unknown_features_and_questions_are_refused():
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        Subject("round", "teal", "plain", "none")
    with pytest.raises(UnknownQuestionError, match="the judge knows no attribute 'hair'"):
        check_question("hair")


def test_suite_scores_count_subject_and_attribute_together():
    subject = Subject("round", "red", "striped", "hat")
    right = {"shape": "round", "colour": "red", "pattern": "striped", "accessory": "hat", "size": "large",
             "position": "center"}
    suite = prompt_suite("*")
    verdicts = []
    for prompt, question, asked in suite:  # 2 samples per prompt
        background = asked if question == "background" else "white"
        good = Verdict(True, {**right, "background": background, **({question: asked} if question else {})})
        wrong_subject = Verdict(True, {**good.answers, "colour": "blue"})
        verdicts += [good, wrong_subject]
    score = score_suite(verdicts, suite, 2, subject)
    assert score.fidelity == 0.5 and score.editability == 0.5 and score.attribute == 1.0
    absent = [Verdict(False, v.answers) for v in verdicts]
    assert score_suite(absent, suite, 2, subject).fidelity == 0.0
    with pytest.raises(UnknownQuestionError):
        score_suite(verdicts[:4], [suite[0], ("a photo of a *", "hair", "long")], 2, subject)


@pytest.mark.parametrize("argv, message", [
    (["--subject-seed", "99"], "--subject-seed 99 does not exist"),
    (["--methods", "ti", "lora"], "unknown method 'lora'"),
    (["--subjects", "0"], "--subjects must be 1 to 24"),
])
def test_benchmark_refuses_bad_input_in_one_line(argv, message, tmp_path, caplog):
    from scripts import toy_benchmark

    assert toy_benchmark.main([*argv, "--workdir", str(tmp_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert not any(tmp_path.iterdir())  # nothing trained or written


def test_a_missing_toy_model_names_the_command_that_builds_it(tmp_path, monkeypatch):
    import ldm.toy.benchmark as toy

    monkeypatch.setattr(toy, "TOY_MODEL", toy.ROOT / "models/toy/missing.safetensors")
    with pytest.raises(FileNotFoundError, match="python scripts/toy_pretrain.py"):
        toy.require_toy_models()


@pytest.mark.parametrize("argv", [["--chunk", "0"], ["--continue-steps", "-1"]])
def test_the_continue_stage_refuses_bad_step_counts_in_one_line(argv, tmp_path, caplog):
    code = load_script("toy_pretrain").main(["--stages", "continue", "--out", str(tmp_path), *argv])
    assert code == 2
    assert "--chunk must be at least 1 and --continue-steps at least 0" in caplog.text
    assert not list(tmp_path.iterdir()), "nothing is written before the arguments are checked"


def test_the_continue_stage_goes_on_from_its_latest_chunk(tmp_path, monkeypatch):
    """Run again, the continuation trains only the missing chunks, from the latest file, and probes what the curve lacks."""
    import ldm.export

    pretrain = load_script("toy_pretrain")
    chunk_dir = tmp_path / "work" / "continue"
    chunk_dir.mkdir(parents=True)
    for done in (1000, 2000):
        pretrain.chunk_file(chunk_dir, done).write_bytes(b"x")
    (tmp_path / pretrain.CURVE_FILE).write_text('{"0": {}, "1000": {}}')
    trained, probed = [], []

    def fake_run_main(argv):
        trained.append(argv[argv.index("--actual_resume") + 1])
        return tmp_path / "run"

    monkeypatch.setattr(pretrain, "run_main", fake_run_main)
    monkeypatch.setattr(ldm.export, "export_checkpoint", lambda source, target, **_: target.write_bytes(b"y"))
    monkeypatch.setattr(pretrain, "probe", lambda ckpt, out, config: probed.append(ckpt.name) or {})
    last = pretrain.continue_diffusion(tmp_path / "work", tmp_path, 3000, 1000, tmp_path / "start.safetensors")
    assert trained == [str(pretrain.chunk_file(chunk_dir, 2000))]
    assert probed == ["toy-v1-continued-2000.safetensors", "toy-v1-continued-3000.safetensors"]
    assert last == pretrain.chunk_file(chunk_dir, 3000)


def test_growing_the_toy_model_adds_blocks_that_change_nothing(tmp_path):
    """The grown model (cross-attention at 16x16 too) predicts exactly what the first-stage model predicts."""
    import torch

    from ldm.checkpoint import save_checkpoint
    from ldm.inference import load_model
    from ldm.util import instantiate_from_config, randomize_zero_weights

    pretrain = load_script("toy_pretrain")
    stage1_config = tmp_path / "stage1.yaml"
    OmegaConf.save(pretrain.model_config([pretrain.STAGE1_ARCHITECTURE]), stage1_config)
    torch.manual_seed(0)
    stage1 = instantiate_from_config(OmegaConf.load(stage1_config).model)
    randomize_zero_weights(stage1.model, std=0.02)  # zero output blocks would hide a wrong copy
    stage1_file = save_checkpoint(tmp_path / "stage1.safetensors", stage1.state_dict())
    grown_file = pretrain.grow_checkpoint(stage1_file, tmp_path / "grown.safetensors")
    first = load_model(stage1_config, stage1_file, device="cpu")
    grown = load_model(ROOT / "configs/toy/v1-inference.yaml", grown_file, device="cpu")
    assert len(grown.model.state_dict()) > len(first.model.state_dict())
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    with torch.no_grad():
        context = first.get_learned_conditioning(["a photo of a red toy", ""])
        torch.testing.assert_close(grown.apply_model(x, t, context), first.apply_model(x, t, context),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage, missing", [("grow", "toy-v1-stage1.safetensors is missing: run --stages diffusion"),
                                            ("continue", "toy-v1-grown.safetensors is missing: run --stages grow")])
def test_a_stage_without_its_input_names_the_stage_that_makes_it(stage, missing, tmp_path, caplog):
    code = load_script("toy_pretrain").main(["--stages", stage, "--workdir", str(tmp_path / "work"),
                                             "--out", str(tmp_path / "out")])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and missing in errors[0]
    assert not (tmp_path / "work").exists()
