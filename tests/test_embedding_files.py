"""Embedding files: the published seed files, our momentum format, safety and the effective-vector maths."""
from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.checkpoint import (
    CheckpointError,
    EmbeddingFile,
    UntrustedPickleError,
    load_embeddings,
    save_checkpoint,
    save_embeddings,
    tensor_fingerprint,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "embeddings"
SEED_FILES = [  # (file, norm of the stored vector), order of the fixtures README
    ("seed_gamma0.1_random_desc_face_gs-1649.pt", 3.963),
    ("seed_gamma1_textual_inversion_gs-1649.pt", 1.876),
    ("seed_random_desc_facial_ep-2.pt", 1.385),
]


def make_embedding(*, gamma: float | None = 0.1, base: bool = True, n: int = 2, dim: int = 8) -> EmbeddingFile:
    gen = torch.Generator().manual_seed(0)
    placeholders = {"*": 265, "<sks.person>": 49407}
    params = {p: torch.randn(n, dim, generator=gen) for p in placeholders}
    bases = {p: torch.randn(n, dim, generator=gen) for p in placeholders} if base else None
    return EmbeddingFile(placeholders, params, bases, gamma, step=1649, fingerprint="abc123")


def assert_same_embedding(actual: EmbeddingFile, expected: EmbeddingFile) -> None:
    assert actual.string_to_token == expected.string_to_token
    assert (actual.gamma, actual.step, actual.fingerprint) == (expected.gamma, expected.step, expected.fingerprint)
    assert list(actual.params) == list(expected.params)
    for p, v in expected.params.items():
        assert torch.equal(actual.params[p], v), p
    assert (actual.base is None) == (expected.base is None)
    for p, e_p in (expected.base or {}).items():
        assert torch.equal(actual.base[p], e_p), p


# ---------------------------------------------------------------- published seed files


@pytest.mark.parametrize("name,norm", SEED_FILES)
def test_seed_files_load(name: str, norm: float, caplog) -> None:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} absent (only in the project's shared fixtures, not in a fresh clone)")
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        emb = load_embeddings(path, default_gamma=0.1)
    assert emb.string_to_token == {"*": 265}
    vector = emb.params["*"]
    assert type(vector) is torch.Tensor and vector.shape == (1, 768) and vector.dtype == torch.float32
    assert vector.norm().item() == pytest.approx(norm, abs=1e-3)
    assert emb.gamma == 0.1 and emb.base is None and emb.source_format == "textual-inversion"
    assert [r for r in caplog.records if "gamma=0.1 from the flag/config" in r.getMessage()]
    with pytest.raises(CheckpointError, match="needs the base vectors"):
        emb.effective()


def test_seed_file_without_default_gamma_has_no_gamma() -> None:
    path = FIXTURES / SEED_FILES[1][0]
    if not path.exists():
        pytest.skip(f"fixture {path} absent (only in the project's shared fixtures, not in a fresh clone)")
    emb = load_embeddings(path)
    assert emb.gamma is None
    with pytest.raises(CheckpointError, match="default_gamma"):
        emb.effective()
    assert torch.equal(load_embeddings(path, default_gamma=1.0).effective()["*"], emb.params["*"])


def test_modern_parameter_dict_file_loads(tmp_path: Path) -> None:
    vectors = torch.randn(3, 16)
    params = nn.ParameterDict({"*": nn.Parameter(vectors.clone()), "@": nn.Parameter(vectors[:1].clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265), "@": torch.tensor(1)}, "string_to_param": params},
               tmp_path / "ti.pt")
    emb = load_embeddings(tmp_path / "ti.pt")
    assert list(emb.params) == ["*", "@"] and torch.equal(emb.params["*"], vectors)
    assert emb.string_to_token == {"*": 265, "@": 1}


# ---------------------------------------------------------------- our format


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("gamma,base", [(0.1, True), (1.0, False), (None, False)])
def test_round_trip_is_exact(tmp_path: Path, suffix: str, gamma: float | None, base: bool) -> None:
    emb = make_embedding(gamma=gamma, base=base)
    loaded = load_embeddings(save_embeddings(tmp_path / f"emb{suffix}", emb))
    assert_same_embedding(loaded, emb)
    assert loaded.source_format == "momentum-ti/1"


