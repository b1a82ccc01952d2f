"""The facial loss term: dataset face crops, the batched loss, its gradient, caching and the CLI."""
from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import torch
from helpers import shared_fixture
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

pytest.importorskip("dlib", reason="dlib is not installed: pip install dlib-bin")
import main
from ldm.data import face
from ldm.data.personalized import PersonalizedBase
from ldm.models.diffusion.loss_terms import Rows, batched_losses
from ldm.models.diffusion.face_loss import FacialLoss
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_FINETUNE = ROOT / "configs" / "tiny" / "v1-finetune.yaml"
FACE_PHOTOS = ("obama_1.jpg", "biden_1.jpg")
# Training resolution of these tests: 128 px -> 16 x 16 latents. At the tiny config's 64 px the UNet's
# 1 x 1 bottleneck GroupNorms over 2 values, which amplifies float32 rounding so much that a batch of
# B + F rows and two separate calls differ by up to ~5e-2; at 16 x 16 they agree to ~1e-5.
SIZE = 128


def copy_faces(folder: Path, names=FACE_PHOTOS) -> Path:
    """Copy fixture photos into ``folder`` (skipping the test when the fixtures are absent)."""
    sources = [shared_fixture(f"faces/{name}") for name in names]
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copy(source, folder / source.name)
    return folder


