"""Weights I/O: safe reading, strict loading with the SD key allow-list, atomic exact saving."""
from __future__ import annotations

import datetime
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import Evil, sd_v1_key_table
from torch import nn

from ldm.checkpoint import (
    CheckpointError,
    UntrustedPickleError,
    ema_key,
    is_ignorable_extra,
    load_weights,
    read_checkpoint,
    read_checkpoint_meta,
    read_state_dict,
    save_checkpoint,
)

class TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(7, 4)
        self.register_buffer("position_ids", torch.arange(3)[None], persistent=False)


class Tiny(nn.Module):
    """Stand-in with the SD v1 top-level layout: model.diffusion_model, first_stage, cond_stage, schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Sequential(nn.Linear(3, 4), nn.Conv2d(4, 2, 1))
        self.first_stage_model = nn.Linear(2, 2)
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.transformer = nn.Module()
        self.cond_stage_model.transformer.text_model = TextModel()
        self.register_buffer("betas", torch.linspace(0.1, 0.2, 5))


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in model.state_dict().items()}


def with_ema(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ema = {ema_key(k): torch.randn(v.shape, generator=gen) for k, v in state.items() if k.startswith("model.")}
    return {**state, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


# ---------------------------------------------------------------- save / read round trips


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_read_round_trip_is_exact(tmp_path: Path, suffix: str) -> None:
    state = random_state(Tiny())
    state["counter"] = torch.tensor([3, 4], dtype=torch.int64)
    state["half"] = torch.randn(2, 2).half()
    state["tied"] = state["first_stage_model.weight"]  # shared storage must not break safetensors
    path = save_checkpoint(tmp_path / f"m{suffix}", state, extra={"global_step": 1649, "epoch": 2})
    assert_same(read_state_dict(path), state)
    meta = read_checkpoint_meta(path)
    assert meta["global_step"] == 1649 and meta["epoch"] == 2


def test_ckpt_is_lightning_layout_and_weights_only_loadable(tmp_path: Path) -> None:
    state = random_state(Tiny())
    path = save_checkpoint(tmp_path / "m.ckpt", state, extra={"global_step": 5})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "global_step"}
    assert_same(raw["state_dict"], state)


def test_bare_state_dict_file_reads(tmp_path: Path) -> None:
    state = random_state(Tiny())
    torch.save(state, tmp_path / "bare.pth")
    assert_same(read_state_dict(tmp_path / "bare.pth"), state)
    assert read_checkpoint(tmp_path / "bare.pth").meta == {}


def test_half_converts_only_floats(tmp_path: Path) -> None:
    state = {"w": torch.randn(3), "ids": torch.arange(3)}
    loaded = read_state_dict(save_checkpoint(tmp_path / "h.safetensors", state, half=True))
    assert loaded["w"].dtype == torch.float16 and torch.equal(loaded["w"], state["w"].half())
    assert loaded["ids"].dtype == torch.int64


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_failed_write_leaves_no_file_and_keeps_old_one(tmp_path: Path, suffix: str, monkeypatch) -> None:
    target = tmp_path / f"m{suffix}"
    old = {"w": torch.ones(2)}
    save_checkpoint(target, old)

    def broken_writer(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(torch, "save", broken_writer)
    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name], "temp file left behind"
    assert_same(read_state_dict(target), old)

    fresh = tmp_path / f"new{suffix}"
    monkeypatch.setattr(torch, "save", broken_writer)
    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError):
        save_checkpoint(fresh, old)
    assert not fresh.exists()


# ---------------------------------------------------------------- safety


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Evil(marker)}, path)
    with pytest.raises(UntrustedPickleError, match=r"system.*trust_pickle=True"):
        read_state_dict(path)
    assert not marker.exists()


def test_malicious_raw_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    with pytest.raises(CheckpointError, match="trust_pickle"):
        read_state_dict(path)
    assert not marker.exists()


def test_untrusted_global_loads_only_with_trust_pickle(tmp_path: Path) -> None:
    path = tmp_path / "dated.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "date": datetime.date(2022, 8, 22)}, path)
    with pytest.raises(UntrustedPickleError, match=r"datetime\.date.*--trust_pickle"):
        read_state_dict(path)
    assert torch.equal(read_state_dict(path, trust_pickle=True)["w"], torch.ones(2))


def test_lightning_training_checkpoint_metadata_is_neutralised(tmp_path: Path, monkeypatch) -> None:
    np = pytest.importorskip("numpy")
    # A stand-in pickled under Lightning's real name, so the test needs no Lightning import.
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    fake = sys.modules["pytorch_lightning.callbacks.model_checkpoint"]
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": fake.__name__})
    fake.ModelCheckpoint = ModelCheckpoint
    state = {"w": torch.randn(3)}
    ckpt = {
        "state_dict": state,
        "global_step": 470000,
        "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25)}, "cb": ModelCheckpoint()},
    }
    torch.save(ckpt, tmp_path / "sd.ckpt")
    monkeypatch.undo()  # loading must not need the class
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "sd.ckpt", weights_only=True)  # plain weights_only refuses it
    loaded = read_checkpoint(tmp_path / "sd.ckpt")
    assert_same(loaded.state_dict, state)
    assert loaded.meta["global_step"] == 470000


# ---------------------------------------------------------------- bad files


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    yaml_file = tmp_path / "v1-inference.yaml"
    yaml_file.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    with pytest.raises(CheckpointError, match="YAML"):
        read_state_dict(yaml_file)
    (tmp_path / "empty.ckpt").touch()
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="directory"):
        read_state_dict(tmp_path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError, match="raw.pkl"):
        read_state_dict(tmp_path / "raw.pkl")
    torch.save({"state_dict": {"w": torch.ones(1), "note": "x"}}, tmp_path / "mixed.ckpt")
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict(tmp_path / "mixed.ckpt")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file_is_reported(tmp_path: Path, suffix: str) -> None:
    path = save_checkpoint(tmp_path / f"m{suffix}", random_state(Tiny()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated|corrupt"):
        read_state_dict(path)


# ---------------------------------------------------------------- strict loading


def test_load_weights_exact_and_ignores_allow_listed_extras() -> None:
    source = with_ema(random_state(Tiny()))
    source["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(3)[None]
    model = Tiny()
    report = load_weights(model, source)
    assert_same(model.state_dict(), {k: source[k] for k in model.state_dict()})
    assert len(report.ignored_unexpected) == 4 + 2 + 1  # 4 EMA shadows, decay, num_updates, position_ids
    assert not report.used_ema and report.loaded == len(model.state_dict())


def test_missing_keys_are_listed_with_count() -> None:
    source = random_state(Tiny())
    del source["first_stage_model.weight"], source["betas"]
    with pytest.raises(CheckpointError, match=r"2 keys missing.*betas; first_stage_model\.weight"):
        load_weights(Tiny(), source)
    report = load_weights(Tiny(), source, allow_missing_prefixes=("first_stage_model.", "betas"))
    assert sorted(report.allowed_missing) == ["betas", "first_stage_model.weight"]


def test_many_missing_keys_are_truncated_in_the_message() -> None:
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(12)])
    with pytest.raises(CheckpointError, match=r"^24 keys missing.*; \.\.\. - "):
        load_weights(model, {"0.weight_typo": torch.zeros(1, 1)})


def test_unknown_extra_key_is_an_error() -> None:
    source = {**random_state(Tiny()), "model.diffusion_model.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 keys in the checkpoint but not in the model.*extra\.weight"):
        load_weights(Tiny(), source)


def test_shape_mismatch_names_key_and_shapes() -> None:
    source = random_state(Tiny())
    source["first_stage_model.weight"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError, match=r"first_stage_model\.weight: checkpoint \(3, 2\) vs model \(2, 2\).*config"):
        load_weights(Tiny(), source)


def test_use_ema_copies_shadows_over_diffusion_parameters() -> None:
    source = with_ema(random_state(Tiny()))
    model = Tiny()
    report = load_weights(model, source, use_ema=True)
    assert report.used_ema
    loaded = model.state_dict()
    for key in loaded:
        expected = source[ema_key(key)] if key.startswith("model.") else source[key]
        assert torch.equal(loaded[key], expected), key


def test_use_ema_without_ema_weights_is_an_error() -> None:
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_weights(Tiny(), random_state(Tiny()), use_ema=True)
    partial = with_ema(random_state(Tiny()))
    del partial[ema_key("model.diffusion_model.0.bias")]
    with pytest.raises(CheckpointError, match="diffusion_model0bias"):
        load_weights(Tiny(), partial, use_ema=True)


def test_text_encoder_keys_without_text_model_level_are_renamed() -> None:
    source = random_state(Tiny())
    old = "cond_stage_model.transformer.text_model.embeddings.weight"
    source["cond_stage_model.transformer.embeddings.weight"] = source.pop(old)
    model = Tiny()
    report = load_weights(model, source)
    assert report.renamed == 1
    assert torch.equal(model.state_dict()[old], source["cond_stage_model.transformer.embeddings.weight"])


# ---------------------------------------------------------------- released SD v1 layout


class MetaModel(nn.Module):
    """Module tree with the given parameter names and shapes on the meta device (no memory)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for key, shape in shapes.items():
            *path, leaf = key.split(".")
            module: nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(torch.empty(shape, device="meta")))


def test_released_sd_v1_layout_loads_with_and_without_ema() -> None:
    table = sd_v1_key_table()
    model_keys = {k: s for k, (s, g) in table.items() if g != "ema" and not k.endswith("position_ids")}
    checkpoint = {k: torch.empty(s, device="meta") for k, (s, _) in table.items()}
    ema_rows = {k for k, (_, g) in table.items() if g == "ema"}
    assert len(model_keys) == 686 + 248 + 196 + 12
    assert ema_rows == {ema_key(k) for k in model_keys if k.startswith("model.")} | {
        "model_ema.decay",
        "model_ema.num_updates",
    }
    assert all(is_ignorable_extra(k) for k in set(checkpoint) - set(model_keys))

    report = load_weights(MetaModel(model_keys), checkpoint)
    assert report.loaded == len(model_keys)
    assert len(report.ignored_unexpected) == len(ema_rows) + 1
    assert load_weights(MetaModel(model_keys), checkpoint, use_ema=True).used_ema
