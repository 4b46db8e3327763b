"""How `mergecli train` optimises: the optimizer and its weight-decay groups, the learning-rate
schedule, label smoothing and mixed precision, as the papers' CIFAR endpoints are trained (SGD
with momentum and weight decay, cosine (Loshchilov & Hutter 2017) or one-cycle (Smith & Topin
2019) schedules after a linear warmup (Goyal et al. 2017), label smoothing (Szegedy et al. 2016)).

The schedule is a pure function of the step, so a resumed training needs no scheduler state
beyond its position; the fp16 loss scaler's state is plain numbers, saved as JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mergecli.errors import RecipeError

OptimizerName = Literal["adam", "sgd"]
Schedule = Literal["constant", "cosine", "onecycle"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# One-cycle's rise when --warmup is not given: torch's OneCycleLR default (pct_start 0.3).
ONECYCLE_WARMUP_SHARE = 0.3
# Modules whose parameters are never decayed: decaying a norm's scale and shift only fights the
# normalisation (the papers' recipes exclude them, with the biases).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True)
class Regime:
    """The training options besides the model, the data and the epochs."""

    optimizer: OptimizerName = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd with momentum only
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    warmup: float | None = None  # epochs; None: 0, or 30% of the training for onecycle
    label_smoothing: float = 0.0
    precision: Precision = "auto"

    def described(self, epochs: int, device: torch.device) -> dict[str, Any]:
        """What the checkpoint's metadata records: every option as it took effect."""
        shown = asdict(self)
        shown["warmup"] = self.warmup_epochs(epochs)
        shown["precision"] = precision_name(autocast_dtype(self.precision, device))
        shown["nesterov"] = uses_nesterov(self)
        if self.optimizer != "sgd":
            del shown["momentum"], shown["nesterov"]
        return shown

    def warmup_epochs(self, epochs: int) -> float:
        if self.warmup is not None:
            return self.warmup
        return ONECYCLE_WARMUP_SHARE * epochs if self.schedule == "onecycle" else 0.0


def warmup_steps(regime: Regime, epochs: int, per_epoch: int) -> int:
    """The warmup in optimizer steps (epochs x steps per epoch, rounded); it must leave at
    least one step of the schedule after it."""
    steps = round(regime.warmup_epochs(epochs) * per_epoch)
    if steps and steps >= epochs * per_epoch:
        raise RecipeError(
            [
                f"--warmup {regime.warmup_epochs(epochs):g}: the warmup takes all {epochs} "
                f"epoch(s) of --schedule {regime.schedule}; make it shorter than --epochs"
            ]
        )
    return steps


def lr_at(regime: Regime, step: int, total: int, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``.

    Warmup: lr (t + 1) / W for t < W (linear, its first step already moves). Then constant:
    lr; cosine: lr (1 + cos(pi (t - W) / (T - W))) / 2; onecycle: lr (T - t) / (T - W), the
    linear fall from the peak lr at t = W - 1, W to lr / (T - W) at the last step, 0 after it.
    """
    lr = regime.lr
    # The factor first, then times lr: the peak is lr exactly.
    if step < warmup:
        return lr * ((step + 1) / warmup)
    if regime.schedule == "cosine":
        return lr * (0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
    if regime.schedule == "onecycle":
        return lr * ((total - step) / (total - warmup))
    return lr


def training_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against targets smoothed to (1 - eps) one-hot + eps / classes, computed in
    float32 whatever dtype the (autocast) forward gave the logits."""
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def decays(module: nn.Module) -> dict[str, bool]:
    """For each parameter name, whether weight decay applies: weights (matrices, conv kernels,
    embeddings) do; biases, norm layers' scales and shifts, and other 1-D parameters do not."""
    no_decay = {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        if isinstance(sub, NORM_TYPES)
        for name, _ in sub.named_parameters(recurse=False)
    }
    return {
        name: name not in no_decay and not name.endswith("bias") and p.ndim >= 2
        for name, p in module.named_parameters()
    }


def make_optimizer(module: nn.Module, regime: Regime) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov) or Adam; weight decay on ``decays`` parameters only,
    L2 in SGD as the papers' recipes, decoupled (AdamW) in Adam. Without weight decay one group
    holds every parameter, as before these options existed."""
    if regime.weight_decay:
        decay = decays(module)
        params = dict(module.named_parameters())
        groups: list[dict[str, Any]] = [
            {
                "params": [p for n, p in params.items() if decay[n]],
                "weight_decay": regime.weight_decay,
            },
            {"params": [p for n, p in params.items() if not decay[n]], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": list(module.parameters())}]
    if regime.optimizer == "adam":
        return torch.optim.Adam(groups, lr=regime.lr, decoupled_weight_decay=True)
    return torch.optim.SGD(
        groups, lr=regime.lr, momentum=regime.momentum, nesterov=uses_nesterov(regime)
    )


def uses_nesterov(regime: Regime) -> bool:
    """Nesterov's look-ahead is a kind of momentum: without momentum (0), plain SGD."""
    return regime.nesterov and regime.momentum > 0


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype the forward pass is autocast to: bf16 or fp16 on CUDA when asked (auto: bf16
    where the GPU has it); None (float32) on the CPU and for fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def cpu_notice(precision: Precision, device: torch.device) -> str | None:
    """One line when mixed precision was asked for where it is not used."""
    if precision in ("bf16", "fp16") and device.type != "cuda":
        return f"train: --precision {precision} is for CUDA; training in float32 on {device.type}"
    return None
