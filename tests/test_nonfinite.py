"""The NaN/Inf guard without per-step host syncs (ldm/nonfinite.py) and a training step with no host read.

On the CPU a host read costs nothing, so these tests record the calls that would wait for a GPU
(``host_reads.HostReadRecorder``) instead of timing anything. The run-level behaviour (stop, keep the
last good embedding, exit code 1) is in test_training_cli.py; tests/test_cuda.py checks the same step
with CUDA's own sync detector.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, base_argv, make_batch, no_trainer_log_warning, subprocess_env
from host_reads import HostReadRecorder

from ldm.data.datamodule import keep_on_host
from ldm.nonfinite import NonFiniteLossStop, NonFiniteLossTracker


def fused_adamw(param: torch.nn.Parameter) -> torch.optim.AdamW:
    return torch.optim.AdamW([param], lr=0.1, fused=True)


def test_a_nan_gradient_changes_no_weight_and_no_optimizer_state() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = fused_adamw(param)
    tracker = NonFiniteLossTracker()
    param.grad = torch.ones(4)
    tracker.skip_update_if_bad(optimizer)
    optimizer.step()  # one good step, so there is Adam state to protect
    before = param.detach().clone(), copy.deepcopy(optimizer.state_dict()["state"])
    param.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    tracker.skip_update_if_bad(optimizer)
    optimizer.step()
    assert torch.equal(param.detach(), before[0]), "the NaN step changed the weights"
    state = optimizer.state_dict()["state"][0]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key], before[1][0][key]), f"the NaN step changed Adam's {key}"
    param.grad = torch.ones(4)
    tracker.skip_update_if_bad(optimizer)
    optimizer.step()
    assert not torch.equal(param.detach(), before[0]), "a finite step after it trains again"


def test_the_skip_works_under_a_grad_scaler() -> None:
    """16-mixed: Lightning's GradScaler steps the fused optimizer after on_before_optimizer_step (found on an H200:
    a ``grad_scale`` left at None there made ``GradScaler.step`` raise a TypeError)."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = fused_adamw(param)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    tracker = NonFiniteLossTracker()
    changed = []
    for factor in (1.0, float("nan"), 1.0):
        scaler.scale((param * factor).sum()).backward()
        tracker.skip_update_if_bad(optimizer)
        before = param.detach().clone()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed.append(not torch.equal(before, param.detach()))
    assert changed == [True, False, True], "the NaN step must be skipped and the others taken"
    assert scaler.get_scale() == 2.0, "the scaler saw the NaN step and halved its scale"


def test_non_fused_optimizers_fall_back_to_a_host_check() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    param.grad = torch.tensor([float("inf"), 1.0])
    NonFiniteLossTracker().skip_update_if_bad(optimizer)
    optimizer.step()
    assert torch.equal(param.detach(), torch.ones(2))


def test_tracker_keeps_the_first_non_finite_loss_on_the_device() -> None:
    tracker = NonFiniteLossTracker()
    with HostReadRecorder() as reads:
        for step, loss in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
            tracker.record(torch.tensor(loss), step)
    assert reads.calls == [], "recording a loss must not read it on the host"
    assert tracker.agree(lambda t: t, torch.device("cpu"))
    step, value = tracker.first()
    assert step == 2 and value != value  # NaN


class FakeTrainer(SimpleNamespace):
    """The trainer attributes NonFiniteLossStop uses; ``reduce`` counts the agreements (collectives)."""

    def __init__(self):
        super().__init__(global_step=0, should_stop=False, reduces=0)
        self.strategy = SimpleNamespace(reduce=self._reduce)

    def _reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        self.reduces += 1
        return tensor


