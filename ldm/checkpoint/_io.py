"""File-level plumbing shared by weights and embeddings: format sniffing, safe unpickling, atomic writes.

Safety rule: a pickle is only ever read with torch's ``weights_only`` unpickler, which rebuilds
tensors, storages, Parameters and plain containers and refuses every other global. Two narrow
extensions are made, both mapping a named global to an inert stub class that runs no code:
``torch.nn.ParameterDict`` (old textual-inversion files) and metadata objects that Lightning/numpy
put next to the weights in training checkpoints. Anything else needs ``trust_pickle=True``.
"""
from __future__ import annotations

import base64
import json
import logging
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
TRUST_HINT = "if you trust its source, pass trust_pickle=True (--trust_pickle on the command line)"

# Module prefixes whose objects appear as metadata in Lightning / CompVis training checkpoints
# (callbacks, numpy scalars in callback state, hyper-parameter containers). They are replaced by
# ``OpaqueObject`` on load, so no code of theirs runs; the state dict never contains them.
METADATA_GLOBAL_PREFIXES = (
    "pytorch_lightning.callbacks.",
    "lightning.pytorch.callbacks.",
    "lightning_fabric.",
    "numpy.",
    "_codecs.encode",
    "omegaconf.",
    "typing.",
    "pathlib.",
    "argparse.Namespace",
)

PARAMETER_DICT_GLOBAL = "torch.nn.modules.container.ParameterDict"


class CheckpointError(ValueError):
    """A weights or embedding file cannot be read, written or loaded; the message says why and what to do."""


class UntrustedPickleError(CheckpointError):
    """A pickle needs code outside the tensor allow-list and ``trust_pickle`` was not given."""


class OpaqueObject:
    """Inert stand-in for an allow-listed metadata object: keeps its constructor args and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "OpaqueObject":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class ParameterDictStub:
    """Stand-in for a pickled ``nn.ParameterDict``: collects its parameters from the module state."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "ParameterDictStub":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.params: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected ParameterDict state of type {type(state).__name__}")
        params = dict(state.get("_parameters") or {})
        order = list(state.get("_keys") or params)  # newer torch keeps insertion order in _keys
        self.params = OrderedDict((key, params[key]) for key in order if key in params)

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.params.items()


def check_readable(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is an existing, non-empty regular file."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory, not a checkpoint file; pass the .ckpt/.pt/.safetensors file inside it"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (an interrupted download or save?); re-download or re-save it")


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'pickle' or 'text' from the first bytes of ``path``."""
    with path.open("rb") as handle:
        head = handle.read(16)
    if path.suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if head.startswith(b"PK"):
        return "torch-zip"
    if head.startswith(b"\x80"):
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        header_length = struct.unpack("<Q", head[:8])[0]
        if header_length <= path.stat().st_size - 8:
            return "safetensors"
    if _looks_like_text(head):
        return "text"
    return "unknown"


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def describe_unreadable(path: Path, kind: str) -> CheckpointError:
    """Error for a file that is neither a torch pickle nor safetensors."""
    if kind == "text":
        return CheckpointError(
            f"{path}: is a text file (a YAML config?), not a checkpoint or embedding file; pass the weights file "
            "(.ckpt/.pt/.safetensors) here and the config to --base/--config"
        )
    return CheckpointError(f"{path}: not a PyTorch or safetensors file; pass a .ckpt/.pt/.safetensors file")


def probe_weights_file(path: "str | Path") -> Path:
    """Cheap checks (exists, non-empty, a tensor file and not text) before a model is built."""
    path = Path(path)
    check_readable(path)
    kind = sniff_format(path)
    if kind not in ("safetensors", "torch-zip", "pickle"):
        raise describe_unreadable(path, kind)
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (on CPU)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({_one_line(err)}); it is truncated or corrupt, re-download or re-save it"
        ) from err
    return tensors, metadata


def safe_torch_load(path: Path, *, trust_pickle: bool = False, extra_safe: dict[str, type] | None = None) -> Any:
    """``torch.load`` on CPU with the weights-only unpickler (plus inert stubs), or a full unpickle if trusted."""
    kind = sniff_format(path)
    if kind not in ("torch-zip", "pickle"):
        raise describe_unreadable(path, kind)
    if kind == "torch-zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or corrupt zip archive; re-download or re-save it")
    if trust_pickle:
        logger.warning("Fully unpickling %s (trust_pickle=True): this can run code stored in the file", path)
        return _torch_load(path, weights_only=False)
    stubs = dict(extra_safe or {})
    if kind == "torch-zip":
        for name in _unsafe_globals(path):
            if name.startswith(METADATA_GLOBAL_PREFIXES):
                stubs.setdefault(name, OpaqueObject)
    try:
        with torch.serialization.safe_globals([(stub, name) for name, stub in stubs.items()]):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = [name for name in _unsafe_globals(path) if name not in stubs] if kind == "torch-zip" else []
        if refused or _is_refusal(str(err)):
            names = ", ".join(sorted(refused)) or _first_line_after(str(err), "Unsupported global:")
            raise UntrustedPickleError(
                f"{path}: refused to unpickle: it needs code outside the tensor allow-list ({names}); {TRUST_HINT}"
            ) from None
        raise CheckpointError(f"{path}: corrupt pickle ({_one_line(err)}); re-download or re-save it") from None


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, struct.error) as err:
        raise CheckpointError(
            f"{path}: cannot read ({_one_line(err)}); it is truncated, corrupt or not a PyTorch file - re-download or re-save it"
        ) from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # a file that cannot be disassembled is reported by the load itself
        return []


def _is_refusal(message: str) -> bool:
    markers = ("Unsupported global", "unrecognized function", "Can only", "is blocked", "not an allowed global")
    return any(marker in message for marker in markers)


def _first_line_after(message: str, marker: str) -> str:
    for line in message.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()[:200]
    return "see the torch message"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata (str -> str): every value JSON-encoded."""
    try:
        return {str(key): json.dumps(value) for key, value in values.items()}
    except TypeError as err:
        raise CheckpointError(f"metadata for a safetensors file must be JSON-serialisable: {err}") from None


def decode_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Inverse of :func:`encode_metadata`; values that are not JSON stay strings."""
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            decoded[key] = value
    return decoded


def detach_for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their storage (safetensors refuses shared or strided ones)."""
    seen: set[int] = set()
    result: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        whole = tensor.numel() * tensor.element_size() == storage.nbytes()
        if storage.data_ptr() in seen or not whole:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


METADATA_TENSOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                          "float64": torch.float64}


def tensor_to_text(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as JSON-ready text (dtype, shape, base64 of its raw bytes): exact, for safetensors metadata."""
    tensor = tensor.detach().cpu().contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in METADATA_TENSOR_DTYPES:
        raise CheckpointError(f"cannot store a {dtype} tensor as metadata; use one of {sorted(METADATA_TENSOR_DTYPES)}")
    raw = tensor.view(torch.uint8).numpy().tobytes()  # native byte order, as safetensors (little-endian hosts)
    return {"dtype": dtype, "shape": list(tensor.shape), "base64": base64.b64encode(raw).decode("ascii")}


def tensor_from_text(value: Any, where: str) -> torch.Tensor:
    """Inverse of :func:`tensor_to_text`; a malformed value is a CheckpointError naming ``where``."""
    try:
        dtype = METADATA_TENSOR_DTYPES[value["dtype"]]
        raw = base64.b64decode(value["base64"], validate=True)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(value["shape"]).clone()
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where}: malformed tensor in the metadata ({_one_line(err)}); re-save the file") from None