def write_no_face_images(folder: Path, kinds=("flat", "landscape")) -> Path:
    """A flat colour and a landscape-like texture (sky gradient over noisy ground), 320 x 240."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {"flat": np.full((240, 320, 3), (90, 140, 200), dtype=np.uint8)}
    yy, xx = np.mgrid[0:240, 0:320]
    ramp = np.stack([xx / 320 * 120 + 60, 200 - yy / 240 * 120, 80 + yy / 240 * 60], axis=-1)  # [240, 320, 3]
    images["landscape"] = np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
    for kind in kinds:
        Image.fromarray(images[kind]).save(folder / f"{kind}.png")
    return folder


def make_dataset(root: Path, cache: Path, crops: Path, **kwargs) -> PersonalizedBase:
    options = {"detector": "hog", "cache_dir": str(cache), "crops_dir": str(crops)}
    return PersonalizedBase(root, size=SIZE, repeats=1, flip_p=kwargs.pop("flip_p", 0.0), seed=0,
                            face_crops=options | kwargs.pop("face_options", {}), **kwargs)


def batch_of(dataset: PersonalizedBase, indices) -> dict:
    return default_collate([dataset[i] for i in indices])


@pytest.fixture(scope="module")
def face_data(tmp_path_factory) -> dict:
    """2 face photos + 1 flat-colour image, prepared once (flip_p=0) with a fresh cache."""
    base = tmp_path_factory.mktemp("face_data")
    root = copy_faces(base / "photos")
    write_no_face_images(root, kinds=("flat",))
    dataset = make_dataset(root, base / "cache", base / "crops")
    return {"root": root, "cache": base / "cache", "crops": base / "crops", "dataset": dataset}


@pytest.fixture(scope="module")
def model():
    """The tiny LatentDiffusion with the facial loss; zero-initialised weights randomised."""
    torch.manual_seed(0)
    config = OmegaConf.load(TINY_FINETUNE).model
    config.params.facial_loss_config = {"target": "ldm.modules.face_loss.FacialLoss", "params": {"weight": 1.0}}
    ldm = instantiate_from_config(config)
    with torch.no_grad():
        for param in ldm.model.parameters():
            if not param.any():  # zero_module convs would make the UNet ignore its prompt
                param.normal_(0.0, 0.05)
    return ldm.train()


class CallRecorder:
    """Batch sizes of the calls of a module (a forward hook)."""

    def __init__(self, module: torch.nn.Module):
        self.sizes: list[int] = []
        self._handle = module.register_forward_hook(lambda _m, args, _out: self.sizes.append(args[0].shape[0]))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------- dataset
def test_dataset_counts_faces_and_writes_crops(face_data):
    dataset = face_data["dataset"]
    assert "faces: 2 of 3 photos have a usable face" in dataset.summary()
    written = sorted(p.name for p in face_data["crops"].iterdir())
    assert written == ["biden_1_face.png", "obama_1_face.png"]
    with Image.open(face_data["crops"] / "obama_1_face.png") as crop:
        assert crop.size == (SIZE, SIZE)
    names = [p.name for p in dataset.image_paths]
    for index in range(len(dataset)):
        item = dataset[index]
        has_face = names[item["image_index"]] != "flat.png"
        assert item["has_face"] is has_face
        assert item["face"].shape == item["image"].shape == (SIZE, SIZE, 3)
        if has_face:
            assert -1.0 <= item["face"].min() and item["face"].max() <= 1.0 and item["face"].std() > 0.1
            assert not np.array_equal(item["face"], item["image"]), "the face must be a crop, not the photo"
        else:
            assert not item["face"].any(), "a photo without a face gets a placeholder of zeros"


def test_second_dataset_hits_the_cache_and_mirrors_faces(face_data, tmp_path, monkeypatch):
    def no_dlib(*_args, **_kwargs):
        raise AssertionError("dlib was loaded although every photo is in the face cache")

    monkeypatch.setattr(face, "load_detector", no_dlib)
    monkeypatch.setattr(face, "load_shape_predictor", no_dlib)
    flipped = make_dataset(face_data["root"], face_data["cache"], tmp_path / "crops", flip_p=1.0)
    assert "faces: 2 of 3 photos have a usable face" in flipped.summary()
    plain = face_data["dataset"]
    for index in range(len(plain)):
        a, b = plain[index], flipped[index]
        assert not a["flipped"] and b["flipped"] and a["has_face"] == b["has_face"]
        np.testing.assert_array_equal(b["face"], a["face"][:, ::-1], err_msg="flipped item: face not mirrored")
        np.testing.assert_array_equal(b["image"], a["image"][:, ::-1])


def test_folder_without_faces_warns_and_trains_without_the_term(model, tmp_path, caplog):
    root = write_no_face_images(tmp_path / "photos")
    with caplog.at_level(logging.WARNING):
        dataset = make_dataset(root, tmp_path / "cache", tmp_path / "crops")
    assert "No face found in any of the 2 photos: training continues without the facial loss" in caplog.text
    assert "faces: 0 of 2 photos have a usable face" in dataset.summary()
    model.latent_cache.clear()  # the cache keys by image index: drop another dataset's latents
    batch = batch_of(dataset, [0, 1])
    assert not batch["has_face"].any()
    with CallRecorder(model.model.diffusion_model) as unet:
        loss, loss_dict = model.shared_step(batch)
    assert unet.sizes == [2], "no face rows may be added to the UNet batch"
    assert torch.isfinite(loss) and "train/loss_face" not in loss_dict
    loss.backward()
    model.zero_grad(set_to_none=True)


def test_unreadable_image_is_listed_by_name(tmp_path, caplog):
    root = copy_faces(tmp_path / "photos", names=("obama_1.jpg",))
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    with caplog.at_level(logging.INFO):
        dataset = make_dataset(root, tmp_path / "cache", tmp_path / "crops")
    assert [p.name for p, _ in dataset.skipped] == ["broken.jpg"]
    assert "broken.jpg (not an image)" in caplog.text
    assert "faces: 1 of 1 photos have a usable face" in dataset.summary()


def test_too_small_face_is_skipped_with_a_reason_and_training_goes_on(model, tmp_path, caplog):
    root = copy_faces(tmp_path / "photos", names=("biden_1.jpg",))
    with Image.open(shared_fixture("faces/obama_1.jpg")) as big:
        big.resize((big.width // 8, big.height // 8)).save(root / "tiny_obama.jpg")  # face ~40 px
    with caplog.at_level(logging.WARNING):
        dataset = make_dataset(root, tmp_path / "cache", tmp_path / "crops")
    reasons = [r.getMessage() for r in caplog.records if "tiny_obama.jpg" in r.getMessage()]
    assert reasons and all("no face crop for" in r for r in reasons), caplog.text
    assert "faces: 1 of 2 photos have a usable face" in dataset.summary()
    model.latent_cache.clear()  # the cache keys by image index: drop another dataset's latents
    batch = batch_of(dataset, [0, 1])
    assert batch["has_face"].tolist() == [True, False]
    loss, loss_dict = model.shared_step(batch)
    assert torch.isfinite(loss) and torch.isfinite(loss_dict["train/loss_face"])


# ----------------------------------------------------------------------------------- loss
PROMPTS = ["a photo of a *", "a rendition of a * in the snow", "a dark photo of the *"]


def loss_inputs(model, batch):
    """Image latents, face latents, distinct prompts and timesteps, and explicit noise of a batch."""
    z, _ = model.get_input(batch, model.first_stage_key)
    captions = PROMPTS[: z.shape[0]]  # distinct rows: a face row must take its own photo's prompt
    faces = FacialLoss().face_latents(batch, model.encode_to_latents, model.device)
    t = torch.linspace(5, model.diffusion.num_timesteps - 5, z.shape[0]).long()
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((z.shape[0] + faces.latents.shape[0], *z.shape[1:]), generator=generator)
    return z, captions, faces, t, noise


def face_term(model, faces, cond, t, noise_faces):
    diffusion = model.diffusion
    return diffusion.reduce_losses(*diffusion.per_sample_losses(model.apply_model, faces.latents, cond[faces.rows],
                                                                t[faces.rows], noise_faces), "train")[0]


def main_and_face(model, z, cond, t, faces, weight, noise):
    """Image and face terms from one batched call (as the model sums them): ``(total, face term)``."""
    main = Rows(z, cond, t)
    rows = [main, FacialLoss(weight).rows(faces, cond, main, model.diffusion)]
    (main_loss, _), (face_loss, _) = batched_losses(model.diffusion, model.apply_model, rows, "train", noise)
    return main_loss + weight * face_loss, face_loss


def test_one_batched_unet_call_with_face_rows(model, face_data):
    batch = batch_of(face_data["dataset"], [0, 1, 2])  # two faces and the flat image
    with CallRecorder(model.model.diffusion_model) as unet:
        loss, loss_dict = model.shared_step(batch)
    assert unet.sizes == [3 + 2], f"expected one UNet call on B + F = 5 rows, got calls of {unet.sizes}"
    assert {"train/loss", "train/loss_simple", "train/loss_face"} <= set(loss_dict)
    assert torch.isfinite(loss) and loss_dict["train/loss_face"] > 0


def test_total_is_main_plus_weighted_face_term(model, face_data):
    batch = batch_of(face_data["dataset"], [0, 1, 2])
    z, captions, faces, t, noise = loss_inputs(model, batch)
    n = z.shape[0]
    with torch.no_grad():
        cond = model.get_learned_conditioning(captions)
        total, logged_face = main_and_face(model, z, cond, t, faces, 0.7, noise)
        main_term, _ = model.p_losses(z, cond, t, noise[:n])
        face_only = face_term(model, faces, cond, t, noise[n:])
    expected = main_term + 0.7 * face_only
    assert abs(total - expected) <= 1e-5, f"total {total:.7f} != main + 0.7 * face {expected:.7f} (tol 1e-5, fp32)"
    assert abs(logged_face - face_only) <= 1e-5, "the batched call's face term != the face term alone (1e-5)"
    assert face_only > 0 and abs(total - main_term) > 1e-3, "the face term must change the total"


def test_gradient_reaches_the_embedding_through_the_face_term_alone(model, face_data):
    batch = batch_of(face_data["dataset"], [1, 2])  # flat image, then a face: B = 2, F = 1
    assert batch["has_face"].tolist() == [False, True]
    z, captions, faces, t, noise = loss_inputs(model, batch)
    n = z.shape[0]
    params = list(model.embedding_manager.embedding_parameters())

    def grads(loss_of_cond) -> torch.Tensor:
        loss = loss_of_cond(model.get_learned_conditioning(captions))  # fresh graph through the embedding
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    def total_with(weight: float):
        return lambda cond: main_and_face(model, z, cond, t, faces, weight, noise)[0]

    g_face = grads(lambda cond: face_term(model, faces, cond, t, noise[n:]))
    g_main = grads(lambda cond: model.p_losses(z, cond, t, noise[:n])[0])
    g_total_0, g_total_1 = grads(total_with(0.0)), grads(total_with(1.0))
    assert g_face.norm() > 1e-8, "the face term alone gives the embedding no gradient"
    scale = float(g_face.norm() + g_main.norm())
    assert torch.allclose(g_total_0, g_main, atol=1e-5 * scale, rtol=0), "with weight 0 the face term still acts"
    assert torch.allclose(g_total_1 - g_total_0, g_face, atol=1e-5 * scale, rtol=0), (
        "grad(total, weight 1) - grad(total, weight 0) != grad(face term) (tol 1e-5 x grad norm)")


def test_face_latents_are_cached_by_face_index_and_flip(model, face_data):
    model.latent_cache.clear()
    dataset = face_data["dataset"]
    batch = batch_of(dataset, [0, 1, 2])
    with CallRecorder(model.first_stage_model.encoder) as encoder:
        model.shared_step(batch)
        assert encoder.sizes == [3, 2], f"first step encodes 3 images then 2 faces, got {encoder.sizes}"
        model.shared_step(batch)
        assert encoder.sizes == [3, 2], "the second step re-encoded cached images or faces"
        batch["flipped"] = torch.tensor([True, False, False])  # row 0 now shows the mirrored photo and face
        model.shared_step(batch)
    assert encoder.sizes == [3, 2, 1, 1], f"a new flip is one new image and one new face key, got {encoder.sizes}"
    assert len(model.latent_cache) == 3 + 2 + 2


def test_batch_without_face_fields_or_faces_has_no_face_term(model, face_data):
    dataset = face_data["dataset"]
    flat = [p.name for p in dataset.image_paths].index("flat.png")
    batch = batch_of(dataset, [flat])
    assert FacialLoss().face_latents(batch, model.encode_to_latents, model.device) is None
    _, loss_dict = model.shared_step(batch)
    assert "train/loss_face" not in loss_dict and "train/loss" in loss_dict
    del batch["face"], batch["has_face"]  # a dataset built without face_crops
    assert FacialLoss().face_latents(batch, model.encode_to_latents, model.device) is None


def test_negative_weight_is_rejected():
    with pytest.raises(ValueError, match="facial loss weight must be >= 0"):
        FacialLoss(weight=-1.0)


# ------------------------------------------------------------------------------------ CLI
def cli_args(data_root: Path, logdir: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "--base", str(TINY_FINETUNE), "-t", "--data_root", str(data_root), "--logdir", str(logdir),
        "--actual_resume", str(ckpt),
        "--use_facial_loss", "--face_detector", "hog", "--max_steps", "3", "--accelerator", "cpu",
        "data.params.num_workers=0", "lightning.trainer.log_every_n_steps=1", "lightning.trainer.benchmark=false",
        "lightning.callbacks.image_logger.params.batch_frequency=1000", *extra,
    ]


def read_metrics(logdir: Path) -> list[dict]:
    with open(logdir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cli_trains_with_the_face_term(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.setenv("MOMENTUM_TI_CACHE", str(tmp_path / "cache"))
    data_root = copy_faces(tmp_path / "photos")
    assert main.main(cli_args(data_root, tmp_path / "logs", tiny_ckpt)) == 0
    (logdir,) = (tmp_path / "logs").iterdir()
    rows = [r for r in read_metrics(logdir) if r.get("train/loss_face")]
    assert rows, "metrics.csv has no train/loss_face values"
    assert all(np.isfinite(float(r["train/loss_face"])) for r in rows)
    assert sorted(p.name for p in (logdir / "faces").iterdir()) == ["biden_1_face.png", "obama_1_face.png"]


def test_cli_without_any_face_continues_without_the_term(tmp_path, monkeypatch, caplog, tiny_ckpt):
    monkeypatch.setenv("MOMENTUM_TI_CACHE", str(tmp_path / "cache"))
    data_root = write_no_face_images(tmp_path / "photos")
    with caplog.at_level(logging.WARNING):
        assert main.main(cli_args(data_root, tmp_path / "logs", tiny_ckpt, "--max_steps", "2")) == 0
    assert "training continues without the facial loss" in caplog.text
    (logdir,) = (tmp_path / "logs").iterdir()
    rows = read_metrics(logdir)
    assert any(r.get("train/loss") for r in rows) and not any(r.get("train/loss_face") for r in rows)


def test_cli_missing_dlib_model_exits_2_before_training(tmp_path, monkeypatch, caplog, tiny_ckpt):
    monkeypatch.setenv("MOMENTUM_TI_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "no_models"  # a model_dir without dlib's .dat files, as if the package were missing
    empty.mkdir()
    data_root = copy_faces(tmp_path / "photos")
    overrides = [f"data.params.{split}.params.face_crops.model_dir={empty}" for split in ("train", "validation")]
    with caplog.at_level(logging.ERROR, logger="main"):
        assert main.main(cli_args(data_root, tmp_path / "logs", tiny_ckpt, *overrides)) == 2
    errors = [r.getMessage() for r in caplog.records if r.name == "main" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "face-recognition-models" in errors[0] and "shape_predictor_68_face_landmarks.dat" in errors[0]
    assert not list(tmp_path.glob("logs/*/csv/metrics.csv")), "training started despite the missing model"
