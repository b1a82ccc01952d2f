"""Face pipeline: detection on real photos, FFHQ alignment maths, the content-hash cache, descriptors."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import shared_fixture
from PIL import Image

pytest.importorskip("dlib", reason="dlib is not installed: pip install dlib-bin")
from ldm.data import face  # noqa: E402
from ldm.data.images import load_rgb  # noqa: E402

SINGLE = ["obama_1", "obama_2", "obama_3", "biden_1", "biden_2", "harington_1", "harington_2", "leslie_1", "leslie_2"]
needs_faces = pytest.mark.usefixtures("shared_fixtures")


def photo(name: str) -> Path:
    return shared_fixture("faces/" + (name if "." in name else f"{name}.jpg"))


def astronaut() -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    return Image.fromarray(skimage_data.astronaut())  # 512 x 512 RGB, one face


def no_face_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    flat = np.full((480, 640, 3), (90, 140, 200), dtype=np.uint8)
    yy, xx = np.mgrid[0:480, 0:640]
    sky_to_ground = np.stack([xx / 640 * 120 + 60, 200 - yy / 480 * 120, 80 + yy / 480 * 60], axis=-1)
    landscape = np.clip(sky_to_ground + rng.normal(0, 20, sky_to_ground.shape), 0, 255).astype(np.uint8)
    return {"flat": Image.fromarray(flat), "gradient_noise": Image.fromarray(landscape)}


@pytest.fixture(scope="module")
def hog() -> face.FaceCropper:
    return face.FaceCropper(256, detector="hog")


@pytest.fixture(scope="module")
def hog_crops(hog) -> dict[str, face.FaceCrop | None]:
    names = SINGLE + ["two_people_obama_biden", "obama_2_rgba.png"]
    return {name: hog.crop_file(photo(name)) for name in names}


def box_center(box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


@needs_faces
@pytest.mark.parametrize("name", SINGLE)
def test_box_lands_on_the_face(hog_crops, name):
    crop = hog_crops[name]
    assert crop is not None, f"no face found in {name}"
    assert crop.num_faces == 1
    assert crop.landmarks.shape == (68, 2) and crop.quad.shape == (4, 2)
    lo, hi = crop.landmarks.min(axis=0), crop.landmarks.max(axis=0)
    assert np.all(box_center(crop.box) > lo) and np.all(box_center(crop.box) < hi), (crop.box, lo, hi)
    assert crop.image.mode == "RGB" and crop.image.size == (256, 256)


@needs_faces
def test_aligned_crop_is_upright_and_centred():
    """Re-detect landmarks inside the crop: eyes level, not mirrored, face in the middle."""
    cropper = face.FaceCropper(256, detector="hog")
    original = load_rgb(photo("obama_1"))
    tilted = original.rotate(20, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    for image in (original, tilted):
        crop = cropper.crop(image)
        again = cropper.face_detector.detect(crop.image)
        assert not isinstance(again, str), again
        eye_left, eye_right = again.landmarks[36:42].mean(0), again.landmarks[42:48].mean(0)
        mouth = again.landmarks[48:68].mean(0)
        dx, dy = eye_right - eye_left
        assert dx > 0, "crop is mirrored"
        assert abs(np.degrees(np.arctan2(dy, dx))) < 5, "eyes are not level in the aligned crop"
        assert mouth[1] > eye_left[1] + 20, "crop is upside down"
        assert 0.4 * 256 < (eye_left[0] + eye_right[0]) / 2 < 0.6 * 256


@needs_faces
def test_two_people_takes_the_largest(hog_crops, hog):
    crop = hog_crops["two_people_obama_biden"]
    assert crop is not None and crop.num_faces == 2
    boxes = hog.face_detector.boxes(load_rgb(photo("two_people_obama_biden")))
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    assert len(boxes) == 2 and crop.box == boxes[int(np.argmax(areas))]


@needs_faces
def test_largest_of_two_faces_is_cropped(hog):
    """A big Obama beside a small Biden on one canvas: the crop must be Obama's, whichever side."""
    big = load_rgb(photo("obama_1")).resize((546, 682))  # face ~150 px
    small = load_rgb(photo("biden_2")).resize((260, 260))  # face ~100 px
    for big_left in (True, False):
        canvas = Image.new("RGB", (900, 700), (200, 200, 200))
        canvas.paste(big, (0, 0) if big_left else (354, 0))
        canvas.paste(small, (620, 200) if big_left else (0, 200))
        crop = hog.crop(canvas)
        assert crop is not None and crop.num_faces == 2
        centre_x = box_center(crop.box)[0]
        assert (centre_x < 546) if big_left else (centre_x > 354), (big_left, crop.box)


