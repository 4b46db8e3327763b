"""`mergecli train`'s optimisation (train_regime.py): schedules against torch's own schedulers
and their formulas, weight decay on weights only, label smoothing, precision, and a training
stopped mid-schedule resuming to the bits of an uninterrupted one."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergecli.errors import RecipeError
from mergecli.models import build_model
from mergecli.models.forward import model_logits
from mergecli.runtime.log import Log
from mergecli.runtime.signals import STOP, Stopped
from mergecli.train import train_model
from mergecli.train_regime import (
    Regime,
    autocast_dtype,
    cpu_notice,
    decays,
    lr_at,
    make_optimizer,
    training_loss,
    warmup_steps,
)
from mergecli.train_state import TrainCheckpoint

CPU = torch.device("cpu")


def torch_lrs(scheduler_for, lr: float, total: int) -> list[float]:
    """The lr each of ``total`` steps runs at under a torch scheduler."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = scheduler_for(opt)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_cosine_is_torchs_linear_warmup_then_cosine_annealing(warmup: int) -> None:
    total, lr = 50, 0.4
    regime = Regime(schedule="cosine", lr=lr)
    ours = [lr_at(regime, t, total, warmup) for t in range(total)]
    lrs = torch.optim.lr_scheduler

    def scheduler(opt):
        cosine = lrs.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.0)
        if not warmup:
            return cosine
        # LinearLR from 1/W to 1 over W - 1 steps: the factor (t + 1) / W at step t.
        ramp = lrs.LinearLR(opt, 1 / warmup, 1.0, total_iters=max(warmup - 1, 1))
        return lrs.SequentialLR(opt, [ramp, cosine], milestones=[warmup])

    expected = torch_lrs(scheduler, lr, total)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    # The formula at a few points: lr/2 halfway through the cosine, ~0 at the end.
    if warmup == 0:
        assert ours[25] == pytest.approx(lr * 0.5)
        assert ours[-1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 49 / 50)))


def test_onecycle_rises_to_the_peak_and_falls_to_zero() -> None:
    total, warmup, lr = 40, 12, 0.1
    regime = Regime(schedule="onecycle", lr=lr)
    ours = [lr_at(regime, t, total, warmup) for t in range(total)]
    # The peak, lr, at the end of the warmup and the step after; nowhere above it.
    assert max(ours) == ours[warmup - 1] == ours[warmup] == lr
    # Linear both ways: equal steps up from lr / W, equal steps down to lr / (T - W) at the
    # last step, which a next step would take to 0.
    torch.testing.assert_close(ours[:warmup], [lr * (t + 1) / warmup for t in range(warmup)])
    assert ours[-1] == pytest.approx(lr / (total - warmup))
    down = torch.tensor(ours[warmup:], dtype=torch.float64)
    torch.testing.assert_close(
        down.diff(), torch.full((total - warmup - 1,), -lr / (total - warmup), dtype=torch.float64)
    )
    assert lr_at(regime, total, total, warmup) == 0.0
    # --warmup not given: 30% of the training rises (torch's OneCycleLR pct_start).
    assert warmup_steps(regime, epochs=10, per_epoch=4) == 12
    assert warmup_steps(Regime(schedule="cosine"), epochs=10, per_epoch=4) == 0
    assert warmup_steps(Regime(warmup=0.5), epochs=10, per_epoch=4) == 2
    with pytest.raises(RecipeError, match="--warmup 10: the warmup takes all 10 epoch"):
        warmup_steps(Regime(schedule="cosine", warmup=10), epochs=10, per_epoch=4)


def test_constant_schedule_is_the_lr() -> None:
    regime = Regime(lr=0.01)
    assert {lr_at(regime, t, 30, 0) for t in range(30)} == {0.01}
    assert [lr_at(regime, t, 30, 4) for t in range(6)] == [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01]