def test_ranks_agree_only_every_n_steps_and_at_save_steps() -> None:
    trainer, stop = FakeTrainer(), NonFiniteLossStop(every_n_train_steps=4, save_every_n_train_steps=6)
    module = SimpleNamespace(nonfinite=NonFiniteLossTracker(), stopped_on_nonfinite_loss=False,
                             device=torch.device("cpu"))
    checked = []
    for step in range(1, 13):
        module.nonfinite.record(torch.tensor(float("nan") if step == 9 else 1.0), step)
        trainer.global_step = step
        before = trainer.reduces
        with HostReadRecorder() as reads:
            stop.on_train_batch_end(trainer, module, None, None, 0)
        if trainer.reduces > before:
            checked.append(step)
        else:
            assert reads.calls == [], f"step {step} is no check step but read the device"
        if trainer.should_stop:
            break
    assert checked == [4, 6, 8, 12], "checks at multiples of 4 and at the save steps (multiples of 6)"
    assert trainer.should_stop and module.stopped_on_nonfinite_loss
    assert module.nonfinite.first()[0] == 9


@pytest.fixture
def trained_copy(tiny_model):
    """A training copy of the tiny model with a fused AdamW over its embedding."""
    model = copy.deepcopy(tiny_model).train()
    return model, torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, fused=True)


def steady_state_step(model, optimizer, batch) -> torch.Tensor:
    """What Lightning runs per step: training_step, backward, the guard's hook, the optimizer."""
    loss = model.training_step(batch, 0)
    loss.backward()
    model.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


@no_trainer_log_warning
@pytest.mark.parametrize("face", [False, True], ids=["ti", "ti+face"])
def test_a_training_step_reads_nothing_on_the_host(trained_copy, face: bool) -> None:
    from ldm.models.diffusion.face_loss import FacialLoss

    model, optimizer = trained_copy
    model.loss_terms = model.loss_terms[:1] + ([FacialLoss(weight=1.0)] if face else [])
    batch = make_batch(image_index=(0, 1), flipped=(False, True))
    if face:
        batch["face"] = batch["image"].flip(1)
        batch["has_face"] = torch.tensor([True, False])
    batch = keep_on_host(batch)  # as the data module hands it to Lightning
    steady_state_step(model, optimizer, dict(batch))  # warm-up: fills the latent cache
    with HostReadRecorder() as reads:
        loss = steady_state_step(model, optimizer, dict(batch))
    assert torch.isfinite(loss)
    assert reads.calls == [], f"a steady-state training step read tensors on the host: {reads.calls}"


@no_trainer_log_warning
def test_a_nan_step_in_training_changes_nothing(trained_copy) -> None:
    model, optimizer = trained_copy
    batch = keep_on_host(make_batch())
    steady_state_step(model, optimizer, dict(batch))
    good = [p.detach().clone() for p in model.embedding_manager.embedding_parameters()]
    key = next(iter(model.latent_cache._mean))
    model.latent_cache._mean[key] = torch.full_like(model.latent_cache._mean[key], float("nan"))
    loss = steady_state_step(model, optimizer, dict(batch))
    assert not torch.isfinite(loss)
    after = list(model.embedding_manager.embedding_parameters())
    assert all(torch.equal(a.detach(), g) for a, g in zip(after, good)), "a NaN loss must change no weight"
    assert model.nonfinite.first() == (0, pytest.approx(float("nan"), nan_ok=True))


def test_ddp_nan_on_one_rank_stops_both_without_hanging(tmp_path, photo_dir, tiny_ckpt) -> None:
    out = tmp_path / "gathered.json"
    argv = base_argv(tmp_path / "logs", photo_dir, tiny_ckpt, "-n", "ddpnan", "--accelerator", "cpu", "--devices", "2",
                     "--max_steps", "8", "--no_validation", "lightning.callbacks.image_logger.params.disabled=true",
                     "lightning.nonfinite_check_every_n_steps=3",
                     "lightning.callbacks.nan.target=helpers.NaNOnRankOne",
                     "lightning.callbacks.nan.params.step=1",
                     "lightning.callbacks.gather.target=helpers.GatherEmbeddings",
                     f"lightning.callbacks.gather.params.out={out}")
    # a hang would hit the timeout; starting two ranks takes minutes on a loaded 2-core machine
    proc = subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=subprocess_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Loss is nan at step 1 on this rank" in output and "A loss was NaN/Inf on another rank" in output
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["max_diff"] == 0.0, "both ranks must keep the same embedding"
    assert all(v == v for row in result["rank0"] for v in row), "the kept embedding is finite"
    assert "stopping at step 3" in output, "the ranks agreed at the first check step"
