"""Tests for the personalization dataset: odd real-world image files, prompts, flips, caching API."""
from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.images import DataRootError, ImageReadError, load_rgb, scan_image_folder, to_rgb
from ldm.data.personalized import PersonalizedBase
from ldm.data.prompts import DESCRIPTIVE_WORDS, IMAGENET_TEMPLATES_SMALL, PER_IMAGE_TOKENS

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ------------------------------------------------------------------------------ image factories
def halves(size: tuple[int, int] = (40, 20), left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right``."""
    w, h = size
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, w // 2, h))
    return img


def write_exif_rotated(path: Path) -> None:
    """40x20 stored image (red left, blue right) with EXIF orientation 6 (display rotated 90° CW)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    halves().save(path, format="JPEG", quality=95, exif=exif.tobytes())


def write_rgba(path: Path) -> None:
    """Left half fully transparent, right half opaque red."""
    img = Image.new("RGBA", (32, 32), RED + (255,))
    img.paste((0, 0, 0, 0), (0, 0, 16, 32))
    img.save(path)


def write_palette(path: Path, fmt: str) -> None:
    """Palette image: index 0 transparent (left half), index 1 blue (right half)."""
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, *BLUE] + [0] * (256 - 2) * 3)
    img.paste(0, (0, 0, 16, 32))
    img.save(path, format=fmt, transparency=0)


