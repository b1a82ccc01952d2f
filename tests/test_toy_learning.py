"""Learning tests in the toy world: they fail when training or the pretrained model stop working.

They use the shipped toy models (``models/toy``, built by ``scripts/toy_pretrain.py``): the judge
must read renders right, the pretrained model must follow attribute prompts, and textual inversion
on a held-out subject must raise the judged fidelity from the init word's level to at least 0.6.
"""
from __future__ import annotations

import pytest

from ldm.data.toy import write_photo_folder
from ldm.data.toy_world import CLASS_WORD, held_out_pool
from ldm.toy_benchmark import (
    TOY_JUDGE, TOY_MODEL, evaluate, load_toy_model, method, prompt_following, require_toy_models, train,
)
from ldm.toy_judge import accuracy, load_judge

SUBJECT_SEED = 0
SAMPLES = 8


@pytest.fixture(scope="module")
def judge_model():
    require_toy_models()
    return load_judge(TOY_JUDGE)


@pytest.fixture(scope="module")
def base_model():
    require_toy_models()
    return load_toy_model(TOY_MODEL)


def test_judge_reads_fresh_renders(judge_model):
    for subjects in (None, held_out_pool()):
        scores = accuracy(judge_model, num_images=400, seed=11, subjects=subjects)
        low = {k: v for k, v in scores.items() if v < 0.95}
        assert not low, f"judge accuracy under 0.95: {low}"


def test_pretrained_model_follows_attribute_prompts(base_model, judge_model):
    following = prompt_following(base_model, judge_model, samples_per_prompt=SAMPLES, seed=3)
    assert following["background"] >= 0.8, following
    assert following["size"] >= 0.8, following


@pytest.mark.slow
def test_textual_inversion_learns_a_held_out_subject(tmp_path, base_model, judge_model):
    photos = tmp_path / "photos"
    subject = write_photo_folder(SUBJECT_SEED, photos)
    before, _ = evaluate(base_model, judge_model, CLASS_WORD, subject, samples_per_prompt=SAMPLES, seed=5)
    embedding = train(method("ti"), photos, seed=0, workdir=tmp_path / "logs")
    after, _ = evaluate(base_model, judge_model, method("ti").phrase, subject, samples_per_prompt=SAMPLES, seed=5,
                        embedding=embedding)
    assert before.fidelity <= 0.25, f"the init word alone already shows the subject ({before.fidelity})"
    assert after.fidelity >= 0.6, f"TI fidelity {after.fidelity} (init word {before.fidelity})"
