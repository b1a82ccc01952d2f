"""Face pipeline for the facial loss and identity evaluation: detect, align, crop, cache.

dlib finds the face (CNN/MMOD detector by default, HOG on request) on a copy of the photo shrunk
so its longer side is at most ``max_detect_side``; the box is mapped back to full resolution, where
the 68-point shape predictor places the landmarks. The crop is aligned the way FFHQ was built
(Karras et al. 2019, "A Style-Based Generator Architecture for GANs", appendix A): an oriented
square from the eye centres and mouth corners, warped with PIL's QUAD transform. Where the square
leaves the photo, the photo is extended by reflection (``numpy.pad(mode="reflect")``), so the crop
never holds flat black bars that the diffusion model would learn.

dlib and its model files (package ``face-recognition-models``) are imported and loaded lazily, on
the first photo that is not in the on-disk cache: a second run over the same photos never touches
dlib. The cache is keyed by the sha256 of the file bytes and every setting that changes the result.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from ldm.data.images import ImageReadError, load_rgb, to_rgb
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

ALIGN_VERSION = 1  # bump when the detection/alignment maths changes: invalidates the caches
DETECTOR_FILES = {"cnn": "mmod_human_face_detector.dat"}
SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
_MODELS_HINT = "pip install face-recognition-models (or pass model_dir= a folder holding dlib's .dat files)"
_READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


@dataclass
class FaceCrop:
    """An aligned face crop and where it came from (all coordinates in the original photo)."""

    image: Image.Image  # RGB, size x size
    box: tuple[int, int, int, int]  # detector box (left, top, right, bottom)
    landmarks: np.ndarray  # [68, 2] dlib 68-point landmarks (x, y)
    quad: np.ndarray  # [4, 2] aligned square: top-left, bottom-left, bottom-right, top-right
    num_faces: int  # faces the detector found; the largest is the one cropped


@dataclass
class Detection:
    box: tuple[int, int, int, int]
    landmarks: np.ndarray  # [68, 2]
    shape: Any  # dlib.full_object_detection, for the recognition model
    num_faces: int


def _import_dlib():
    try:
        import dlib
    except ImportError as err:
        raise ImportError("the face pipeline needs dlib: pip install dlib-bin") from err
    return dlib


def model_path(filename: str, model_dir: str | Path | None = None) -> Path:
    """Path of one of dlib's pretrained model files, from ``model_dir`` or face-recognition-models."""
    if model_dir is None:
        # find_spec locates the package without importing it (its __init__ needs pkg_resources)
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"dlib's face model '{filename}' is missing: {_MODELS_HINT}")
        model_dir = Path(list(spec.submodule_search_locations)[0]) / "models"
    path = Path(model_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"dlib's face model file {path} does not exist: {_MODELS_HINT}")
    return path


def load_detector(detector: str, model_dir: str | Path | None = None):
    """dlib face detector: ``"cnn"`` (MMOD, needs its model file) or ``"hog"`` (built in)."""
    dlib = _import_dlib()
    if detector == "hog":
        return dlib.get_frontal_face_detector()
    return dlib.cnn_face_detection_model_v1(str(model_path(DETECTOR_FILES["cnn"], model_dir)))


def load_shape_predictor(model_dir: str | Path | None = None):
    """dlib's 68-point landmark predictor."""
    return _import_dlib().shape_predictor(str(model_path(SHAPE_PREDICTOR_FILE, model_dir)))


def _as_uint8(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.uint8))  # [H, W, 3]


class FaceDetector:
    """Largest face of a photo with its 68 landmarks; dlib models load on first use."""

    def __init__(
        self,
        detector: str = "cnn",
        max_detect_side: int = 800,
        upsample_num_times: int = 0,
        min_face_size: int = 40,
        model_dir: str | Path | None = None,
    ) -> None:
        if detector not in ("cnn", "hog"):
            raise ValueError(f"detector must be 'cnn' or 'hog', got {detector!r}")
        if max_detect_side < 64:
            raise ValueError(f"max_detect_side must be at least 64 pixels, got {max_detect_side}")
        self.detector = detector
        self.max_detect_side = max_detect_side
        self.upsample_num_times = upsample_num_times
        self.min_face_size = min_face_size
        self.model_dir = model_dir
        self._detect_fn = None
        self._predictor = None

    def _load(self) -> None:
        if self._detect_fn is None:
            self._detect_fn = load_detector(self.detector, self.model_dir)
            self._predictor = load_shape_predictor(self.model_dir)

    def boxes(self, image: Image.Image) -> list[tuple[int, int, int, int]]:
        """Every face box (left, top, right, bottom) in ``image`` coordinates, largest first."""
        self._load()
        scale = min(1.0, self.max_detect_side / max(image.size))
        small = image
        if scale < 1.0:
            small_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            small = image.resize(small_size, Image.Resampling.LANCZOS)
        found = self._detect_fn(_as_uint8(small), self.upsample_num_times)
        rects = [r.rect if hasattr(r, "rect") else r for r in found]  # CNN gives mmod_rectangles
        boxes = [tuple(int(round(v / scale)) for v in (r.left(), r.top(), r.right(), r.bottom())) for r in rects]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)

    def detect(self, image: Image.Image) -> Detection | str:
        """The largest face with its landmarks, or a string saying why there is none."""
        boxes = self.boxes(image)
        if not boxes:
            return f"no face found by the {self.detector} detector"
        box = boxes[0]
        side = min(box[2] - box[0], box[3] - box[1])
        if side < self.min_face_size:
            return f"largest face is {side} px, below min_face_size={self.min_face_size}"
        shape = self._predictor(_as_uint8(image), _import_dlib().rectangle(*box))
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)  # [68, 2]
        return Detection(box=box, landmarks=landmarks, shape=shape, num_faces=len(boxes))