def write_noise_jpeg(path: Path, size: int = 64) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """A folder with one file of every odd kind, good and bad."""
    root = tmp_path / "photos"
    root.mkdir()
    write_exif_rotated(root / "a_exif.jpg")
    write_rgba(root / "b_rgba.png")
    write_palette(root / "c_palette.gif", "GIF")
    write_palette(root / "c_palette.png", "PNG")
    Image.new("L", (24, 24), 100).save(root / "d_gray.png")
    Image.new("LA", (24, 24), (100, 0)).save(root / "d_gray_alpha.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "e_cmyk.jpg")
    Image.new("I;16", (24, 24), 65535 // 2).save(root / "f_16bit.png")
    write_noise_jpeg(root / "g_noise.jpg")
    # bad entries
    halves().save(root / ".hidden.jpg")
    (root / "notes.txt").write_text("not a photo")
    data = write_noise_jpeg(root / "truncated.jpg", size=128)
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    return root


GOOD = ["a_exif.jpg", "b_rgba.png", "c_palette.gif", "c_palette.png", "d_gray.png", "d_gray_alpha.png",
        "e_cmyk.jpg", "f_16bit.png", "g_noise.jpg"]
BAD = {".hidden.jpg": "hidden file", "notes.txt": "not an image", "truncated.jpg": "truncated",
       "empty.png": "empty file"}


# ------------------------------------------------------------------------------ load_rgb / scan
def test_exif_orientation_is_applied(odd_folder: Path) -> None:
    img = load_rgb(odd_folder / "a_exif.jpg")
    assert img.mode == "RGB" and img.size == (20, 40), "orientation 6 must turn 40x20 into 20x40"
    arr = np.asarray(img).astype(int)
    # stored left (red) half ends up on top after a 90° clockwise rotation
    assert np.abs(arr[5, 10] - RED).max() < 40 and np.abs(arr[35, 10] - BLUE).max() < 40


def test_alpha_and_palette_composite_on_white(odd_folder: Path) -> None:
    rgba = np.asarray(load_rgb(odd_folder / "b_rgba.png"))
    assert tuple(rgba[16, 4]) == WHITE and tuple(rgba[16, 28]) == RED
    for name in ("c_palette.gif", "c_palette.png"):
        arr = np.asarray(load_rgb(odd_folder / name))
        assert arr.shape == (32, 32, 3)
        assert tuple(arr[16, 4]) == WHITE and tuple(arr[16, 28]) == BLUE, name
    gray_alpha = np.asarray(load_rgb(odd_folder / "d_gray_alpha.png"))
    assert tuple(gray_alpha[0, 0]) == WHITE, "fully transparent LA pixels become white"


def test_gray_cmyk_and_16bit_become_8bit_rgb(odd_folder: Path) -> None:
    gray = np.asarray(load_rgb(odd_folder / "d_gray.png"))
    assert gray.dtype == np.uint8 and gray.shape == (24, 24, 3) and (gray == 100).all()
    cmyk = np.asarray(load_rgb(odd_folder / "e_cmyk.jpg")).astype(int)
    assert np.abs(cmyk[12, 12] - RED).max() < 10
    sixteen = np.asarray(load_rgb(odd_folder / "f_16bit.png"))
    assert sixteen.dtype == np.uint8 and sixteen.shape == (24, 24, 3)
    assert 126 <= int(sixteen[0, 0, 0]) <= 128, "16-bit 32767 must scale to ~127, not clip to 255"


def test_float_and_int32_modes() -> None:
    assert np.asarray(to_rgb(Image.new("F", (4, 4), 0.5)))[0, 0, 0] == 128  # 0..1 float
    assert np.asarray(to_rgb(Image.new("F", (4, 4), 200.0)))[0, 0, 0] == 200  # 0..255 float
    assert np.asarray(to_rgb(Image.new("I", (4, 4), 65535)))[0, 0, 0] == 255  # 16-bit data in I


def test_load_rgb_reasons(odd_folder: Path) -> None:
    with pytest.raises(ImageReadError, match="not an image"):
        load_rgb(odd_folder / "notes.txt")
    with pytest.raises(ImageReadError, match="truncated"):
        load_rgb(odd_folder / "truncated.jpg")


def test_scan_lists_good_and_bad(odd_folder: Path) -> None:
    result = scan_image_folder(odd_folder)
    assert [p.name for p in result.images] == GOOD
    assert {p.name: reason for p, reason in result.skipped} == BAD
    described = result.describe_skipped()
    for name, reason in BAD.items():
        assert f"{name} ({reason})" in described


# ------------------------------------------------------------------------------ dataset on odd files
def test_dataset_on_odd_folder_reports_skipped(odd_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ldm.data.personalized"):
        ds = PersonalizedBase(odd_folder, size=64, repeats=3, seed=0)
    assert ds.num_images == len(GOOD) and len(ds) == 3 * len(GOOD)
    assert [p.name for p in ds.image_paths] == GOOD
    summaries = [r.getMessage() for r in caplog.records if r.name == "ldm.data.personalized"]
    assert len(summaries) == 1, "exactly one summary record"
    for name in BAD:
        assert name in summaries[0]
    assert "a photo of a *" in summaries[0] and "9 images" in summaries[0]
    for k in range(len(ds)):
        item = ds[k]
        assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.float32
        assert item["image_index"] == k % ds.num_images
    # the EXIF image (index 0) is upright: red on top, blue at the bottom, whatever the flip
    top, bottom = ds[0]["image"][8, 32], ds[0]["image"][56, 32]
    assert top[0] > 0.7 and top[2] < -0.7 and bottom[2] > 0.7 and bottom[0] < -0.7


def test_missing_or_non_directory_root(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="does not exist"):
        PersonalizedBase(tmp_path / "nope", size=64)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataRootError, match="not a directory"):
        PersonalizedBase(tmp_path / "file.jpg", size=64)


def test_all_bad_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    data = write_noise_jpeg(tmp_path / "b.jpg", size=128)
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataRootError) as info:
        PersonalizedBase(tmp_path, size=64)
    message = str(info.value)
    assert "\n" not in message and "found 2 files" in message
    assert "a.txt (not an image)" in message and "b.jpg (truncated)" in message
    assert "5-20 photos" in message
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------ images, flips, cache
@pytest.fixture
def two_images(tmp_path: Path) -> Path:
    halves((80, 60)).save(tmp_path / "one.png")
    halves((50, 50), left=(0, 255, 0), right=(255, 255, 0)).save(tmp_path / "two.png")
    return tmp_path


def test_image_shape_range_and_flip(two_images: Path) -> None:
    plain = PersonalizedBase(two_images, size=64, flip_p=0.0, repeats=2)
    flipped = PersonalizedBase(two_images, size=64, flip_p=1.0, repeats=2)
    assert len(plain) == 4 and len(PersonalizedBase(two_images, size=64, set="val")) == 2
    for k in range(4):
        a, b = plain[k], flipped[k]
        assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.float32
        assert a["image"].min() >= -1.0 and a["image"].max() <= 1.0
        assert a["flipped"] is False and b["flipped"] is True
        np.testing.assert_array_equal(b["image"], np.fliplr(a["image"]))
    assert plain[0]["image"][32, 5, 0] == 1.0 and plain[0]["image"][32, 60, 2] == 1.0  # red left, blue right


def test_flip_half_the_time(two_images: Path) -> None:
    ds = PersonalizedBase(two_images, size=32, flip_p=0.5, seed=3)
    flips = [ds[k % len(ds)]["flipped"] for k in range(400)]
    assert 120 < sum(flips) < 280


def test_center_crop_and_interpolation(two_images: Path) -> None:
    # 80x60 centre-cropped to 60x60 keeps 30 red + 30 blue columns: the split stays in the middle
    ds = PersonalizedBase(two_images, size=60, flip_p=0.0, center_crop=True, interpolation="lanczos")
    row = ds[0]["image"][30]
    assert row[29, 0] == 1.0 and row[30, 2] == 1.0
    with pytest.raises(ValueError, match="interpolation"):
        PersonalizedBase(two_images, size=64, interpolation="cubic")


def test_base_images_match_items(two_images: Path) -> None:
    ds = PersonalizedBase(two_images, size=64, flip_p=0.5, seed=1)
    base = ds.base_images()
    assert base.images.shape == (2, 3, 64, 64) and base.images.dtype == torch.float32
    assert base.images.min() >= -1 and base.images.max() <= 1
    torch.testing.assert_close(base.flipped, torch.flip(base.images, dims=[-1]), rtol=0, atol=0)
    for k in range(8):
        item = ds[k]
        cached = (base.flipped if item["flipped"] else base.images)[item["image_index"]]
        torch.testing.assert_close(torch.from_numpy(item["image"]).permute(2, 0, 1), cached, rtol=0, atol=0)


def test_base_images_needs_one_size(two_images: Path) -> None:
    with pytest.raises(ValueError, match="different sizes"):
        PersonalizedBase(two_images, size=None).base_images()


# ------------------------------------------------------------------------------ prompts
def captions(ds: PersonalizedBase, n: int) -> list[str]:
    return [ds[k % len(ds)]["caption"] for k in range(n)]


def test_default_and_class_word_captions(two_images: Path) -> None:
    assert set(captions(PersonalizedBase(two_images, size=32, seed=0), 20)) == {"a photo of a *"}
    ds = PersonalizedBase(two_images, size=32, class_word="woman", descriptive_p=0.0, seed=0)
    assert set(captions(ds, 20)) == {"a photo of a * woman"}
    coarse = PersonalizedBase(two_images, size=32, coarse_class_text="person", placeholder_token="sks")
    assert coarse[0]["caption"] == "a photo of a person sks"


def test_descriptive_words(two_images: Path) -> None:
    every = PersonalizedBase(two_images, size=32, class_word="woman", descriptive_p=1.0, seed=0)
    assert every[0]["caption"] == "a photo of a * woman, " + ", ".join(DESCRIPTIVE_WORDS)
    assert len(DESCRIPTIVE_WORDS) >= 20

    some = PersonalizedBase(two_images, size=32, descriptive_p=0.1, seed=1234)
    base = "a photo of a *"
    n, appended = 1000, 0
    for caption in captions(some, n):
        assert caption.startswith(base)
        words = [w for w in caption[len(base):].split(", ") if w.strip()]
        assert all(w in DESCRIPTIVE_WORDS for w in words)
        appended += len(words)
    rate = appended / (n * len(DESCRIPTIVE_WORDS))
    assert 0.07 < rate < 0.13, f"expected ~10% of words appended, got {rate:.3f}"


def test_descriptive_words_keep_the_placeholder_a_token_of_its_own(two_images: Path, tiny_model) -> None:
    ds = PersonalizedBase(two_images, size=32, descriptive_p=1.0, seed=0)
    tokens = tiny_model.cond_stage_model.tokenize([ds[0]["caption"]])  # [1, 77]
    assert torch.isin(tokens, torch.tensor(tiny_model.embedding_manager.token_ids)).any(), ds[0]["caption"]


def test_random_templates(two_images: Path) -> None:
    ds = PersonalizedBase(two_images, size=32, use_random_prompt=True, class_word="man", seed=5)
    drawn = captions(ds, 200)
    assert len(set(drawn)) >= 10
    templates = {t.format("* man") for t in IMAGENET_TEMPLATES_SMALL}
    assert set(drawn) <= templates and all("* man" in c for c in drawn)
    assert len(IMAGENET_TEMPLATES_SMALL) == 27


def test_per_image_tokens(two_images: Path) -> None:
    ds = PersonalizedBase(two_images, size=32, per_image_tokens=True, mixing_prob=1.0, seed=0)
    assert ds[0]["caption"] == f"a photo of a * with {PER_IMAGE_TOKENS[0]}"
    assert ds[1]["caption"] == f"a photo of a * with {PER_IMAGE_TOKENS[1]}"
    never = PersonalizedBase(two_images, size=32, per_image_tokens=True, mixing_prob=0.0, seed=0)
    assert set(captions(never, 10)) == {"a photo of a *"}
    assert len(PER_IMAGE_TOKENS) >= 20 and len(set(PER_IMAGE_TOKENS)) == len(PER_IMAGE_TOKENS)


def test_same_seed_same_samples(two_images: Path) -> None:
    kwargs = dict(size=32, use_random_prompt=True, descriptive_p=0.3, flip_p=0.5)
    first = PersonalizedBase(two_images, seed=7, **kwargs)
    second = PersonalizedBase(two_images, seed=7, **kwargs)
    other = PersonalizedBase(two_images, seed=8, **kwargs)

    def run(ds: PersonalizedBase) -> list[tuple[str, bool]]:
        items = [ds[k] for k in range(50)]
        return [(item["caption"], item["flipped"]) for item in items]

    assert run(first) == run(second)
    assert run(first) != run(other)


def test_dataset_does_not_touch_global_random(two_images: Path) -> None:
    random.seed(42)
    expected = random.random()
    random.seed(42)
    ds = PersonalizedBase(two_images, size=32, use_random_prompt=True, descriptive_p=0.5, seed=0)
    captions(ds, 20)
    assert random.random() == expected


def test_dataloader_workers_draw_different_captions(two_images: Path) -> None:
    ds = PersonalizedBase(two_images, size=16, repeats=40, use_random_prompt=True, seed=0)
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=10, num_workers=2)
    batches = [batch["caption"] for batch in loader]
    # batches 0 and 1 come from different workers; identical RNG copies would repeat captions
    assert batches[0] != batches[1]
    assert batches[0][0] in {t.format("*") for t in IMAGENET_TEMPLATES_SMALL}


def test_bad_arguments(two_images: Path) -> None:
    with pytest.raises(ValueError, match="descriptive_p"):
        PersonalizedBase(two_images, size=32, descriptive_p=1.5)
    with pytest.raises(ValueError, match="size"):
        PersonalizedBase(two_images, size=0)
    with pytest.raises(IndexError):
        PersonalizedBase(two_images, size=32, repeats=1)[2]