@needs_faces
def test_rgba_png_matches_jpeg(hog_crops):
    rgba, jpeg = hog_crops["obama_2_rgba.png"], hog_crops["obama_2"]
    assert rgba is not None and rgba.image.size == (256, 256)
    assert np.abs(np.array(rgba.box) - np.array(jpeg.box)).max() <= 4


@needs_faces
def test_partial_face_gives_crop_or_reason(hog, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.data.face"):
        crop = hog.crop_file(photo("obama_partial_face"))
    if crop is None:
        assert "obama_partial_face.jpg" in caplog.text
    else:  # the face touches the photo's left edge: the quad leaves the photo (reflect-padded)
        assert crop.image.size == (256, 256) and crop.quad[:, 0].min() < 0


@pytest.mark.parametrize("kind", ["flat", "gradient_noise"])
def test_no_face_returns_none_with_reason(hog, kind, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.data.face"):
        assert hog.crop(no_face_images()[kind]) is None
    assert "no face found" in caplog.text


def test_cnn_detector_on_astronaut_and_no_face(caplog):
    cnn = face.FaceCropper(128, detector="cnn")
    crop = cnn.crop(astronaut())
    assert crop is not None and crop.image.size == (128, 128) and crop.num_faces == 1
    cx, cy = box_center(crop.box)
    assert 180 < cx < 260 and 80 < cy < 160, f"astronaut face box {crop.box} is off the face"
    assert cnn.crop(no_face_images()["gradient_noise"]) is None


def test_hog_detector_on_astronaut(hog):
    crop = hog.crop(astronaut())
    assert crop is not None and crop.num_faces == 1
    cx, cy = box_center(crop.box)
    assert 180 < cx < 260 and 80 < cy < 160, f"astronaut face box {crop.box} is off the face"


@needs_faces
def test_cnn_downscales_big_photo():
    """obama_3 is 1434x2333: detection runs on an 800 px copy, the box comes back in full resolution."""
    crop = face.FaceCropper(128, detector="cnn").crop_file(photo("obama_3"))
    assert crop is not None and crop.box[2] > 800, crop.box  # right edge beyond the 800 px copy
    lo, hi = crop.landmarks.min(axis=0), crop.landmarks.max(axis=0)
    assert np.all(box_center(crop.box) > lo) and np.all(box_center(crop.box) < hi)


def test_min_face_size_skips_small_faces(caplog):
    cropper = face.FaceCropper(64, detector="hog", min_face_size=120)  # the astronaut's face is ~90 px
    with caplog.at_level(logging.WARNING, logger="ldm.data.face"):
        assert cropper.crop(astronaut()) is None
    assert "below min_face_size=120" in caplog.text


def test_ffhq_quad_on_upright_face():
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48] = (40, 50), (60, 50)  # eye centres
    lm[48], lm[54] = (42, 70), (58, 70)  # mouth corners
    expected = np.array([[10, 12], [10, 92], [90, 92], [90, 12]])  # centre (50, 52), half side 40
    np.testing.assert_allclose(face.ffhq_quad(lm), expected, atol=1e-9)
    np.testing.assert_allclose(face.ffhq_quad(lm, scale=1.5) - [50, 52], (expected - [50, 52]) * 1.5, atol=1e-9)


def test_ffhq_quad_rotates_with_the_face():
    rng = np.random.default_rng(1)
    lm = rng.uniform(30, 70, size=(68, 2))
    lm[36:42], lm[42:48], lm[48], lm[54] = (40, 50), (60, 50), (42, 70), (58, 70)
    angle = np.radians(30)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    np.testing.assert_allclose(face.ffhq_quad(lm @ rot.T), face.ffhq_quad(lm) @ rot.T, atol=1e-9)


def test_align_crop_pixel_convention_and_reflection():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(50, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    inside = np.array([[9.5, 9.5], [9.5, 39.5], [39.5, 39.5], [39.5, 9.5]])  # pixels 10..39 exactly
    out = np.asarray(face.align_crop(image, inside, 30)).astype(int)
    assert np.abs(out - pixels[10:40, 10:40]).max() <= 1
    outside = inside - 20  # starts 10 px above/left of the photo: reflected there
    out = np.asarray(face.align_crop(image, outside, 30)).astype(int)
    assert np.abs(out[10:, 10:] - pixels[:20, :20]).max() <= 1
    assert np.abs(out[9, 10:] - pixels[1, :20]).max() <= 1 and np.abs(out[10:, 0] - pixels[:20, 10]).max() <= 1


@needs_faces
def test_shrink_path_matches_large_crop(hog):
    """A 64 px crop of a big face pre-shrinks the photo; it must show the same as the 256 px crop."""
    small = face.FaceCropper(64, detector="hog").crop_file(photo("obama_3"))
    large = hog.crop_file(photo("obama_3"))
    reference = np.asarray(large.image.resize((64, 64), Image.Resampling.LANCZOS)).astype(float)
    assert np.abs(np.asarray(small.image).astype(float) - reference).mean() < 8


@needs_faces
def test_cache_hit_never_touches_dlib(tmp_path, monkeypatch):
    blank = tmp_path / "blank.png"
    no_face_images()["flat"].save(blank)
    paths = [photo("obama_1"), photo("harington_2"), blank]
    first = face.FaceCropper(96, detector="hog", cache_dir=tmp_path / "cache").prepare(paths)
    assert [c is None for c in first] == [False, False, True]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3 and len(list((tmp_path / "cache").glob("*.png"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def refuse(*args, **kwargs):
        raise AssertionError("dlib was called on a cache hit")

    monkeypatch.setattr(face, "_import_dlib", refuse)
    monkeypatch.setattr(face, "load_detector", refuse)
    second = face.FaceCropper(96, detector="hog", cache_dir=tmp_path / "cache").prepare(paths)
    assert second[2] is None
    for a, b in zip(first[:2], second[:2]):
        assert a.box == b.box and a.num_faces == b.num_faces
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
        np.testing.assert_allclose(a.quad, b.quad)
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    with pytest.raises(AssertionError, match="cache hit"):  # another size is another cache key
        face.FaceCropper(64, detector="hog", cache_dir=tmp_path / "cache").crop_file(paths[0])

    written = face.write_crops(dict(zip(paths, second)), tmp_path / "log" / "faces")
    assert [p.name for p in written] == ["obama_1_face.png", "harington_2_face.png"]
    assert Image.open(written[0]).size == (96, 96)


def test_unreadable_image_is_skipped_with_its_name(tmp_path, caplog):
    garbage = tmp_path / "not_a_photo.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    missing = tmp_path / "missing.jpg"
    cropper = face.FaceCropper(64, detector="hog", cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="ldm.data.face"):
        assert cropper.crop_file(garbage) is None
        assert cropper.crop_file(missing) is None
    assert "not_a_photo.jpg" in caplog.text and "missing.jpg" in caplog.text


@needs_faces
def test_truncated_jpeg_is_skipped(tmp_path, caplog):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photo("obama_1").read_bytes()[:20000])
    with caplog.at_level(logging.WARNING, logger="ldm.data.face"):
        assert face.FaceCropper(64, detector="hog").crop_file(truncated) is None
    assert "cut.jpg" in caplog.text


def test_missing_model_file_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install face-recognition-models"):
        face.FaceCropper(64, detector="cnn", model_dir=tmp_path).crop(astronaut())


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="detector must be"):
        face.FaceCropper(64, detector="mtcnn")
    with pytest.raises(ValueError, match="crop size"):
        face.FaceCropper(0)


@pytest.fixture(scope="module")
def descriptors() -> dict[str, np.ndarray]:
    encoder = face.FaceEncoder(detector="hog")
    return {name: encoder.descriptor(load_rgb(photo(name))) for name in ["obama_1", "obama_2", "biden_1", "leslie_1"]}


@needs_faces
def test_descriptor_same_person_close(descriptors):
    assert descriptors["obama_1"].shape == (128,)
    assert face.face_distance(descriptors["obama_1"], descriptors["obama_2"]) < 0.6


@needs_faces
@pytest.mark.parametrize("other", ["biden_1", "leslie_1"])
def test_descriptor_different_people_far(descriptors, other):
    assert face.face_distance(descriptors["obama_1"], descriptors[other]) > 0.6


def test_descriptor_without_face_is_none():
    assert face.FaceEncoder(detector="hog").descriptor(no_face_images()["flat"]) is None