def ffhq_quad(landmarks: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """FFHQ's oriented square from 68 landmarks: [4, 2] corners TL, BL, BR, TR (pixel-index coords)."""
    eye_left = landmarks[36:42].mean(axis=0)
    eye_right = landmarks[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_avg = (landmarks[48] + landmarks[54]) / 2  # mouth corners
    eye_to_mouth = mouth_avg - eye_avg

    def rot90(v: np.ndarray) -> np.ndarray:  # (a, b) -> (-b, a)
        return np.array([-v[1], v[0]])

    x = eye_to_eye - rot90(eye_to_mouth)
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) * scale
    y = rot90(x)
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def align_crop(image: Image.Image, quad: np.ndarray, size: int) -> Image.Image:
    """Warp the ``quad`` of ``image`` to a ``size`` square, reflect-padding outside the photo."""
    quad = quad + 0.5  # pixel-index coords -> PIL's continuous coords (pixel centres at .5)
    qsize = np.hypot(*(quad[3] - quad[0]))
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:  # the QUAD transform does not antialias: pre-shrink large faces (box filter)
        image = image.reduce(shrink)
        quad = quad / shrink
        qsize = qsize / shrink
    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top = np.floor(quad.min(axis=0)).astype(int) - border
    right, bottom = np.ceil(quad.max(axis=0)).astype(int) + border
    region = image.crop((max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height)))
    pads = (max(-left, 0), max(-top, 0), max(right - image.width, 0), max(bottom - image.height, 0))
    if any(pads):
        pad_l, pad_t, pad_r, pad_b = pads
        array = np.pad(np.asarray(region), ((pad_t, pad_b), (pad_l, pad_r), (0, 0)), mode="reflect")
        region = Image.fromarray(array)
    quad = quad - np.array([left, top])  # into the padded region's frame
    data = tuple(float(v) for v in quad.flatten())
    return region.transform((size, size), Image.Transform.QUAD, data, Image.Resampling.BICUBIC)


