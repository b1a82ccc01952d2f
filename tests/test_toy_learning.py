"""Learning tests in the toy world: they fail when training or the pretrained model stop working.

They use the shipped toy models (``models/toy``, built by ``scripts/toy_pretrain.py``): the judge
must read renders right, the pretrained model must follow attribute prompts (outline included), and
textual inversion and DreamBooth on a held-out subject must each make it the judged identity of at
least half of their samples, where the init word alone draws it at most once in 8
(docs/toy_benchmark.md has the measurements).
"""
from __future__ import annotations

import pytest

from ldm.toy.scenes import write_photo_folder
from ldm.toy.world import CLASS_WORD, held_out_pool
from ldm.toy.probes import prompt_following
from ldm.toy.benchmark import TOY_JUDGE, TOY_MODEL, evaluate, load_toy_model, native_bf16, require_toy_models, train
from ldm.toy.cells import method
from ldm.toy.judge import accuracy, load_judge

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
    assert set(following) == {"background", "size", "colour", "shape", "pattern", "accessory"}
    for word in ("background", "size", "colour"):
        assert following[word] >= 0.8, following
    assert following["pattern"] >= 0.7, following
    # outline on request, which the first toy model (no cross-attention at 16x16) never learned: it drew the
    # asked shape in 0.28 of samples (chance 0.25) and the asked accessory in 0.19 (chance 1/3); the shipped
    # model 0.84 and 0.50 (docs/toy_world.md)
    assert following["shape"] >= 0.5, following
    assert following["accessory"] > 1 / 3, following


@pytest.mark.skipif(not native_bf16(), reason="this CPU emulates bfloat16, where the benchmark refuses --bf16")
def test_bf16_scoring_reads_what_fp32_scoring_reads(base_model, judge_model):
    """The benchmark's ``--bf16`` samples and judges under bfloat16 autocast; the judge must read the same."""
    from ldm.toy.judge import judge

    subject = held_out_pool()[1]
    runs = [evaluate(base_model, judge_model, subject.describe(), subject, samples_per_prompt=2, seed=5,
                     ddim_steps=10, bf16=bf16) for bf16 in (False, True)]
    (fp32, fp32_images), (bf16, bf16_images) = runs
    assert bf16_images.dtype == fp32_images.dtype and (bf16_images - fp32_images).abs().mean() < 0.02
    verdicts = [judge(judge_model, images) for images in (fp32_images, bf16_images)]
    agree = sum(a.shows(subject) == b.shows(subject) and a.answers == b.answers for a, b in zip(*verdicts))
    assert agree >= len(verdicts[0]) - 1, f"bf16 changed {len(verdicts[0]) - agree} of {len(verdicts[0])} verdicts"
    assert abs(bf16.fidelity - fp32.fidelity) <= 0.5 and fp32.fidelity > 0  # the description is drawn at all


def photo_folder(tmp_path):
    photos = tmp_path / "photos"
    return photos, write_photo_folder(SUBJECT_SEED, photos)


@pytest.mark.slow
def test_textual_inversion_learns_identity_features(tmp_path, base_model, judge_model):
    photos, subject = photo_folder(tmp_path)
    before, _ = evaluate(base_model, judge_model, CLASS_WORD, subject, samples_per_prompt=SAMPLES, seed=5)
    embedding = train(method("ti"), photos, seed=0, workdir=tmp_path / "logs")
    after, _ = evaluate(base_model, judge_model, method("ti").phrase, subject, samples_per_prompt=SAMPLES, seed=5,
                        embedding=embedding)
    # The init word draws random subjects (all four features right by chance in 1 of 216); the learned
    # embedding draws this subject about as often as its full written description does (docs/toy_benchmark.md).
    assert before.fidelity <= 0.125, f"the init word alone already draws the subject ({before})"
    assert after.fidelity >= 0.5, f"TI fidelity {after.fidelity}, features {after.features} (init word {before})"


@pytest.mark.slow
def test_dreambooth_learns_a_held_out_subject(tmp_path, base_model, judge_model):
    photos, subject = photo_folder(tmp_path)
    db = method("dreambooth")
    model_file = train(db, photos, seed=0, workdir=tmp_path / "logs")
    after, _ = evaluate(load_toy_model(model_file), judge_model, db.phrase, subject, samples_per_prompt=SAMPLES,
                        seed=5)
    assert after.fidelity >= 0.6, f"DreamBooth fidelity {after.fidelity}"