def test_weight_decay_applies_to_weights_not_norms_or_biases() -> None:
    for arch, args in (
        ("resnet20", {"width": 0.25, "shortcut": "conv1x1"}),
        ("mlp", {"depth": 3, "hidden": 8, "batchnorm": True}),
        ("vit", {"image_size": 8, "patch": 4, "dim": 16, "depth": 1, "heads": 2}),
    ):
        model = build_model(arch, args)
        # By module type: the weights of convs and linears; nothing of a norm; no bias.
        weights = {
            f"{name}.weight"
            for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight is not None
        }
        decayed = {name for name, d in decays(model).items() if d}
        norm_params = {
            f"{name}.{p}"
            for name, m in model.named_modules()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))
            for p, _ in m.named_parameters(recurse=False)
        }
        assert weights <= decayed, arch
        assert not decayed & norm_params and not any(n.endswith("bias") for n in decayed)
        assert all(dict(model.named_parameters())[n].ndim >= 2 for n in decayed)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_step_with_zero_gradients_shrinks_exactly_the_decayed_weights(optimizer: str) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", {"depth": 3, "hidden": 8, "batchnorm": True})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.01
    opt = make_optimizer(model, Regime(optimizer=optimizer, lr=lr, weight_decay=wd, momentum=0.0,
                                       nesterov=False))  # fmt: skip
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay = decays(model)
    for name, p in model.named_parameters():
        # SGD's L2 and AdamW's decoupled decay agree for a zero gradient: p (1 - lr wd).
        expected = before[name] * (1 - lr * wd) if decay[name] else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0), name
    assert any(decay.values()) and not all(decay.values())
    # Without weight decay: one group with every parameter, as before these options.
    assert len(make_optimizer(model, Regime()).param_groups) == 1
    # Nesterov (the default) is a kind of momentum: with none, plain SGD.
    plain = make_optimizer(model, Regime(optimizer="sgd", momentum=0.0))
    assert plain.param_groups[0]["nesterov"] is False
    assert Regime(optimizer="sgd", momentum=0.0).described(1, CPU)["nesterov"] is False
    assert make_optimizer(model, Regime(optimizer="sgd")).param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_is_cross_entropy_against_smoothed_targets(smoothing: float) -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(16, 7, dtype=torch.float64), torch.randint(0, 7, (16,))
    log_p = torch.log_softmax(logits, dim=1)
    target = (1 - smoothing) * F.one_hot(y, 7).double() + smoothing / 7
    expected = -(target * log_p).sum(1).mean()
    torch.testing.assert_close(training_loss(logits.float(), y, smoothing).double(), expected,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(
        training_loss(logits.float(), y, smoothing),
        nn.CrossEntropyLoss(label_smoothing=smoothing)(logits.float(), y),
    )
    # bf16 logits (an autocast forward) give a float32 loss.
    assert training_loss(logits.bfloat16(), y, smoothing).dtype == torch.float32


def test_precision_on_the_cpu_is_float32_with_a_notice() -> None:
    for precision in ("auto", "fp32", "bf16", "fp16"):
        assert autocast_dtype(precision, CPU) is None
    assert cpu_notice("auto", CPU) is None and cpu_notice("fp32", CPU) is None
    assert cpu_notice("fp16", CPU) == (
        "train: --precision fp16 is for CUDA; training in float32 on cpu"
    )
    described = Regime(optimizer="adam", precision="bf16").described(10, CPU)
    assert described["precision"] == "fp32" and "momentum" not in described


def stopping_after(batches: int | None):
    """The training's forward, which sets the stop signal after its ``batches``-th call, as
    SIGINT would (the loop polls it after the step)."""
    calls = []

    def logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == batches:
            STOP.received = signal.SIGINT
        return model_logits(module, x)

    return logits


@pytest.mark.parametrize("amp", [None, torch.float16], ids=["fp32", "fp16-scaled"])
def test_a_training_stopped_mid_schedule_resumes_to_the_same_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: torch.dtype | None
) -> None:
    # Bit-identity is what is tested: one process, the same threads. fp16: CUDA's path (an
    # autocast forward, the loss scaler and its saved state) run on the CPU's autocast.
    monkeypatch.setattr("mergecli.train.autocast_dtype", lambda precision, device: amp)
    regime = Regime(optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="onecycle",
                    label_smoothing=0.1)  # fmt: skip
    common = dict(
        arch="mlp", args={"depth": 3, "hidden": 16, "batchnorm": True},
        train_spec={"source": "mnist", "split": "0:256"}, eval_spec=None, seed=3, epochs=3,
        batch_size=32, regime=regime, device=CPU, log=Log("plain"),
    )  # fmt: skip

    def trained(checkpoint: TrainCheckpoint | None, stop_at: int | None) -> dict:
        monkeypatch.setattr("mergecli.train.model_logits", stopping_after(stop_at))
        with STOP.installed():
            module, _ = train_model(**common, checkpoint=checkpoint)
        return module.state_dict()

    expected = trained(None, None)
    state = TrainCheckpoint(tmp_path / "x.state.safetensors", "fingerprint")
    # 8 batches an epoch: the stop after batch 5 of epoch 2 (step 13 of 24, past the peak
    # at step 7, with a momentum buffer and the shuffle mid-epoch).
    with pytest.raises(Stopped):
        trained(state, 13)
    saved = state.load()
    assert (saved["epoch"], saved["position"]) == (1, 5)
    if amp is not None:  # 13 scaled steps, none with an overflow: the scale as it started
        assert saved["scaler"] == torch.amp.GradScaler("cpu").state_dict() | {"_growth_tracker": 13}
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at(regime, 12, 24, 7))
    resumed = trained(state, None)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_fp16_loss_scaler_state_round_trips_without_pickle(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.scale(torch.ones(()))  # the scale exists once a loss has been scaled
    scaler.update(new_scale=512.0)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    payload = {
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "shuffle_rng": torch.Generator().get_state(), "torch_rng": torch.get_rng_state(),
        "scaler": scaler.state_dict(),
        "epoch": 1, "position": 2, "total": 3, "correct": 1, "loss_sum": 0.5,
    }  # fmt: skip
    state = TrainCheckpoint(tmp_path / "s.state.safetensors", "f")
    state.save(payload)
    again = torch.amp.GradScaler("cpu")
    again.load_state_dict(state.load()["scaler"])
    assert again.state_dict() == scaler.state_dict()
    assert again.get_scale() == 512.0