def default_cache_dir() -> Path:
    """Where face crops are cached: ``$MOMENTUM_TI_CACHE`` or ``$XDG_CACHE_HOME/momentum-ti``, ``/faces``."""
    root = os.environ.get("MOMENTUM_TI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "momentum-ti"
    return Path(root) / "faces"


class FaceCropper:
    """Aligned square face crops of photos, cached on disk by content hash."""

    def __init__(
        self,
        size: int,
        detector: str = "cnn",
        max_detect_side: int = 800,
        cache_dir: str | Path | None = None,
        scale: float = 1.0,
        upsample_num_times: int = 0,
        min_face_size: int = 40,
        model_dir: str | Path | None = None,
    ) -> None:
        if size < 8:
            raise ValueError(f"crop size must be at least 8 pixels, got {size}")
        if scale <= 0:
            raise ValueError(f"scale must be positive (1.0 = FFHQ framing), got {scale}")
        self.size = size
        self.scale = scale
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.face_detector = FaceDetector(detector, max_detect_side, upsample_num_times, min_face_size, model_dir)

    def settings(self) -> dict[str, Any]:
        """Everything that changes a crop: part of the cache key."""
        d = self.face_detector
        return {
            "align_version": ALIGN_VERSION, "size": self.size, "scale": self.scale, "detector": d.detector,
            "max_detect_side": d.max_detect_side, "upsample": d.upsample_num_times, "min_face": d.min_face_size,
        }

    def crop(self, image: Image.Image) -> FaceCrop | None:
        """Aligned crop of the largest face, or None (reason logged)."""
        result = self._crop(image)
        if isinstance(result, str):
            logger.warning("no face crop: %s", result)
            return None
        return result

    def _crop(self, image: Image.Image) -> FaceCrop | str:
        image = to_rgb(image)
        found = self.face_detector.detect(image)
        if isinstance(found, str):
            return found
        quad = ffhq_quad(found.landmarks, self.scale)
        crop = align_crop(image, quad, self.size)
        return FaceCrop(crop, found.box, found.landmarks, quad, found.num_faces)

    def cache_key(self, data: bytes) -> str:
        settings = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(data + b"\0" + settings).hexdigest()

    def crop_file(self, path: str | Path) -> FaceCrop | None:
        """Like :meth:`crop` for a photo file, through the cache when ``cache_dir`` is set."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            logger.warning("no face crop for %s: cannot read the file (%s)", path, err)
            return None
        key = self.cache_key(data)
        if self.cache_dir is not None:
            cached = self._read_cache(key)
            if cached is not None:
                return self._report(path, cached)
        try:
            image = load_rgb(path)
        except ImageReadError as err:
            logger.warning("no face crop for %s: %s", path, err.reason)
            return None
        result = self._crop(image)
        if self.cache_dir is not None:
            self._write_cache(key, result)
        return self._report(path, result)

    def prepare(self, paths: Iterable[str | Path]) -> list[FaceCrop | None]:
        """Crops of many photos (None where there is no usable face)."""
        crops = [self.crop_file(p) for p in paths]
        logger.info("face crops: %d of %d photos have a usable face", sum(c is not None for c in crops), len(crops))
        return crops

    @staticmethod
    def _report(path: Path, result: FaceCrop | str) -> FaceCrop | None:
        if isinstance(result, str):
            logger.warning("no face crop for %s: %s", path, result)
            return None
        return result

    def _read_cache(self, key: str) -> FaceCrop | str | None:
        """Cached crop, cached no-face reason, or None on a miss (or an unreadable entry)."""
        meta_path = self.cache_dir / f"{key}.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if not meta["face"]:
                return meta["reason"]
            with Image.open(self.cache_dir / f"{key}.png") as img:
                crop = img.convert("RGB")
        except (*_READ_ERRORS, KeyError) as err:
            logger.warning("ignoring broken face-cache entry %s (%s)", meta_path, err)
            return None
        return FaceCrop(
            image=crop, box=tuple(meta["box"]), landmarks=np.array(meta["landmarks"], dtype=np.float64),
            quad=np.array(meta["quad"], dtype=np.float64), num_faces=meta["num_faces"],
        )

    def _write_cache(self, key: str, result: FaceCrop | str) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(result, str):
            meta = {"face": False, "reason": result}
        else:
            atomic_write(self.cache_dir / f"{key}.png", lambda tmp: result.image.save(tmp, format="PNG"))
            meta = {
                "face": True, "box": list(result.box), "landmarks": result.landmarks.tolist(),
                "quad": result.quad.tolist(), "num_faces": result.num_faces,
            }
        meta["settings"] = self.settings()
        # the JSON is written last: it is the marker that the entry is complete
        atomic_write(self.cache_dir / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(meta)))


def write_crops(crops: Mapping[str | Path, FaceCrop | None], out_dir: str | Path) -> list[Path]:
    """Save each photo's crop as ``<out_dir>/<photo stem>_face.png`` for the user to inspect."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for photo, crop in crops.items():
        if crop is not None:
            target = out_dir / f"{Path(photo).stem}_face.png"
            crop.image.save(target)
            written.append(target)
    return written


class FaceEncoder:
    """128-d identity descriptors from dlib's face-recognition ResNet (same person: distance < 0.6)."""

    def __init__(
        self, detector: str = "hog", max_detect_side: int = 800, num_jitters: int = 0,
        model_dir: str | Path | None = None,
    ) -> None:
        self.face_detector = FaceDetector(detector, max_detect_side, model_dir=model_dir)
        self.num_jitters = num_jitters
        self.model_dir = model_dir
        self._model = None

    def descriptor(self, image: Image.Image) -> np.ndarray | None:
        """[128] descriptor of the largest face, or None (reason logged)."""
        image = to_rgb(image)
        found = self.face_detector.detect(image)
        if isinstance(found, str):
            logger.debug("no face descriptor: %s", found)  # callers report images without a face
            return None
        if self._model is None:
            path = model_path(RECOGNITION_FILE, self.model_dir)
            self._model = _import_dlib().face_recognition_model_v1(str(path))
        vector = self._model.compute_face_descriptor(_as_uint8(image), found.shape, self.num_jitters)
        return np.array(vector, dtype=np.float64)  # [128]


def face_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two descriptors (dlib's same-person threshold is 0.6)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
