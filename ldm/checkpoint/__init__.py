"""All loading and saving of weights and embeddings: formats, safety rules, key allow-lists."""
from ldm.checkpoint._io import CheckpointError, UntrustedPickleError, probe_weights_file
from ldm.checkpoint.embeddings import (
    EmbeddingFile,
    save_embeddings,
    tensor_fingerprint,
)
from ldm.checkpoint.reader import load_embeddings
from ldm.checkpoint.weights import (
    Checkpoint,
    LoadReport,
    ema_key,
    is_ignorable_extra,
    load_weights,
    read_checkpoint,
    read_checkpoint_meta,
    read_state_dict,
    save_checkpoint,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "EmbeddingFile",
    "LoadReport",
    "UntrustedPickleError",
    "ema_key",
    "is_ignorable_extra",
    "load_embeddings",
    "load_weights",
    "probe_weights_file",
    "read_checkpoint",
    "read_checkpoint_meta",
    "read_state_dict",
    "save_checkpoint",
    "save_embeddings",
    "tensor_fingerprint",
]
