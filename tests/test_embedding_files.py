"""Embedding files: the published seed files, our momentum format, safety and the effective-vector maths."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import Evil, shared_fixture
from torch import nn

from ldm.checkpoint import (
    CheckpointError,
    EmbeddingFile,
    UntrustedPickleError,
    save_checkpoint,
    save_embeddings,
    tensor_fingerprint,
)
from ldm.modules.embedding_manager import load_embeddings

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
    path = shared_fixture(f"embeddings/{name}")
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
    path = shared_fixture(f"embeddings/{SEED_FILES[1][0]}")
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
@pytest.mark.parametrize("gamma,base", [(0.1, True), (1.0, False), (0.0, True)])
def test_round_trip_is_exact(tmp_path: Path, suffix: str, gamma: float, base: bool) -> None:
    emb = make_embedding(gamma=gamma, base=base)
    loaded = load_embeddings(save_embeddings(tmp_path / f"emb{suffix}", emb))
    assert_same_embedding(loaded, emb)
    assert loaded.source_format == "momentum-ti/2"


@pytest.mark.parametrize("gamma,expected", [(None, "stores no gamma"), (0.1, "needs the base vectors e_p")])
def test_save_refuses_what_has_no_effective_vectors(tmp_path: Path, gamma: float | None, expected: str) -> None:
    with pytest.raises(CheckpointError, match=expected):
        save_embeddings(tmp_path / "emb.pt", make_embedding(gamma=gamma, base=False))
    assert list(tmp_path.iterdir()) == []


def single(emb: EmbeddingFile, placeholder: str = "<sks.person>") -> EmbeddingFile:
    return replace(emb, string_to_token={placeholder: emb.string_to_token[placeholder]},
                   params={placeholder: emb.params[placeholder]}, base={placeholder: emb.base[placeholder]})


def test_pt_file_other_tools_read_holds_e_and_our_block_holds_v(tmp_path: Path) -> None:
    emb = single(make_embedding())
    raw = torch.load(save_embeddings(tmp_path / "emb.pt", emb), map_location="cpu", weights_only=True)
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "momentum_ti"}
    # AUTOMATIC1111 / diffusers read string_to_param["*"] and name; original TI replaces token 49407
    assert type(raw["string_to_param"]) is dict and list(raw["string_to_param"]) == ["*"]
    assert torch.equal(raw["string_to_param"]["*"], emb.effective()["<sks.person>"])
    assert raw["string_to_token"]["*"].dim() == 0 and int(raw["string_to_token"]["*"]) == 49407
    assert raw["name"] == "<<sks.person>>" and raw["step"] == 1649
    block = raw["momentum_ti"]
    assert block["format"] == "momentum-ti/2" and block["gamma"] == 0.1 and block["text_encoder_fingerprint"] == "abc123"
    assert torch.equal(block["trainable_vectors"]["<sks.person>"], emb.params["<sks.person>"])
    assert torch.equal(block["base_vectors"]["<sks.person>"], emb.base["<sks.person>"])
    assert int(block["string_to_token"]["<sks.person>"]) == 49407


def test_multi_placeholder_pt_keys_vectors_by_placeholder(tmp_path: Path) -> None:
    emb = make_embedding()
    raw = torch.load(save_embeddings(tmp_path / "emb.pt", emb), map_location="cpu", weights_only=True)
    assert "name" not in raw and set(raw["string_to_param"]) == {"*", "<sks.person>"}
    for p, e in emb.effective().items():
        assert torch.equal(raw["string_to_param"][p], e)


def test_safetensors_is_one_tensor_per_placeholder_with_the_state_in_metadata(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open

    emb = replace(single(make_embedding(), "*"), name="<me>")
    path = save_embeddings(tmp_path / "emb.safetensors", emb)
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        assert keys == {"<me>"} and torch.equal(handle.get_tensor("<me>"), emb.effective()["*"])
    block = json.loads(metadata["momentum_ti"])
    assert metadata["format"] == "pt" and block["format"] == "momentum-ti/2" and block["gamma"] == 0.1
    assert block["names"] == {"*": "<me>"} and block["string_to_token"] == {"*": 265} and block["step"] == 1649


def test_corrupt_metadata_block_is_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"<*>": torch.zeros(1, 8)}, str(tmp_path / "bad.safetensors"), metadata={"momentum_ti": "{not json"})
    with pytest.raises(CheckpointError, match="unreadable 'momentum_ti' metadata"):
        load_embeddings(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- the previous format, momentum-ti/1


def save_v1(path: Path, emb: EmbeddingFile) -> Path:
    """A file exactly as the momentum-ti/1 writer laid it out (string_to_param holds v)."""
    groups = {"string_to_param": emb.params, "base_vectors": emb.base, "effective_vectors": emb.effective()}
    scalars = {"gamma": emb.gamma, "step": emb.step, "text_encoder_fingerprint": emb.fingerprint}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {f"{g}.{p}": t.contiguous() for g, per in groups.items() for p, t in per.items()}
        metadata = {"format": "momentum-ti/1", "string_to_token": json.dumps(emb.string_to_token),
                    **{k: json.dumps(v) for k, v in scalars.items()}}
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save({"string_to_token": {p: torch.tensor(i) for p, i in emb.string_to_token.items()},
                    **groups, **scalars, "format": "momentum-ti/1"}, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_v1_files_load_as_before(tmp_path: Path, suffix: str) -> None:
    emb = make_embedding()
    loaded = load_embeddings(save_v1(tmp_path / f"v1{suffix}", emb))
    assert_same_embedding(loaded, emb)
    assert loaded.source_format == "momentum-ti/1"
    for p, e in emb.effective().items():
        assert torch.equal(loaded.effective()[p], e)


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
    with pytest.raises(CheckpointError, match="not an embedding file") as err:
        load_embeddings(ckpt)
    message = str(err.value)  # one line that names every format it accepts
    assert "\n" not in message and all(f in message for f in ("this project's", "TI", "diffusers", "AUTOMATIC1111"))
    foreign = save_checkpoint(tmp_path / "learned_embeds.safetensors", {"<cat>": torch.ones(768)})
    assert load_embeddings(foreign).source_format == "diffusers"  # a diffusers embedding, not an error
    (tmp_path / "cfg.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="YAML"):
        load_embeddings(tmp_path / "cfg.yaml")
    with pytest.raises(CheckpointError, match="not found"):
        load_embeddings(tmp_path / "missing.pt")