def test_pt_file_is_plain_and_weights_only_loadable(tmp_path: Path) -> None:
    emb = make_embedding()
    raw = torch.load(save_embeddings(tmp_path / "emb.pt", emb), map_location="cpu", weights_only=True)
    assert set(raw) == {
        "string_to_token", "string_to_param", "base_vectors", "effective_vectors",
        "gamma", "step", "text_encoder_fingerprint", "format",
    }
    assert raw["format"] == "momentum-ti/1" and raw["gamma"] == 0.1 and raw["step"] == 1649
    assert raw["string_to_token"]["*"].dim() == 0 and int(raw["string_to_token"]["*"]) == 265
    assert type(raw["string_to_param"]) is dict
    for p, e in emb.effective().items():
        assert torch.equal(raw["effective_vectors"][p], e)


def test_safetensors_key_scheme(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = save_embeddings(tmp_path / "emb.safetensors", make_embedding())
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys == {f"{g}.{p}" for g in ("string_to_param", "base_vectors", "effective_vectors") for p in ("*", "<sks.person>")}
    assert metadata["format"] == "momentum-ti/1" and metadata["gamma"] == "0.1"


def test_failed_save_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def broken_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_embeddings(tmp_path / "emb.pt", make_embedding())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- effective vectors


def test_effective_maths() -> None:
    emb = make_embedding(gamma=0.1)
    v, e_p = emb.params["*"], emb.base["*"]
    torch.testing.assert_close(emb.effective()["*"], e_p + 0.1 * (v - e_p), rtol=0, atol=0)
    emb.gamma = 0.0
    assert torch.equal(emb.effective()["*"], e_p)  # gamma 0: the model's own token embedding
    emb.gamma = 1.0
    assert torch.equal(emb.effective()["*"], v)  # gamma 1: plain textual inversion
    plain = make_embedding(gamma=0.1).as_plain_ti()
    assert plain.gamma == 1.0 and plain.base is None
    torch.testing.assert_close(plain.params["*"], make_embedding(gamma=0.1).effective()["*"], rtol=0, atol=0)


def test_effective_needs_base_unless_gamma_is_one() -> None:
    assert torch.equal(make_embedding(gamma=1.0, base=False).effective()["*"], make_embedding().params["*"])
    with pytest.raises(CheckpointError, match="e_p"):
        make_embedding(gamma=0.1, base=False).effective()


def test_inconsistent_embedding_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="differ"):
        EmbeddingFile({"*": 1}, {"@": torch.zeros(1, 4)})
    with pytest.raises(CheckpointError, match=r"\[n, D\]"):
        EmbeddingFile({"*": 1}, {"*": torch.zeros(4)})
    with pytest.raises(CheckpointError, match="shape"):
        EmbeddingFile({"*": 1}, {"*": torch.zeros(1, 4)}, {"*": torch.zeros(2, 4)}, 0.1)


def test_fingerprint_tracks_content() -> None:
    table = torch.randn(10, 4)
    assert tensor_fingerprint(table) == tensor_fingerprint(table.clone())
    changed = table.clone()
    changed[3, 1] += 1e-3
    assert tensor_fingerprint(changed) != tensor_fingerprint(table)


# ---------------------------------------------------------------- safety and wrong files


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(str(self.marker)),))


def test_malicious_embedding_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UntrustedPickleError, match="system"):
        load_embeddings(tmp_path / "evil.pt")
    assert not marker.exists()


def test_malicious_state_inside_parameter_dict_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    params = nn.ParameterDict({"*": nn.Parameter(torch.zeros(1, 4))})
    params.hook = Evil(marker)  # extra module state goes through the same restricted unpickler
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "evil.pt")
    with pytest.raises(UntrustedPickleError):
        load_embeddings(tmp_path / "evil.pt")
    assert not marker.exists()


def test_wrong_files_give_clear_errors(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "model.ckpt", {"w": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not an embedding file"):
        load_embeddings(ckpt)
    foreign = save_checkpoint(tmp_path / "learned_embeds.safetensors", {"<cat>": torch.ones(768)})
    assert load_embeddings(foreign).source_format == "diffusers"  # a diffusers embedding, not an error
    (tmp_path / "cfg.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="YAML"):
        load_embeddings(tmp_path / "cfg.yaml")
    with pytest.raises(CheckpointError, match="not found"):
        load_embeddings(tmp_path / "missing.pt")
